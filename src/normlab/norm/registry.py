"""The norm registry: names → factories `(num_features, **kwargs) -> nn.Module` (a function, or
the norm class itself when its constructor is what a spec should see).

A *spec* is what users write in configs and what models accept as `norm=`:

- a registered name: ``"bn"``;
- a mapping with ``name`` plus keyword arguments: ``{"name": "gn", "num_groups": 8}``
  (an OmegaConf ``DictConfig`` from Hydra works the same);
- a callable ``num_features -> nn.Module`` (used as is).

Numeric arguments are checked against the ranges a norm declares when it registers
(``register_norm("rms", ranges={"eps": POSITIVE})``); ``eps`` and ``momentum`` have conventional
ranges that apply unless the norm declares its own. What the norm is (batch statistics, folding,
syncing, ...) it declares as ``traits`` (:class:`~normlab.norm.traits.NormTraits`).
"""

from __future__ import annotations

import functools
import importlib
import inspect
import sys
from collections.abc import Callable, Mapping
from typing import Any

from torch import nn

from normlab.errors import ConfigError
from normlab.norm import standardize
from normlab.norm.traits import (
    BUILT_AS_NORM,
    NormTraits,
    class_traits,
    marking,
    register_norm_class,
)
from normlab.ranges import MOMENTUM, POSITIVE, SWITCH, ArgumentError, ValueRange, check_values

NormFactory = Callable[..., nn.Module]
NormLayer = Callable[[int], nn.Module]
NormSpec = str | Mapping[str, Any] | NormLayer

NORMS: dict[str, NormFactory] = {}
_DECLARED_RANGES: dict[str, dict[str, ValueRange]] = {}
_DECLARED_TRAITS: dict[str, NormTraits] = {}
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
    name: str,
    *,
    override: bool = False,
    ranges: Mapping[str, ValueRange] | None = None,
    traits: NormTraits | None = None,
    builds: type[nn.Module] | None = None,
) -> Callable[[NormFactory], NormFactory]:
    """Decorator: register ``factory(num_features, **kwargs) -> nn.Module`` under ``name``; a norm
    class is a factory too (its ``device``, ``dtype`` and ``process_group`` are not spec arguments).

    ``ranges`` declares the valid values of its numeric arguments (``normlab.ranges``); a spec
    with a value outside them is refused before any layer is built. ``traits`` says what the norm
    is (:class:`~normlab.norm.traits.NormTraits`); every layer built from ``name`` has them, and
    so does every layer of the class registered, or of the class a factory function ``builds``
    (``convert_norms`` then reads such layers in models built without the registry). Without
    them a norm class has those of the nearest base class that has any (a BatchNorm2d subclass:
    BatchNorm's).
    """

    def decorator(factory: NormFactory) -> NormFactory:
        if name in NORMS and not override:
            raise ValueError(f"norm {name!r} is already registered (pass override=True to replace)")
        NORMS[name] = factory
        _DECLARED_RANGES[name] = dict(ranges or {})
        _DECLARED_TRAITS.pop(name, None)
        if traits is not None:
            _DECLARED_TRAITS[name] = traits
            layer = builds or (factory.path if isinstance(factory, DeferredClass) else factory)
            if isinstance(layer, (type, str)):
                register_norm_class(layer, traits)
        return factory

    return decorator


def norm_traits(spec: NormSpec | None) -> NormTraits | None:
    """The traits of the norm a spec names (declared, or its class's), or None for a plain
    callable or a norm whose registration says nothing about it."""
    name = norm_name(spec)
    if name is None or name not in NORMS:
        return None
    return _DECLARED_TRAITS.get(name) or class_traits(NORMS[name])


def norms_with(trait: str) -> list[str]:
    """The registered names whose traits have ``trait`` set, in the order they registered."""
    return [name for name in NORMS if getattr(norm_traits(name), trait, False)]


def argument_ranges(name: str) -> dict[str, ValueRange]:
    """The valid ranges of a registered norm's arguments: declared, or conventional."""
    params = inspect.signature(NORMS[name]).parameters
    conventional = {arg: r for arg, r in CONVENTIONAL_RANGES.items() if arg in params}
    return {**conventional, **_DECLARED_RANGES.get(name, {})}


def _split_spec(spec: str | Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
    if isinstance(spec, str):
        return spec, {}
    omegaconf = sys.modules.get("omegaconf")  # a DictConfig exists only once omegaconf is imported
    if omegaconf is not None and isinstance(spec, omegaconf.DictConfig):
        spec = omegaconf.OmegaConf.to_container(spec, resolve=True)
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


def check_arguments(name: str, kwargs: Mapping[str, Any]) -> None:
    """Refuse arguments that norm ``name`` does not take (ConfigError) or values outside their
    declared ranges, weight standardization's switch included (ArgumentError)."""
    params = inspect.signature(NORMS[name]).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    allowed = [p for p in params if p != "num_features" and p not in _NOT_FROM_SPECS]
    unknown = sorted(set(kwargs) - {*allowed, standardize.SPEC_KEY})
    if unknown and not takes_any:
        raise ConfigError(
            f"norm {name!r} does not take {', '.join(unknown)}; its arguments: {', '.join(allowed)}"
        )
    switch = {standardize.SPEC_KEY: SWITCH}  # a switch on any norm (normlab.norm.standardize)
    check_values({**argument_ranges(name), **switch}, kwargs, f"norm {name!r}")


def get_norm_layer(spec: NormSpec) -> NormLayer:
    """Resolve a spec into a callable ``num_features -> nn.Module``, validating it at once.

    Models call this once in their constructor and then build every norm through the result,
    so a misspelt name or argument fails before any layer is created. Every module it builds is
    marked as built in a norm's place (``normlab.norm.traits.is_norm`` then knows it).
    """
    if callable(spec) and not isinstance(spec, Mapping):
        return marking(spec, BUILT_AS_NORM)
    if not isinstance(spec, (str, Mapping)):
        raise ConfigError(f"norm spec must be a name, a mapping or a callable, got {spec!r}")
    name, kwargs = _split_spec(spec)
    if name not in NORMS:
        raise ConfigError(f"unknown norm {name!r}; registered norms: {registered()}")
    try:
        check_arguments(name, kwargs)
    except ArgumentError as error:
        if error.argument != standardize.SPEC_KEY:
            raise
        raise error.at(f"norm.{error.argument}") from None  # a switch on any norm spec
    weight_standardization = kwargs.pop(standardize.SPEC_KEY, False)
    traits = norm_traits(name) or True
    norm_layer = marking(functools.partial(NORMS[name], **kwargs), BUILT_AS_NORM, traits)
    return marking(norm_layer, standardize.MARK) if weight_standardization else norm_layer


def build_norm(spec: NormSpec, num_features: int) -> nn.Module:
    """Build one norm layer for ``num_features`` channels from a spec."""
    return get_norm_layer(spec)(num_features)
