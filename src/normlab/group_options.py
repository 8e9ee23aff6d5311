"""Command-line choices of config groups (``norm=gn``, ``model=...``, ``experiment=...``) that do
not exist, refused in one line before Hydra composes anything.

Hydra's own error for ``norm=nope`` is a 16-line listing ending in exit code 1; the entry points
report every other configuration mistake as one line with exit code 2, so these do the same.
"""

from __future__ import annotations

from pathlib import Path

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import ChoiceSweep, Override
from hydra.errors import HydraException

from normlab.errors import ConfigError
from normlab.utils.hydra_run import CONFIG_DIR

# Configs found outside conf/ (another config dir, Hydra's search path) may hold options that
# conf/ lacks: with these on the command line, Hydra alone decides.
_OTHER_CONFIG_SOURCES = ("--config-dir", "-cd", "--config-path", "-cp", "hydra.searchpath")


def group_options(group_dir: Path) -> list[str]:
    """The options of the config group in ``group_dir``: its YAML files, as Hydra names them."""
    return sorted(
        str(path.relative_to(group_dir).with_suffix("")) for path in group_dir.rglob("*.yaml")
    )


def _chosen(override: Override) -> list[str]:
    """The options an override picks: one, or each value of a sweep over a list of them."""
    if isinstance(override.value(), ChoiceSweep):
        return list(override.sweep_string_iterator())
    value = override.value()
    return [value] if isinstance(value, str) else []


def refuse_unknown_options(arguments: list[str], config_dir: Path = CONFIG_DIR) -> None:
    """Raise :class:`ConfigError` naming the first command-line ``group=option`` whose option is
    not a file of ``config_dir/<group>/``, listing the group's options. Hydra's own groups
    (``hydra/...``, filled by plugins too) and anything Hydra cannot parse are left to Hydra."""
    if any(argument.startswith(_OTHER_CONFIG_SOURCES) for argument in arguments):
        return
    candidates = [a for a in arguments if "=" in a and not a.startswith("-")]
    try:
        overrides = OverridesParser.create().parse_overrides(candidates)
    except HydraException:
        return
    for override in overrides:
        group = override.key_or_group
        group_dir = config_dir / group
        if override.is_delete() or group.startswith("hydra") or not group_dir.is_dir():
            continue
        options = group_options(group_dir)
        for option in _chosen(override):
            if option not in options:
                raise ConfigError(
                    f"{group}={option!r}: no such config in conf/{group}/; "
                    f"options: {', '.join(options)}"
                )
