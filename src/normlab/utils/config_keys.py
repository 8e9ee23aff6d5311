"""Name the config key behind a library error: an :class:`~normlab.ranges.ArgumentError` names
the argument the code was given (``num_groups``, ``digit_size[1]``); the entry points restate it
for the key of the composed config that set it (``model.head_norm.num_groups``)."""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from omegaconf import DictConfig, OmegaConf

from normlab.ranges import argument_error_behind

_NOT_SET = object()


def _keys_setting(node: Any, argument: str, value: Any, prefix: str) -> Iterator[str]:
    """The keys under ``node`` that set ``argument`` (a key, or a path such as ``splits.val``
    or ``digit_size[1]``) to ``value``. Interpolations are passed over: ``model.norm: ${norm}``
    was set as ``norm``."""
    if not isinstance(node, DictConfig):
        return
    first = re.split(r"[.\[]", argument, maxsplit=1)[0]
    if first in node and not OmegaConf.is_interpolation(node, first):
        found = OmegaConf.select(
            node, argument, default=_NOT_SET, throw_on_resolution_failure=False
        )
        if found is not _NOT_SET and found == value:
            yield f"{prefix}.{argument}" if prefix else argument
    for key in node:
        if key == "hydra" or OmegaConf.is_interpolation(node, key):
            continue
        child = OmegaConf.select(node, str(key), default=None, throw_on_resolution_failure=False)
        if isinstance(child, DictConfig):
            yield from _keys_setting(child, argument, value, f"{prefix}.{key}" if prefix else key)


@contextmanager
def config_keys_named(cfg: DictConfig, prefix: str = "") -> Iterator[None]:
    """Restate an :class:`~normlab.ranges.ArgumentError` raised inside (or behind an error raised
    inside) for the first key under ``cfg`` (itself at ``prefix``) that set its argument to its
    value; any other error, or one whose argument no key set, passes unchanged."""
    try:
        yield
    except Exception as error:
        cause = argument_error_behind(error)
        keys = _keys_setting(cfg, cause.argument, cause.value, prefix) if cause else iter(())
        key = next(keys, None)
        if key is None:
            raise
        raise cause.at(key) from error
