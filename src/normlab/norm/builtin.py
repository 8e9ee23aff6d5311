"""The built-in norms and their traits, and the traits of torch's and torchvision's norm classes
that no name builds (so that ``convert_norms`` and folding read models built elsewhere). The
defaults (here, or in the class registered) equal those in ``conf/norm/<name>.yaml``."""

from __future__ import annotations

import dataclasses

import torch
import torchvision.models.convnext
from timm.layers import LayerNorm2d
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.instancenorm import _InstanceNorm
from torchvision.ops import FrozenBatchNorm2d

from normlab.norm.registry import DeferredClass, register_norm
from normlab.norm.sync_batchnorm import SyncBatchNorm
from normlab.norm.traits import NormTraits, register_norm_class
from normlab.ops.norm_functions import ChunkedBatchNorm
from normlab.ranges import COUNT, NON_NEGATIVE, OPTIONAL_COUNT, ArgumentError, ValueRange


class NoNorm(nn.Identity):
    """Identity that remembers its channel count, so `convert_norms` can turn it back into a norm."""

    def __init__(self, num_features: int) -> None:
        super().__init__()
        self.num_features = num_features

    def extra_repr(self) -> str:
        return str(self.num_features)


BATCH_NORM = NormTraits(
    batch_statistics=True, running_statistics=True, why_not_folded=None, syncs=True
)
# torch's other BatchNorms; the 1-D and 3-D ones have no 2-D channel axis to convert at.
register_norm_class(_BatchNorm, BATCH_NORM)
register_norm_class(nn.SyncBatchNorm, BATCH_NORM)
for _other_dims in (nn.BatchNorm1d, nn.BatchNorm3d):
    register_norm_class(_other_dims, dataclasses.replace(BATCH_NORM, channels=None))


def _per_sample(kind: str, channels: str | None) -> NormTraits:
    return NormTraits(
        channels=channels,
        why_not_folded=f"{kind} normalises each sample with its own statistics, even at inference",
    )


# A plain LayerNorm or RMSNorm normalises the last axis (channels-last blocks, transformers).
register_norm_class(nn.LayerNorm, _per_sample("LayerNorm", None))
register_norm_class(nn.RMSNorm, _per_sample("RMSNorm", None))
register_norm_class(
    torchvision.models.convnext.LayerNorm2d, _per_sample("LayerNorm2d", "normalized_shape")
)
# InstanceNorm folds when it keeps running statistics (it uses them in eval mode).
INSTANCE_NORM = NormTraits(running_statistics=True, why_not_folded=None)
register_norm_class(_InstanceNorm, dataclasses.replace(INSTANCE_NORM, channels=None))

register_norm("bn", traits=BATCH_NORM)(nn.BatchNorm2d)
# Ours, not torch's: torch's refuses CPU tensors once a process group exists.
register_norm(
    "syncbn",
    ranges={"group_size": OPTIONAL_COUNT},
    traits=dataclasses.replace(BATCH_NORM, syncs_itself=True),
)(SyncBatchNorm)


class Float32LayerNorm2d(LayerNorm2d):
    """timm's LayerNorm2d (same parameters, state dict and traits) that normalises bfloat16 and
    float16 CPU tensors in float32 and hands back their own dtype.

    Under CPU autocast (``trainer.precision=bf16-mixed``) a bf16 convolution feeds LayerNorm a
    bf16 tensor; ATen's CPU LayerNorm backward then sums the γ and β gradients over all positions
    in bfloat16, so their error grows with the positions summed: 1.2 % of the largest at 210
    positions, 4.8 % at 5000 (8 channels), where every other norm's stays at float32 rounding
    (``tests/norm/test_norm_autocast.py``). The float32 kernels are not slower: forward + backward
    of a channels-last 32×40×56×56 bf16 tensor took 37 ms through them against 81 ms in bf16
    (one core). CUDA tensors are left to CUDA's kernels, which sum those gradients in float32.
    """

    def forward(self, x: Tensor) -> Tensor:
        if x.is_cpu and x.dtype in (torch.bfloat16, torch.float16):
            return super().forward(x.float()).to(x.dtype)
        return super().forward(x)


# builds=timm's class: its traits are also those of LayerNorm2d layers in models built by timm.
@register_norm("ln", traits=_per_sample("LayerNorm2d", "normalized_shape"), builds=LayerNorm2d)
def layer_norm(num_features: int, eps: float = 1e-6, affine: bool = True) -> nn.Module:
    """timm's LayerNorm2d (permute, F.layer_norm, permute back), so ConvNeXt weights load from
    timm as they are, with half-precision CPU input normalised in float32 (Float32LayerNorm2d).
    On channels-last input its permutes are free views; normalising over dim 1 directly measured
    2.7-3.3x slower (issue 20), so the permutes stay."""
    return Float32LayerNorm2d(num_features, eps=eps, affine=affine)


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


@register_norm(
    "gn",
    ranges=GROUP_RANGES,
    traits=_per_sample("GroupNorm", "num_channels"),
    builds=nn.GroupNorm,
)
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


class InstanceNorm2d(nn.InstanceNorm2d):
    """torch's InstanceNorm2d, faster on channels-last input: torch's ``instance_norm`` views the
    batch as one sample of N·C channels, which for channels-last memory copies the input and the
    output (3.5× BatchNorm's forward + backward, ``experiments/bench/norm_cost.md``). Where each
    sample is normalised with its own statistics and no running ones are kept (the default),
    channels-last input runs ATen's BatchNorm kernels per sample instead: the same values."""

    def forward(self, x: Tensor) -> Tensor:
        if self.track_running_stats or x.dim() != 4 or x.is_contiguous() or x[0, 0].numel() < 2:
            return super().forward(x)
        y, _, _ = ChunkedBatchNorm.apply(x, self.weight, self.bias, (1,) * len(x), self.eps)
        return y


@register_norm("in", traits=INSTANCE_NORM, builds=InstanceNorm2d)
def instance_norm(
    num_features: int,
    eps: float = 1e-5,
    momentum: float | None = 0.1,
    affine: bool = True,
    track_running_stats: bool = False,
) -> nn.Module:
    return InstanceNorm2d(num_features, eps, momentum, affine, track_running_stats)


# eps=0 is valid here: the statistics are fixed (torchvision's detection weights use it). Its
# weight is a buffer of one value per channel.
register_norm(
    "frozen_bn",
    ranges={"eps": NON_NEGATIVE},
    traits=NormTraits(channels="weight", why_not_folded=None),
)(FrozenBatchNorm2d)
register_norm("none", traits=NormTraits(normalises=False))(NoNorm)
register_norm(
    "cuda_bn",
    ranges={"group_size": OPTIONAL_COUNT, "negative_slope": ValueRange()},
    traits=dataclasses.replace(BATCH_NORM, syncs_itself="sync"),
)(DeferredClass("normlab.ops.batchnorm.CudaBatchNorm"))
