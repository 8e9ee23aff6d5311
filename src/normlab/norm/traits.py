"""What a norm is: the traits each norm declares when it registers, and the questions the rest of
normlab asks about a norm layer, answered from them.

Conversion (which layers to swap, for how many channels), the sync notice and the Lightning sync
plugin (which norms synchronise), the RetinaNet head warning (which norms use batch statistics),
the statistics callbacks (which layers keep running statistics), the models' init (which modules
are norms) and folding (which layers are an affine map at inference) all read these traits, so a
norm registered from a user's package is treated as the built-in ones are.

Traits belong to a registered name and to a layer class: every layer the registry builds carries
its name's traits, ``register_norm`` records them for the class it registers (or the class its
factory ``builds``), and :func:`register_norm_class` for classes that no registered name builds
(torch's BatchNorm1d, torchvision's LayerNorm2d, ...), so that layers built elsewhere (a
torchvision model) are read too: by the nearest class in their MRO that has any.
"""

from __future__ import annotations

import dataclasses
import inspect
import sys
from collections.abc import Callable

import torch
from torch import nn

# Set on every module the registry builds in a norm's place, whatever the spec (a user's callable
# included): the traits of the name that built it, or True where it declares none.
BUILT_AS_NORM = "_normlab_built_as_norm"


@dataclasses.dataclass(frozen=True)
class NormTraits:
    """What a norm layer class is, as every part of normlab asks it.

    - ``batch_statistics``: in training it normalises with statistics of the whole batch (so it
      suffers at small batches, mixes what a shared head sees, and is what syncing is for).
    - ``running_statistics``: it keeps BatchNorm's ``running_mean`` and ``running_var`` buffers
      (when built with them) and normalises with them in eval mode.
    - ``channels``: the attribute holding the channel count of a 2-D (N×C×H×W) layer (an int, a
      shape whose first entry it is, or a per-channel tensor); None: it has no channel axis
      ``convert_norms`` could swap it at.
    - ``why_not_folded``: None if in eval mode it is a fixed per-channel affine map (of its running
      or frozen statistics), so folding merges it into a convolution; else why not, in words.
    - ``syncs``: ``trainer.sync_batchnorm=true`` synchronises its batch statistics across
      processes (through its ``to_synchronised()`` method, or by becoming ``syncbn``).
    - ``syncs_itself``: it synchronises without being asked: True always (``syncbn``), or the name
      of the boolean argument that turns it on (``cuda_bn``'s ``sync``).
    - ``absorbs_activation``: it is a norm and an activation in one (FRN + TLU, EvoNorm) and
      takes the place of the activation after it. A layer that only can fuse an activation it is
      handed (``cuda_bn``) has ``absorb_activation`` (``normlab.norm.fusion``) without this trait.
    - ``normalises``: False only for the identity that stands in for ``norm=none``.
    """

    batch_statistics: bool = False
    running_statistics: bool = False
    channels: str | None = "num_features"
    why_not_folded: str | None = "its traits do not say that it is an affine map at inference"
    syncs: bool = False
    syncs_itself: bool | str = False
    absorbs_activation: bool = False
    normalises: bool = True


_CLASS_TRAITS: dict[type, NormTraits] = {}
# Dotted path → traits of a class whose module is not imported yet (cuda_bn's imports Triton).
_DEFERRED_TRAITS: dict[str, NormTraits] = {}


def register_norm_class(layer: type[nn.Module] | str, traits: NormTraits) -> None:
    """Record the traits of a norm layer class (a dotted path defers importing it)."""
    if isinstance(layer, str):
        _DEFERRED_TRAITS[layer] = traits
    else:
        _CLASS_TRAITS[layer] = traits


def _declaring_class(cls: type) -> tuple[type, NormTraits] | None:
    """The nearest class in ``cls``'s MRO with declared traits, and those traits."""
    for path in list(_DEFERRED_TRAITS):
        module, _, name = path.rpartition(".")
        # A layer of a deferred class exists only once its module is imported.
        loaded = getattr(sys.modules.get(module), name, None)
        if loaded is not None:
            _CLASS_TRAITS[loaded] = _DEFERRED_TRAITS.pop(path)
    for base in inspect.getmro(cls):
        if base in _CLASS_TRAITS:
            return base, _CLASS_TRAITS[base]
    return None


def class_traits(layer: object) -> NormTraits | None:
    """The traits a layer class has (declared, or inherited), or None if ``layer`` is no class
    with any."""
    found = _declaring_class(layer) if isinstance(layer, type) else None
    return found[1] if found else None


def layer_traits(module: nn.Module) -> NormTraits | None:
    """``module``'s traits, or None if it is no norm normlab knows: those of the registered name
    that built it, else those of its class. A module the registry built in a norm's place from a
    spec whose name and class declare nothing (a user's callable) is a norm with default traits."""
    built = getattr(module, BUILT_AS_NORM, None)
    if isinstance(built, NormTraits):
        return built
    traits = class_traits(type(module))
    return NormTraits() if traits is None and built else traits


