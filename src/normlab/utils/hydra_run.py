"""The Hydra side of a run: where conf/ is, the resolvers it uses, and the running job's name
and group (one job of a sweep is named and grouped apart from the others)."""

from __future__ import annotations

import os
from pathlib import Path

from omegaconf import OmegaConf

CONFIG_DIR = Path(__file__).resolve().parents[3] / "conf"


def _hydra_job() -> tuple[bool, str, str, str]:
    """(multirun?, sweep dir, job number, override_dirname) of the running Hydra job."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized():
        return False, "", "", ""
    hydra_cfg = HydraConfig.get()
    multirun = hydra_cfg.mode == RunMode.MULTIRUN

    def field(key: str) -> str:  # job.num is unset outside multirun (and in --cfg printing)
        value = OmegaConf.select(hydra_cfg, key, default="")
        return "" if value is None else str(value)

    return multirun, field("sweep.dir"), field("job.num"), field("job.override_dirname")


def in_multirun() -> bool:
    """Whether this process runs a job of a Hydra multirun (a sweep)."""
    return _hydra_job()[0]


def sweeper_reads_metric() -> bool:
    """Whether this multirun job's sweeper chooses by the value the job returns (Optuna and other
    optimizers): a grid (Hydra's basic sweeper and its subclasses) only runs the jobs."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.hydra_config import HydraConfig
    from hydra.utils import get_class

    if not in_multirun():
        return False
    target = OmegaConf.select(HydraConfig.get(), "sweeper._target_", default=None)
    return not (target and issubclass(get_class(target), BasicSweeper))


def run_group(experiment: str) -> str:
    """The wandb group: the experiment, or ``<experiment>-<sweep dir name>`` for a multirun job,
    so each sweep's runs sit together and apart from other sweeps of the same experiment."""
    multirun, sweep_dir, _, _ = _hydra_job()
    return f"{experiment}-{Path(sweep_dir).name}" if multirun else experiment


def run_name(experiment: str) -> str:
    """The wandb run name: the experiment, the job number in a sweep, and what the command line
    changed (Hydra's override_dirname, without keys that only place or decorate the run)."""
    multirun, _, number, overrides = _hydra_job()
    parts = [experiment, f"#{number}" if multirun else "", overrides]
    return " ".join(part for part in parts if part)


def hydra_overrides() -> list[str]:
    """The command-line overrides of the running Hydra job (empty outside Hydra)."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return []
    return list(HydraConfig.get().overrides.task)


def eval_dir_name(ckpt_path: str | None, data: str | None) -> str:
    """``<run dir name>-<checkpoint name>/<data>`` for ``normlab.eval``'s run dir: one folder per
    checkpoint and data evaluated (``data=training`` for the data the checkpoint was trained on).
    A checkpoint outside a run's ``checkpoints/`` folder is named by its file alone."""
    path = Path(str(ckpt_path or "no_checkpoint"))
    name = path.stem
    if path.parent.name == "checkpoints" and path.parent.parent.name:
        name = f"{path.parent.parent.name}-{name}"
    return f"{name}/data={data or 'training'}"


# Folders of conf/ that hold parts of other configs (included with `@_here_`), not options to
# choose on the command line.
_CONFIG_PARTS = {"model/retinanet"}


def config_groups_help() -> str:
    """``group: option, ...`` for every config group a user chooses from (``--help``): Hydra's
    own listing, without Hydra's groups and the folders of config parts."""
    lines = []
    for group_dir in sorted(path for path in CONFIG_DIR.rglob("*") if path.is_dir()):
        group = group_dir.relative_to(CONFIG_DIR).as_posix()
        options = sorted(path.stem for path in group_dir.glob("*.yaml"))
        if options and group.split("/")[0] != "hydra" and group not in _CONFIG_PARTS:
            lines.append(f"{group}: {', '.join(options)}")
    return "\n".join(lines)


def register_resolvers() -> None:
    """Resolvers used by conf/: registered once, before Hydra composes anything."""
    if not OmegaConf.has_resolver("wandb_offline"):
        # wandb stays offline (no network needed) unless the user asks for WANDB_MODE=online.
        OmegaConf.register_new_resolver(
            "wandb_offline", lambda: os.environ.get("WANDB_MODE", "offline") != "online"
        )
    for name, resolver in (
        ("run_group", run_group),
        ("run_name", run_name),
        ("eval_dir_name", eval_dir_name),
        ("config_groups_help", config_groups_help),
    ):
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, resolver)
