"""The ``extras`` config group (conf/extras/default.yaml): what a run does before it starts,
besides training. The options of lightning-hydra-template's group of that name."""

from __future__ import annotations

import warnings

from omegaconf import DictConfig, OmegaConf
from rich.console import Console
from rich.syntax import Syntax
from rich.tree import Tree

from normlab.errors import ConfigError
from normlab.utils.distributed import is_rank_zero
from normlab.utils.hydra_run import hydra_overrides
from normlab.utils.secrets import mask_secrets


def config_tree(cfg: DictConfig) -> Tree:
    """The resolved config as a tree: the top-level values in one branch, then one branch per
    section with its YAML (secrets from the environment masked, as in the saved config)."""
    resolved = mask_secrets(OmegaConf.to_container(cfg, resolve=True))
    plain = {key: value for key, value in resolved.items() if not isinstance(value, dict)}
    sections = {"run": plain} | {k: v for k, v in resolved.items() if isinstance(v, dict)}
    tree = Tree("config", guide_style="dim")
    for name, section in sections.items():
        yaml = OmegaConf.to_yaml(section).rstrip()
        tree.add(name, guide_style="dim").add(Syntax(yaml, "yaml", background_color="default"))
    return tree


def _tags_given_on_command_line() -> bool:
    keys = (override.split("=", 1)[0].lstrip("+~") for override in hydra_overrides())
    return any(key == "tags" or key.startswith("tags.") for key in keys)


def apply_extras(cfg: DictConfig) -> None:
    """Honour ``extras.ignore_warnings`` and ``extras.enforce_tags`` (a ConfigError when the
    command line gives no ``tags=``), before anything is built."""
    extras = cfg.get("extras") or {}
    if extras.get("ignore_warnings"):
        warnings.filterwarnings("ignore")
    if extras.get("enforce_tags") and not _tags_given_on_command_line():
        raise ConfigError(
            "extras.enforce_tags=true: say what this run is for with tags=[...] on the command "
            "line (e.g. tags=[lr_probe]); the default tags only name its task, model, norm and "
            "batch"
        )


def print_config(cfg: DictConfig) -> None:
    """With ``extras.print_config``, print :func:`config_tree` (rank 0), once the data has filled
    in what the model takes from it (class count, input channels)."""
    if (cfg.get("extras") or {}).get("print_config") and is_rank_zero():
        Console(soft_wrap=True).print(config_tree(cfg))