def marking(
    norm_layer: Callable[[int], nn.Module], mark: str, value: object = True
) -> Callable[[int], nn.Module]:
    """Wrap a norm factory so that every module it builds carries the attribute ``mark``."""

    def build(num_features: int) -> nn.Module:
        module = norm_layer(num_features)
        setattr(module, mark, value)
        return module

    return build


def is_norm(module: nn.Module) -> bool:
    """Whether ``module`` normalises its input (``NoNorm``, the identity standing in for
    ``norm=none``, does not)."""
    traits = layer_traits(module)
    return traits is not None and traits.normalises


def is_norm_layer(module: nn.Module) -> bool:
    """Whether ``module`` sits where a norm goes: a norm (:func:`is_norm`), or whatever the
    registry built in a norm's place (``NoNorm`` for ``norm=none``, a user's callable's module)."""
    return is_norm(module) or bool(getattr(module, BUILT_AS_NORM, False))


def norm_channels(module: nn.Module) -> int | None:
    """The channel count of a 2-D norm layer (``NoNorm`` included, so that it can be converted
    back into a norm), or None if ``module`` is not one."""
    traits = layer_traits(module)
    value = getattr(module, traits.channels, None) if traits and traits.channels else None
    if isinstance(value, torch.Tensor):
        return value.shape[0] if value.dim() else None
    if isinstance(value, (tuple, list, torch.Size)):
        return value[0] if len(value) == 1 else None
    return value if isinstance(value, int) else None


def has_running_statistics(module: nn.Module) -> bool:
    """Whether ``module`` is a norm that tracks running statistics in training (and so uses them
    in eval mode). FrozenBatchNorm2d is not: its statistics are fixed buffers nothing updates."""
    traits = layer_traits(module)
    return (
        traits is not None
        and traits.running_statistics
        and getattr(module, "track_running_stats", True)
        and getattr(module, "running_mean", None) is not None
        and getattr(module, "running_var", None) is not None
    )


def normalises_with_stored_statistics(module: nn.Module) -> bool:
    """Whether ``module`` is a norm whose eval mode may normalise with statistics stored in
    training where its training mode takes them from its input: one whose traits say it keeps
    running statistics, or normalises with batch statistics in training (EvoNorm-B0 keeps a
    running variance only). Per-sample norms and frozen statistics compute the same in both
    modes."""
    traits = layer_traits(module)
    return traits is not None and (traits.batch_statistics or traits.running_statistics)


def synchronises(module: nn.Module) -> bool:
    """Whether ``module`` shares its batch statistics with other processes by itself."""
    traits = layer_traits(module)
    if traits is None or not traits.syncs_itself:
        return False
    return traits.syncs_itself is True or bool(getattr(module, traits.syncs_itself, False))


def fused_activation(module: nn.Module) -> nn.Module | None:
    """The activation a norm applies itself (cuda_bn's fused one), as a module; else None."""
    fused = getattr(module, "fused_activation", None)
    return fused() if callable(fused) else None


def why_not_affine(module: nn.Module) -> str | None:
    """None if ``module`` in eval mode is a fixed per-channel affine map of its running (or
    frozen) statistics, as BatchNorm is; else why not, in words."""
    kind = type(module).__name__
    traits = layer_traits(module)
    if traits is None:
        return f"{kind} is not a norm layer normlab can read"
    if traits.why_not_folded is not None:
        return traits.why_not_folded
    if traits.running_statistics and not has_running_statistics(module):
        return f"{kind} without running statistics normalises with each input's own statistics"
    # Traits a class inherited hold for its forward, not for a subclass's own.
    declaring = _declaring_class(type(module))
    from_its_name = isinstance(getattr(module, BUILT_AS_NORM, None), NormTraits)
    if not from_its_name and declaring and type(module).forward is not declaring[0].forward:
        return f"{kind} has its own forward, so it may not be an affine map in eval mode"
    return None


def training_input_problem(module: nn.Module, shape: tuple[int, ...]) -> str | None:
    """Why norm layer ``module`` cannot normalise an input of ``shape`` in training (torch's own
    checks, stated for the user), or None if it can."""
    if len(shape) != 4:
        return (
            f"it is a 2-D norm, which needs N×C×H×W input, but gets a {len(shape)}-D tensor "
            "(no H, W axes, as after pooling and flattening)"
        )
    batch, channels, height, width = shape
    pixels = height * width
    if isinstance(module, nn.InstanceNorm2d) and pixels == 1:
        return "instance norm takes each channel's statistics over one image's H×W pixels, here 1"
    if isinstance(module, nn.GroupNorm) and channels // module.num_groups * pixels == 1:
        return "each of its groups holds a single value per image (1 channel × 1 pixel)"
    # BatchNorm's statistics (those with running ones: torch's check, which EvoNorm-B0 lacks).
    traits = layer_traits(module)
    batch_norm = traits is not None and traits.batch_statistics and traits.running_statistics
    if batch_norm and not synchronises(module) and batch * pixels == 1:
        return "its batch statistics would be a single value per channel (1 image × 1 pixel)"
    return None
