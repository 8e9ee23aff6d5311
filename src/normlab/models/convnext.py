"""ConvNeXt (Liu et al., "A ConvNet for the 2020s", 2022) with a pluggable norm layer.

Module and parameter names follow timm's ``ConvNeXt``, so with ``norm="ln"`` a timm state dict
(``timm.create_model("convnext_tiny").state_dict()``) loads strictly and gives the same logits.

Every norm goes through the registry (``normlab.norm.get_norm_layer``) and acts on NxCxHxW
tensors. Where timm uses a channels-last LayerNorm followed by ``nn.Linear`` layers (tiny and
larger), this block applies the registry norm channels-first and only then permutes to
channels-last for the MLP; for LayerNorm the two orders compute the same thing.

Input size: ``patch_size`` is the stride of the stem; the later stages halve the resolution three
times, so the last stage sees ``image_size / (8 * patch_size)`` pixels per side. With the
ImageNet default ``patch_size=4`` a 32-px image leaves a 1x1 map in the last stage, where instance
norm cannot run in training (torch needs more than one pixel per channel); use ``patch_size=2``
for 32-px data such as CIFAR (a 2x2 map in the last stage).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import TypedDict

import torch
from timm.layers import DropPath, Mlp, SelectAdaptivePool2d, trunc_normal_
from torch import nn
from typing_extensions import Unpack

from normlab.norm import (
    NormLayer,
    NormSpec,
    get_norm_layer,
    standardize_conv_weights,
    training_input_problem,
)
from normlab.ranges import COUNT, DROP_RATE, NON_NEGATIVE, POSITIVE, ValueRange, checked_arguments

__all__ = [
    "ConvNeXt",
    "convnext_atto",
    "convnext_base",
    "convnext_femto",
    "convnext_nano",
    "convnext_pico",
    "convnext_small",
    "convnext_tiny",
]


class ConvNeXtBlock(nn.Module):
    """Depthwise 7x7 conv → norm → MLP (expand 4x, GELU) → layer scale → drop path, plus residual.

    ``conv_mlp=True`` runs the MLP as 1x1 convolutions on NxCxHxW; ``conv_mlp=False`` runs it as
    ``nn.Linear`` layers on NxHxWxC (timm's choice for the larger models, faster there).
    """

    def __init__(
        self,
        channels: int,
        norm_layer: NormLayer,
        *,
        conv_mlp: bool,
        kernel_size: int = 7,
        mlp_ratio: float = 4.0,
        ls_init_value: float | None = 1e-6,
        drop_path: float = 0.0,
    ) -> None:
        super().__init__()
        self.conv_mlp = conv_mlp
        self.conv_dw = nn.Conv2d(
            channels, channels, kernel_size, padding=kernel_size // 2, groups=channels
        )
        self.norm = norm_layer(channels)
        self.mlp = Mlp(channels, int(mlp_ratio * channels), act_layer=nn.GELU, use_conv=conv_mlp)
        # Layer scale: a per-channel gain on the residual branch, started tiny so that every
        # block begins close to the identity.
        self.gamma = (
            nn.Parameter(torch.full((channels,), ls_init_value))
            if ls_init_value is not None
            else None
        )
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x
        x = self.norm(self.conv_dw(x))
        if not self.conv_mlp:
            x = x.permute(0, 2, 3, 1)  # nn.Linear acts on the last axis: go channels-last
        x = self.mlp(x)
        if not self.conv_mlp:
            x = x.permute(0, 3, 1, 2)
        if self.gamma is not None:
            x = x * self.gamma.view(1, -1, 1, 1)
        return shortcut + self.drop_path(x)


class ConvNeXtStage(nn.Module):
    """An optional downsampling layer (norm → 2x2 stride-2 conv) followed by ConvNeXt blocks."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        depth: int,
        norm_layer: NormLayer,
        *,
        downsample: bool,
        conv_mlp: bool,
        drop_path_rates: Sequence[float],
        ls_init_value: float | None,
        kernel_size: int = 7,
        mlp_ratio: float = 4.0,
    ) -> None:
        super().__init__()
        if downsample:
            self.downsample: nn.Module = nn.Sequential(
                norm_layer(in_channels),
                nn.Conv2d(in_channels, out_channels, kernel_size=2, stride=2),
            )
        else:
            if in_channels != out_channels:
                raise ValueError("a stage without downsampling cannot change the channel count")
            self.downsample = nn.Identity()
        self.blocks = nn.Sequential(
            *(
                ConvNeXtBlock(
                    out_channels,
                    norm_layer,
                    conv_mlp=conv_mlp,
                    kernel_size=kernel_size,
                    mlp_ratio=mlp_ratio,
                    ls_init_value=ls_init_value,
                    drop_path=rate,
                )
                for rate in drop_path_rates
            )
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(self.downsample(x))


class ConvNeXtHead(nn.Module):
    """Global average pool → norm (on NxCx1x1) → flatten → dropout → linear classifier.

    Pooling before the norm is ConvNeXt's order (and what the pretrained weights expect).
    """

    def __init__(
        self, in_features: int, num_classes: int, norm_layer: NormLayer, drop_rate: float = 0.0
    ) -> None:
        super().__init__()
        self.global_pool = SelectAdaptivePool2d(pool_type="avg")
        self.norm = norm_layer(in_features)
        self.flatten = nn.Flatten(1)
        self.drop = nn.Dropout(drop_rate)
        self.fc = nn.Linear(in_features, num_classes) if num_classes > 0 else nn.Identity()

    def forward(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.drop(self.flatten(self.norm(self.global_pool(x))))
        return x if pre_logits else self.fc(x)


def _resolve_head_norm(norm: NormSpec, head_norm: NormSpec | None, channels: int) -> NormSpec:
    """The head's norm spec: ``head_norm`` if given, else ``norm``, unless that cannot train on
    the head's globally pooled 1x1 maps (instance norm: a single value per channel, which torch
    refuses and which would erase the features anyway); then layer norm."""
    if head_norm is not None:
        return head_norm
    problem = training_input_problem(get_norm_layer(norm)(channels), (2, channels, 1, 1))
    if problem is not None:
        warnings.warn(
            f"ConvNeXt: the head's norm cannot normalise the pooled 1x1 features ({problem}); "
            "using layer norm ('ln') there. Pass head_norm= to choose another.",
            stacklevel=3,
        )
        return "ln"
    return norm


@checked_arguments(
    num_classes=COUNT,
    in_channels=COUNT,
    patch_size=COUNT,
    drop_path_rate=DROP_RATE,
    drop_rate=DROP_RATE,
    ls_init_value=ValueRange(low=0, nullable=True),
    head_init_scale=NON_NEGATIVE,
    kernel_size=COUNT,
    mlp_ratio=POSITIVE,
)
class ConvNeXt(nn.Module):
    """ConvNeXt image classifier: patchify stem, four stages of ConvNeXt blocks, pooled head.

    Args:
        depths: blocks per stage.
        dims: channels per stage.
        num_classes: classifier outputs (0 leaves the head without a classifier).
        norm: registry norm spec used in the stem, the downsampling layers and every block.
        head_norm: norm spec for the head; None means ``norm`` (layer norm if ``norm`` is "in").
        in_channels: input image channels.
        patch_size: kernel and stride of the stem; 4 for ImageNet, 2 for 32-px images.
        conv_mlp: run the block MLPs as 1x1 convolutions instead of channels-last linears.
        drop_path_rate: stochastic depth of the last block; rates rise linearly from 0.
        drop_rate: dropout before the classifier.
        ls_init_value: initial layer scale; None disables layer scale.
        head_init_scale: factor on the initial classifier weights and biases.
        kernel_size: depthwise convolution kernel size.
        mlp_ratio: hidden width of the block MLPs relative to the channels.
    """

    def __init__(
        self,
        depths: Sequence[int] = (3, 3, 9, 3),
        dims: Sequence[int] = (96, 192, 384, 768),
        *,
        num_classes: int = 1000,
        norm: NormSpec = "ln",
        head_norm: NormSpec | None = None,
        in_channels: int = 3,
        patch_size: int = 4,
        conv_mlp: bool = False,
        drop_path_rate: float = 0.0,
        drop_rate: float = 0.0,
        ls_init_value: float | None = 1e-6,
        head_init_scale: float = 1.0,
        kernel_size: int = 7,
        mlp_ratio: float = 4.0,
    ) -> None:
        super().__init__()
        if len(depths) != len(dims):
            raise ValueError(f"depths {tuple(depths)} and dims {tuple(dims)} differ in length")
        norm_layer = get_norm_layer(norm)
        self.num_classes = num_classes
        self.num_features = dims[-1]

        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, dims[0], kernel_size=patch_size, stride=patch_size),
            norm_layer(dims[0]),
        )

        # Stochastic depth rises linearly over all blocks of the network, from 0 to the rate.
        # (On the CPU explicitly, so the model can also be built under `torch.device("meta")`.)
        rates = torch.linspace(0, drop_path_rate, sum(depths), device="cpu").tolist()
        stages = []
        in_dim = dims[0]
        for i, (depth, dim) in enumerate(zip(depths, dims, strict=True)):
            stage_rates, rates = rates[:depth], rates[depth:]
            stages.append(
                ConvNeXtStage(
                    in_dim,
                    dim,
                    depth,
                    norm_layer,
                    # The stem already downsampled, so stage 0 keeps its resolution. (timm also
                    # downsamples in stage 0 when patch_size == 2; here patch_size alone sets the
                    # stem stride, so patch_size=2 really gives 2x larger maps.)
                    downsample=i > 0,
                    conv_mlp=conv_mlp,
                    drop_path_rates=stage_rates,
                    ls_init_value=ls_init_value,
                    kernel_size=kernel_size,
                    mlp_ratio=mlp_ratio,
                )
            )
            in_dim = dim
        self.stages = nn.Sequential(*stages)
        # timm's slot for a norm before the head (its head_norm_first option); kept for key parity.
        self.norm_pre = nn.Identity()
        self.head = ConvNeXtHead(
            self.num_features,
            num_classes,
            get_norm_layer(_resolve_head_norm(norm, head_norm, self.num_features)),
            drop_rate=drop_rate,
        )
        self._init_weights(head_init_scale)
        standardize_conv_weights(self)  # norm.weight_standardization=true

    @torch.no_grad()
    def _init_weights(self, head_init_scale: float) -> None:
        # timm's ConvNeXt init: truncated normal (std 0.02) for conv/linear weights, zero biases;
        # norm layers keep their own defaults.
        for module in self.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        if isinstance(self.head.fc, nn.Linear):
            self.head.fc.weight.mul_(head_init_scale)
            self.head.fc.bias.mul_(head_init_scale)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Stem and stages: images (N, C, H, W) → feature maps (N, ``num_features``, h, w)."""
        return self.norm_pre(self.stages(self.stem(x)))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Feature maps → logits (or the pooled, normalised features if ``pre_logits``)."""
        return self.head(x, pre_logits=pre_logits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


class ConvNeXtOptions(TypedDict, total=False):
    """Keyword arguments the named constructors pass on to :class:`ConvNeXt`."""

    num_classes: int
    norm: NormSpec
    head_norm: NormSpec | None
    in_channels: int
    patch_size: int
    drop_path_rate: float
    drop_rate: float
    ls_init_value: float | None


# timm's variants: depths, dims, and whether the block MLP is 1x1 convs (the small models).
_VARIANTS: dict[str, tuple[tuple[int, ...], tuple[int, ...], bool]] = {
    "atto": ((2, 2, 6, 2), (40, 80, 160, 320), True),
    "femto": ((2, 2, 6, 2), (48, 96, 192, 384), True),
    "pico": ((2, 2, 6, 2), (64, 128, 256, 512), True),
    "nano": ((2, 2, 8, 2), (80, 160, 320, 640), True),
    "tiny": ((3, 3, 9, 3), (96, 192, 384, 768), False),
    "small": ((3, 3, 27, 3), (96, 192, 384, 768), False),
    "base": ((3, 3, 27, 3), (128, 256, 512, 1024), False),
}


def _convnext(variant: str, options: ConvNeXtOptions) -> ConvNeXt:
    depths, dims, conv_mlp = _VARIANTS[variant]
    return ConvNeXt(depths, dims, conv_mlp=conv_mlp, **options)


def convnext_atto(**options: Unpack[ConvNeXtOptions]) -> ConvNeXt:
    """ConvNeXt-Atto: depths (2, 2, 6, 2), dims 40-320, 1x1-conv MLP; 3.7 M parameters."""
    return _convnext("atto", options)


def convnext_femto(**options: Unpack[ConvNeXtOptions]) -> ConvNeXt:
    """ConvNeXt-Femto: depths (2, 2, 6, 2), dims 48-384, 1x1-conv MLP; 5.2 M parameters."""
    return _convnext("femto", options)


def convnext_pico(**options: Unpack[ConvNeXtOptions]) -> ConvNeXt:
    """ConvNeXt-Pico: depths (2, 2, 6, 2), dims 64-512, 1x1-conv MLP; 9.0 M parameters."""
    return _convnext("pico", options)


def convnext_nano(**options: Unpack[ConvNeXtOptions]) -> ConvNeXt:
    """ConvNeXt-Nano: depths (2, 2, 8, 2), dims 80-640, 1x1-conv MLP; 15.6 M parameters."""
    return _convnext("nano", options)


def convnext_tiny(**options: Unpack[ConvNeXtOptions]) -> ConvNeXt:
    """ConvNeXt-Tiny: depths (3, 3, 9, 3), dims 96-768, linear MLP; 28.6 M parameters."""
    return _convnext("tiny", options)


def convnext_small(**options: Unpack[ConvNeXtOptions]) -> ConvNeXt:
    """ConvNeXt-Small: depths (3, 3, 27, 3), dims 96-768, linear MLP; 50.2 M parameters."""
    return _convnext("small", options)


def convnext_base(**options: Unpack[ConvNeXtOptions]) -> ConvNeXt:
    """ConvNeXt-Base: depths (3, 3, 27, 3), dims 128-1024, linear MLP; 88.6 M parameters."""
    return _convnext("base", options)
