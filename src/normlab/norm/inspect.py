"""What a module is, seen as a norm layer: the one place normlab decides it.

Conversion (which layers to swap, for how many channels), the statistics callbacks (which layers
keep running statistics), pix2pix's init (which weights start at 1) and folding (which layers are
an affine map at inference) all ask these questions; they ask them here, so that a norm added to
the registry is recognised the same way by all of them.
"""

from __future__ import annotations

import timm.layers
import torchvision.models.convnext
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm, _NormBase
from torch.nn.modules.instancenorm import _InstanceNorm
from torchvision.ops import FrozenBatchNorm2d

from normlab.norm.layers import NoNorm
from normlab.norm.small_batch import EvoNormB0, EvoNormS0, FilterResponseNorm2d, RMSNorm2d
from normlab.norm.sync import SyncBatchNorm

# _NormBase covers BatchNorm, SyncBatchNorm, InstanceNorm and cuda_bn; nn.LayerNorm covers every
# LayerNorm2d (timm's, which `ln` builds, and torchvision's) and nn.RMSNorm our RMSNorm2d.
_TORCH_NORMS = (_NormBase, FrozenBatchNorm2d, nn.GroupNorm, nn.LayerNorm, nn.RMSNorm)

# LayerNorms that normalise the channel axis of N×C×H×W input. A plain nn.LayerNorm normalises
# the last axis (channels-last blocks, transformers), so it has no channel count here.
_CHANNELS_FIRST_LAYER_NORMS = (
    timm.layers.LayerNorm2d,
    torchvision.models.convnext.LayerNorm2d,
)


def is_norm(module: nn.Module) -> bool:
    """Whether ``module`` normalises its input: one of torch's or torchvision's norm classes, or a
    norm of ours that states how folding treats it (``why_not_folded``, see
    :mod:`normlab.norm.small_batch`). ``NoNorm``, the identity that stands in for ``norm=none``, is
    not a norm."""
    return isinstance(module, _TORCH_NORMS) or hasattr(type(module), "why_not_folded")


def norm_channels(module: nn.Module) -> int | None:
    """The channel count of a 2-D norm layer (``NoNorm`` included, so that it can be converted
    back into a norm), or None if ``module`` is not one."""
    if isinstance(module, _BatchNorm) and not isinstance(module, (nn.BatchNorm1d, nn.BatchNorm3d)):
        return module.num_features
    if isinstance(module, nn.InstanceNorm2d):
        return module.num_features
    if isinstance(module, nn.GroupNorm):
        return module.num_channels
    if isinstance(module, FrozenBatchNorm2d):
        return module.weight.shape[0]
    if isinstance(module, (*_CHANNELS_FIRST_LAYER_NORMS, RMSNorm2d)):
        return module.normalized_shape[0]
    if isinstance(module, (FilterResponseNorm2d, EvoNormB0, EvoNormS0, NoNorm)):
        return module.num_features
    return None


def has_running_statistics(module: nn.Module) -> bool:
    """Whether ``module`` is a norm that tracks running statistics in training (and so uses them
    in eval mode): BatchNorm-like layers and InstanceNorm with ``track_running_stats=True``.
    FrozenBatchNorm2d is not: its statistics are fixed buffers that nothing updates."""
    return (
        isinstance(module, _NormBase)
        and module.track_running_stats
        and module.running_mean is not None
        and module.running_var is not None
    )


def fused_activation(module: nn.Module) -> nn.Module | None:
    """The activation a norm applies itself (cuda_bn's fused one), as a module; else None."""
    fused = getattr(module, "fused_activation", None)
    return fused() if callable(fused) else None


def _affine_forward_classes() -> tuple[type[nn.Module], ...]:
    """Norm classes with a forward of their own that is still, in eval mode, the affine map of
    their running statistics."""
    from normlab.ops.batchnorm import CudaBatchNorm  # not at import time: it imports Triton

    return (nn.SyncBatchNorm, SyncBatchNorm, CudaBatchNorm)


def why_not_affine(module: nn.Module) -> str | None:
    """None if ``module`` in eval mode is a fixed per-channel affine map of its running (or
    frozen) statistics, as BatchNorm is; else why not, in words."""
    kind = type(module).__name__
    if isinstance(module, FrozenBatchNorm2d):
        return None
    declared = getattr(type(module), "why_not_folded", False)
    if declared is not False:
        return declared
    if isinstance(module, (nn.GroupNorm, nn.LayerNorm, nn.RMSNorm)):
        return f"{kind} normalises each sample with its own statistics, even at inference"
    if not isinstance(module, _NormBase):
        return f"{kind} is not a norm layer normlab can read"
    if not has_running_statistics(module):
        return f"{kind} without running statistics normalises with each input's own statistics"
    standard = (_BatchNorm.forward, _InstanceNorm.forward)
    if not isinstance(module, _affine_forward_classes()) and type(module).forward not in standard:
        return f"{kind} has its own forward, so it may not be an affine map in eval mode"
    return None
