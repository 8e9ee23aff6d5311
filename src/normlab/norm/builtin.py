"""The built-in norms. Their defaults (here, or in the class registered) equal those in
``conf/norm/<name>.yaml``."""

from __future__ import annotations

from timm.layers import LayerNorm2d
from torch import nn
from torchvision.ops import FrozenBatchNorm2d

from normlab.norm.layers import NoNorm
from normlab.norm.registry import DeferredClass, register_norm
from normlab.norm.sync import SyncBatchNorm
from normlab.ranges import COUNT, NON_NEGATIVE, OPTIONAL_COUNT, ArgumentError, ValueRange

register_norm("bn")(nn.BatchNorm2d)
# Ours, not torch's: torch's refuses CPU tensors once a process group exists.
register_norm("syncbn", ranges={"group_size": OPTIONAL_COUNT})(SyncBatchNorm)


@register_norm("ln")
def layer_norm(num_features: int, eps: float = 1e-6, affine: bool = True) -> nn.Module:
    """timm's LayerNorm2d (permute, F.layer_norm, permute back), so ConvNeXt weights load from
    timm as they are. On channels-last input its permutes are free views; normalising over dim 1
    directly measured 2.7-3.3x slower (issue 20), so the permutes stay."""
    return LayerNorm2d(num_features, eps=eps, affine=affine)


# The group options of gn and of every norm that groups its channels as gn does (evonorm_s0).
GROUP_RANGES = {"num_groups": OPTIONAL_COUNT, "group_size": OPTIONAL_COUNT, "max_groups": COUNT}


def resolve_num_groups(
    num_channels: int,
    num_groups: int | None,
    group_size: int | None,
    max_groups: int,
    norm: str = "gn",
) -> int:
    """Pick the group count of ``norm`` (named in the errors): exact when asked for, else the
    largest divisor ≤ max_groups."""
    if num_groups is not None and group_size is not None:
        raise ArgumentError(
            "num_groups", num_groups, f"{norm}: set either {{key}} or group_size, not both"
        )
    for key, value in (("num_groups", num_groups), ("group_size", group_size)):
        if value is not None and (value < 1 or num_channels % value):
            raise ArgumentError(
                key, value, f"{norm}: {num_channels} channels are not divisible by {{key}}={value}"
            )
    if num_groups is not None:
        return num_groups
    if group_size is not None:
        return num_channels // group_size
    if max_groups < 1:
        raise ArgumentError(
            "max_groups", max_groups, f"{norm}: {{key}} must be ≥ 1, got {max_groups}"
        )
    return max(g for g in range(1, min(max_groups, num_channels) + 1) if num_channels % g == 0)


@register_norm("gn", ranges=GROUP_RANGES)
def group_norm(
    num_features: int,
    num_groups: int | None = None,
    group_size: int | None = None,
    max_groups: int = 32,
    eps: float = 1e-5,
    affine: bool = True,
) -> nn.Module:
    groups = resolve_num_groups(num_features, num_groups, group_size, max_groups)
    return nn.GroupNorm(groups, num_features, eps=eps, affine=affine)


@register_norm("in")
def instance_norm(
    num_features: int,
    eps: float = 1e-5,
    momentum: float | None = 0.1,
    affine: bool = True,
    track_running_stats: bool = False,
) -> nn.Module:
    return nn.InstanceNorm2d(num_features, eps, momentum, affine, track_running_stats)


# eps=0 is valid here: the statistics are fixed (torchvision's detection weights use it).
register_norm("frozen_bn", ranges={"eps": NON_NEGATIVE})(FrozenBatchNorm2d)
register_norm("none")(NoNorm)
register_norm("cuda_bn", ranges={"group_size": OPTIONAL_COUNT, "negative_slope": ValueRange()})(
    DeferredClass("normlab.ops.batchnorm.CudaBatchNorm")
)
