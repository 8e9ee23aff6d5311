"""What a checkpoint's stored config may make ``eval`` and ``export`` build.

A checkpoint loads with ``torch.load(weights_only=True)``, but the configs it stores name
``_target_`` callables that Hydra imports and calls: ``builtins.open`` or ``torch.hub.load``
would run whatever the file's author chose. So every ``_target_`` in the stored config and in the
hyperparameters Lightning rebuilds the task from is checked before anything is built, against:

- what normlab registers: the tasks, models and data modules its packages export, and the norm
  factories of the norm registry;
- every ``_target_`` that normlab's own ``conf/`` names (optimizers, schedulers, the trainer,
  callbacks, loggers);
- anything inside a package the user names with ``imports=[...]`` on the command line.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from normlab import data, models, tasks
from normlab.errors import ConfigError
from normlab.norm.registry import NORMS, DeferredClass
from normlab.utils.hydra_run import CONFIG_DIR


def _dotted_name(obj: Any) -> str:
    if isinstance(obj, DeferredClass):
        return obj.path
    return f"{obj.__module__}.{obj.__qualname__}"


# Keys whose value names a callable to import and call: Hydra's, and the one Lightning's
# load_from_checkpoint reads from the hyperparameters.
TARGET_KEYS = ("_target_", "_instantiator")


def _targets_in(node: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """``(key, target)`` for every target key in a nest of mappings and lists, keys dotted from
    ``prefix`` (``model.norm._target_``)."""
    if isinstance(node, Mapping):
        for key, value in node.items():
            path = f"{prefix}{key}"
            if key in TARGET_KEYS:
                yield path, value
            else:
                yield from _targets_in(value, f"{path}.")
    elif isinstance(node, list | tuple):
        for index, item in enumerate(node):
            yield from _targets_in(item, f"{prefix}{index}.")


@functools.cache
def _conf_targets() -> frozenset[str]:
    targets = set()
    for path in Path(CONFIG_DIR).rglob("*.yaml"):
        stored = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
        targets.update(str(target) for _, target in _targets_in(stored))
    return frozenset(targets)


def normlab_targets() -> frozenset[str]:
    """Every ``_target_`` a checkpoint may name without ``imports=``: the exports of
    ``normlab.tasks``, ``normlab.models`` and ``normlab.data`` (by their package's name and
    their own module's), the registered norm factories and the targets in ``conf/``."""
    targets = set(_conf_targets())
    for package in (tasks, models, data):
        for name in package.__all__:
            targets |= {f"{package.__name__}.{name}", _dotted_name(getattr(package, name))}
    targets.update(_dotted_name(factory) for factory in NORMS.values())
    return frozenset(targets)


def check_targets(
    where: str, *nodes: tuple[str, Any], imports: list[str] | tuple[str, ...] = ()
) -> None:
    """Refuse, naming ``where`` and the key, the first ``_target_`` in ``nodes`` (``(key prefix,
    config)`` pairs) that is neither a normlab target nor inside a package of ``imports``."""
    allowed = normlab_targets()
    packages = tuple(f"{name}." for name in imports)
    for prefix, node in nodes:
        for key, target in _targets_in(node, prefix):
            if isinstance(target, str) and (target in allowed or target.startswith(packages)):
                continue
            raise ConfigError(
                f"{where} {key}={target} is not a normlab target; a checkpoint may build only "
                "normlab's tasks, models, norms and data modules and the targets in its conf/, "
                "or those of a package you name with imports=[...]"
            )
