"""Valid ranges of numeric arguments, and the checks that enforce them: normlab's one place for
argument checks.

Norms declare theirs when they register (``register_norm(name, ranges=...)``), models with
:func:`checked_arguments`. Library calls check them and raise :class:`ArgumentError`, which names
the argument; the config layer (:mod:`normlab.validation`) checks the same declarations against
the composed config before anything is built, naming the config key instead
(``model.head_norm.eps``, ``model.drop_path_rate``). Arguments whose lower bound depends on another
argument are checked where they are taken, with :func:`check_int`.
"""

from __future__ import annotations

import functools
import inspect
import math
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from normlab.errors import ConfigError

Declared = TypeVar("Declared", bound=Callable[..., Any])


def is_int(value: Any) -> bool:
    """Whether ``value`` is an integer; ``True`` is not (YAML's ``true`` is no count)."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    """Whether ``value`` is an int or a float, ``True`` and ``False`` excluded."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _shown(bound: float) -> str:
    # An integer bound as written: ":g" would show a minimum of 1000000 as 1e+06.
    return str(bound) if isinstance(bound, int) else f"{bound:g}"


@dataclass(frozen=True)
class ValueRange:
    """The values one argument accepts: a number (an integer if ``integer``) between ``low`` and
    ``high`` (either may be open or absent), or None if ``nullable``."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    integer: bool = False
    nullable: bool = False

    def allows(self, value: Any) -> bool:
        if value is None:
            return self.nullable
        if not is_number(value):
            return False
        if self.integer and not isinstance(value, int):
            return False
        if not math.isfinite(value):  # NaN, and infinities no argument takes (lr=inf)
            return False
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        return self.high is None or (value < self.high if self.high_open else value <= self.high)

    def __str__(self) -> str:
        kind = "an integer" if self.integer else "a number"
        if self.low is not None and self.high is not None:
            bounds = f"in {'(' if self.low_open else '['}{_shown(self.low)}, {_shown(self.high)}"
            bounds += ")" if self.high_open else "]"
        elif self.low is not None:
            bounds = f"{'>' if self.low_open else '>='} {_shown(self.low)}"
        elif self.high is not None:
            bounds = f"{'<' if self.high_open else '<='} {_shown(self.high)}"
        else:
            bounds = ""
        text = f"{kind} {bounds}".rstrip()
        return f"null or {text}" if self.nullable else text


POSITIVE = ValueRange(low=0, low_open=True)
NON_NEGATIVE = ValueRange(low=0)
COUNT = ValueRange(low=1, integer=True)
OPTIONAL_COUNT = ValueRange(low=1, integer=True, nullable=True)
FRACTION = ValueRange(low=0, high=1)
# Probabilities of dropping something: 1 would drop everything.
DROP_RATE = ValueRange(low=0, high=1, high_open=True)
# A running-average momentum; null means a cumulative average (torch's BatchNorm).
MOMENTUM = ValueRange(low=0, high=1, nullable=True)
# What numpy's and Python's RNGs accept as a seed (pl.seed_everything refuses the rest).
SEED = ValueRange(low=0, high=2**32 - 1, integer=True)


@dataclass(frozen=True)
class Switch:
    """The values of an on/off argument: true or false (YAML's 1 and "yes" are neither)."""

    def allows(self, value: Any) -> bool:
        return isinstance(value, bool)

    def __str__(self) -> str:
        return "true or false"


SWITCH = Switch()


class ArgumentError(ConfigError):
    """A bad argument value, raised by library code that knows the argument but not the config
    key it was set under (``norm`` and ``model.head_norm`` build the same GroupNorm). ``str()``
    names the argument and, when given, its owner (``eps must be a number > 0, got -1 (norm
    'bn')``); :meth:`at` names a config key instead, which the entry points do
    (``normlab.utils.config_keys``).

    ``message`` says what is wrong, with ``{key}`` where the argument is to be named.
    """

    def __init__(self, argument: str, value: Any, message: str, owner: str | None = None) -> None:
        self.argument, self.value, self.message, self.owner = argument, value, message, owner
        named = message.replace("{key}", argument)
        super().__init__(named if owner is None else f"{named} ({owner})")

    @classmethod
    def out_of_range(
        cls, argument: str, value: Any, allowed: ValueRange, owner: str | None = None
    ) -> ArgumentError:
        return cls(argument, value, f"{{key}} must be {allowed}, got {value!r}", owner)

    def at(self, key: str) -> ConfigError:
        """The same mistake stated for the config key the value came from."""
        return ConfigError(self.message.replace("{key}", key))


def argument_error_behind(error: BaseException | None) -> ArgumentError | None:
    """The ArgumentError behind ``error``, if the first ConfigError of its chain is one (Hydra's
    instantiate wraps what a constructor raises)."""
    while error is not None and not isinstance(error, ConfigError):
        error = error.__cause__ or error.__context__
    return error if isinstance(error, ArgumentError) else None


def check_int(argument: str, value: Any, *, minimum: int, owner: str | None = None) -> int:
    """``value`` if it is an integer >= ``minimum``; else :class:`ArgumentError` naming
    ``argument`` (``batch_size must be an integer >= 1, got 0``)."""
    allowed = ValueRange(low=minimum, integer=True)
    if not allowed.allows(value):
        raise ArgumentError.out_of_range(argument, value, allowed, owner)
    return value


def check_choice(
    argument: str, value: Any, choices: Sequence[Any], owner: str | None = None
) -> Any:
    """``value`` if it is one of ``choices``; else :class:`ArgumentError` naming ``argument``
    (``box_loss='iou' is not one of l1, smooth_l1, giou``)."""
    if value not in choices:
        listed = ", ".join(map(str, choices))
        raise ArgumentError(argument, value, f"{{key}}={value!r} is not one of {listed}", owner)
    return value


def check_values(
    ranges: Mapping[str, ValueRange | Switch], values: Mapping[str, Any], owner: str
) -> None:
    """Raise :class:`ArgumentError` for the first of ``values`` outside its declared range."""
    for argument, value in values.items():
        allowed = ranges.get(argument)
        if allowed is not None and not allowed.allows(value):
            raise ArgumentError.out_of_range(argument, value, allowed, owner)


def _given_arguments(signature: inspect.Signature, args: tuple, kwargs: dict) -> dict[str, Any]:
    """The arguments a call passes, by name, with ``**options`` spread out."""
    try:
        bound = signature.bind(*args, **kwargs)
    except TypeError:
        return {}  # the call itself reports a wrong signature
    given = {}
    for name, value in bound.arguments.items():
        if signature.parameters[name].kind is inspect.Parameter.VAR_KEYWORD:
            given.update(value)
        else:
            given[name] = value
    return given


def checked_arguments(**ranges: ValueRange) -> Callable[[Declared], Declared]:
    """Decorator for a model class or constructor function: every call checks its arguments
    against ``ranges`` (raising :class:`ArgumentError`), and :func:`declared_ranges` finds them."""

    def decorate(target: Declared) -> Declared:
        if isinstance(target, type):
            init = target.__init__
            signature = inspect.signature(init)

            @functools.wraps(init)
            def checked_init(self: Any, *args: Any, **kwargs: Any) -> None:
                given = _given_arguments(signature, (self, *args), kwargs)
                check_values(ranges, given, target.__name__)
                init(self, *args, **kwargs)

            target.__init__ = checked_init
            target.argument_ranges = {**getattr(target, "argument_ranges", {}), **ranges}
            return target

        signature = inspect.signature(target)

        @functools.wraps(target)
        def checked(*args: Any, **kwargs: Any) -> Any:
            check_values(ranges, _given_arguments(signature, args, kwargs), target.__name__)
            return target(*args, **kwargs)

        checked.argument_ranges = dict(ranges)
        return typing.cast(Declared, checked)

    return decorate


def declared_ranges(target: Any) -> Mapping[str, ValueRange]:
    """The ranges ``target`` declares, or, for a constructor function that declares none, those
    of the class its return annotation names (``convnext_atto -> ConvNeXt``)."""
    ranges = getattr(target, "argument_ranges", None)
    if ranges is not None:
        return ranges
    if inspect.isfunction(target):
        try:
            returned = typing.get_type_hints(target).get("return")
        except Exception:  # an annotation that does not resolve declares nothing
            return {}
        return getattr(returned, "argument_ranges", {}) if isinstance(returned, type) else {}
    return {}
