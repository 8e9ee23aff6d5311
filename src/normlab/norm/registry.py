"""The norm registry: names → factories `(num_features, **kwargs) -> nn.Module` (a function, or
the norm class itself when its constructor is what a spec should see).

A *spec* is what users write in configs and what models accept as `norm=`:

- a registered name: ``"bn"``;
- a mapping with ``name`` plus keyword arguments: ``{"name": "gn", "num_groups": 8}``
  (an OmegaConf ``DictConfig`` from Hydra works the same);
- a callable ``num_features -> nn.Module`` (used as is).

Numeric arguments are checked against the ranges a norm declares when it registers
(``register_norm("rms", ranges={"eps": POSITIVE})``); ``eps`` and ``momentum`` have conventional
ranges that apply unless the norm declares its own.
"""

from __future__ import annotations

import functools
import importlib
import inspect
from collections.abc import Callable, Mapping
from typing import Any

from omegaconf import DictConfig, OmegaConf
from torch import nn

from normlab.errors import ConfigError
from normlab.norm import standardize
from normlab.ranges import MOMENTUM, POSITIVE, ValueRange, check_values

NormFactory = Callable[..., nn.Module]
NormLayer = Callable[[int], nn.Module]
NormSpec = str | Mapping[str, Any] | NormLayer

NORMS: dict[str, NormFactory] = {}
_DECLARED_RANGES: dict[str, dict[str, ValueRange]] = {}
# What these arguments mean in every norm here (torch's): a norm whose eps or momentum means
# something else declares its own range.
CONVENTIONAL_RANGES: dict[str, ValueRange] = {"eps": POSITIVE, "momentum": MOMENTUM}
# Constructor arguments of torch-style norm classes that no config can give: where the layer's
# tensors live (the model moves them later) and a live process group.
_NOT_FROM_SPECS = frozenset({"device", "dtype", "process_group"})


class DeferredClass:
    """A norm class registered by its dotted path and imported only when a layer is built from it
    or its arguments are read, so registering it imports nothing (cuda_bn's class imports Triton,
    which not every install has)."""

    def __init__(self, path: str) -> None:
        self.path = path

    def load(self) -> type[nn.Module]:
        module, _, name = self.path.rpartition(".")
        return getattr(importlib.import_module(module), name)

    @property
    def __signature__(self) -> inspect.Signature:
        return inspect.signature(self.load())

    def __call__(self, *args: Any, **kwargs: Any) -> nn.Module:
        return self.load()(*args, **kwargs)

    def __repr__(self) -> str:
        return f"DeferredClass({self.path!r})"


def register_norm(
    name: str, *, override: bool = False, ranges: Mapping[str, ValueRange] | None = None
) -> Callable[[NormFactory], NormFactory]:
    """Decorator: register ``factory(num_features, **kwargs) -> nn.Module`` under ``name``; a norm
    class is a factory too (its ``device``, ``dtype`` and ``process_group`` are not spec arguments).

    ``ranges`` declares the valid values of its numeric arguments (``normlab.ranges``); a spec
    with a value outside them is refused before any layer is built.
    """

    def decorator(factory: NormFactory) -> NormFactory:
        if name in NORMS and not override:
            raise ValueError(f"norm {name!r} is already registered (pass override=True to replace)")
        NORMS[name] = factory
        _DECLARED_RANGES[name] = dict(ranges or {})
        return factory

    return decorator


def argument_ranges(name: str) -> dict[str, ValueRange]:
    """The valid ranges of a registered norm's arguments: declared, or conventional."""
    params = inspect.signature(NORMS[name]).parameters
    conventional = {arg: r for arg, r in CONVENTIONAL_RANGES.items() if arg in params}
    return {**conventional, **_DECLARED_RANGES.get(name, {})}


def _split_spec(spec: str | Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
    if isinstance(spec, str):
        return spec, {}
    if isinstance(spec, DictConfig):
        spec = OmegaConf.to_container(spec, resolve=True)
    kwargs = dict(spec)
    if "name" not in kwargs:
        raise ConfigError(f"norm spec {kwargs} has no 'name'; registered norms: {registered()}")
    return str(kwargs.pop("name")), kwargs


def registered() -> str:
    return ", ".join(sorted(NORMS))


def norm_name(spec: NormSpec | None) -> str | None:
    """The registered name a spec refers to, or None for a plain callable."""
    if spec is None or (callable(spec) and not isinstance(spec, Mapping)):
        return None
    return _split_spec(spec)[0]


def get_norm_layer(spec: NormSpec) -> NormLayer:
    """Resolve a spec into a callable ``num_features -> nn.Module``, validating it at once.

    Models call this once in their constructor and then build every norm through the result,
    so a misspelt name or argument fails before any layer is created.
    """
    if callable(spec) and not isinstance(spec, Mapping):
        return spec
    if not isinstance(spec, (str, Mapping)):
        raise ConfigError(f"norm spec must be a name, a mapping or a callable, got {spec!r}")
    name, kwargs = _split_spec(spec)
    if name not in NORMS:
        raise ConfigError(f"unknown norm {name!r}; registered norms: {registered()}")
    # A switch on any norm, not an argument of one (normlab.norm.standardize).
    weight_standardization = standardize.check_switch(kwargs.pop(standardize.SPEC_KEY, False))
    factory = NORMS[name]
    params = inspect.signature(factory).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    allowed = [p for p in params if p != "num_features" and p not in _NOT_FROM_SPECS]
    unknown = sorted(set(kwargs) - set(allowed))
    if unknown and not takes_any:
        raise ConfigError(
            f"norm {name!r} does not take {', '.join(unknown)}; its arguments: {', '.join(allowed)}"
        )
    check_values(argument_ranges(name), kwargs, f"norm {name!r}")
    norm_layer = functools.partial(factory, **kwargs)
    return standardize.marking(norm_layer) if weight_standardization else norm_layer


def build_norm(spec: NormSpec, num_features: int) -> nn.Module:
    """Build one norm layer for ``num_features`` channels from a spec."""
    return get_norm_layer(spec)(num_features)
