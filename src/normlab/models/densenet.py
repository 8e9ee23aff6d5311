"""DenseNet (Huang et al., "Densely Connected Convolutional Networks") with a pluggable norm.

The ImageNet models use torchvision's module names, so torchvision's state dicts load strictly
with ``norm="bn"``. ``densenet_bc_100`` is the CIFAR DenseNet-BC (L=100, k=12) of the paper.
Every norm layer is built through the registry, never from a norm class, together with the ReLU
after it (``norm_and_activation``), so that a norm able to apply the ReLU itself absorbs it.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable
from contextlib import AbstractContextManager, nullcontext
from typing import Literal, TypedDict

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint
from typing_extensions import Unpack

from normlab.norm import (
    NormLayer,
    NormSpec,
    get_norm_layer,
    is_norm_layer,
    norm_and_activation,
    standardize_conv_weights,
)
from normlab.ranges import COUNT, DROP_RATE, ValueRange, checked_arguments

__all__ = [
    "DenseNet",
    "densenet121",
    "densenet161",
    "densenet169",
    "densenet201",
    "densenet_bc",
    "densenet_bc_100",
]

Stem = Literal["imagenet", "cifar"]


class _RestoreBuffers:
    """Context manager that puts the buffers of ``modules`` back to their values on entry.

    Used around checkpoint recomputation: re-running a norm in training mode would otherwise
    update its running statistics (and ``num_batches_tracked``) a second time per step.
    It is reusable, since autograd may recompute more than once (e.g. ``retain_graph=True``).
    """

    def __init__(self, modules: Iterable[nn.Module]) -> None:
        self.modules = list(modules)
        self.saved: list[tuple[Tensor, Tensor]] = []

    def __enter__(self) -> None:
        # Buffers are looked up now, not at construction, in case a module reassigned one.
        self.saved = [(b, b.detach().clone()) for m in self.modules for b in m.buffers()]

    def __exit__(self, *exc_info: object) -> bool:
        # Restores also when checkpoint stops recomputation early by raising.
        with torch.no_grad():
            for buffer, value in self.saved:
                buffer.copy_(value)
        self.saved = []
        return False


class _DenseLayer(nn.Module):
    """Bottleneck layer: norm-relu-conv1x1 to ``bn_size*k`` channels, then norm-relu-conv3x3 to k."""

    def __init__(
        self,
        num_input_features: int,
        growth_rate: int,
        bn_size: int,
        drop_rate: float,
        norm_layer: NormLayer,
        memory_efficient: bool = False,
    ) -> None:
        super().__init__()
        bottleneck = bn_size * growth_rate
        # A norm that can apply the ReLU itself absorbs it; relu1/relu2 are then nn.Identity.
        self.norm1, self.relu1 = norm_and_activation(
            norm_layer, num_input_features, nn.ReLU(inplace=True)
        )
        self.conv1 = nn.Conv2d(num_input_features, bottleneck, kernel_size=1, bias=False)
        self.norm2, self.relu2 = norm_and_activation(norm_layer, bottleneck, nn.ReLU(inplace=True))
        self.conv2 = nn.Conv2d(bottleneck, growth_rate, kernel_size=3, padding=1, bias=False)
        self.drop_rate = float(drop_rate)
        self.memory_efficient = memory_efficient

    def bottleneck(self, *features: Tensor) -> Tensor:
        """Concatenate the block's features so far and reduce them to ``bn_size*k`` channels."""
        return self.conv1(self.relu1(self.norm1(torch.cat(features, 1))))

    def _checkpoint_contexts(self) -> tuple[AbstractContextManager[None], _RestoreBuffers]:
        # (forward, recompute): the first forward is normal; only the recomputation in backward
        # must leave no trace on the buffers.
        return nullcontext(), _RestoreBuffers([self.norm1, self.relu1, self.conv1])

    def forward(self, features: list[Tensor]) -> Tensor:
        needs_grad = torch.is_grad_enabled() and any(f.requires_grad for f in features)
        if self.memory_efficient and needs_grad:
            # The concatenation is the memory hog (it grows quadratically with depth), so it and
            # its norm/relu are recomputed in backward instead of being kept.
            out = checkpoint(
                self.bottleneck,
                *features,
                use_reentrant=False,
                context_fn=self._checkpoint_contexts,
            )
        else:
            out = self.bottleneck(*features)
        out = self.conv2(self.relu2(self.norm2(out)))
        if self.drop_rate > 0:
            out = F.dropout(out, p=self.drop_rate, training=self.training)
        return out


class _DenseBlock(nn.ModuleDict):
    """``num_layers`` dense layers, each seeing the concatenation of all earlier outputs."""

    def __init__(
        self,
        num_layers: int,
        num_input_features: int,
        bn_size: int,
        growth_rate: int,
        drop_rate: float,
        norm_layer: NormLayer,
        memory_efficient: bool = False,
    ) -> None:
        super().__init__()
        for i in range(num_layers):
            layer = _DenseLayer(
                num_input_features + i * growth_rate,
                growth_rate=growth_rate,
                bn_size=bn_size,
                drop_rate=drop_rate,
                norm_layer=norm_layer,
                memory_efficient=memory_efficient,
            )
            self.add_module(f"denselayer{i + 1}", layer)

    def forward(self, x: Tensor) -> Tensor:
        # Keep a list and let each layer concatenate, so memory_efficient can drop the concat.
        features = [x]
        for layer in self.values():
            features.append(layer(features))
        return torch.cat(features, 1)


class _Transition(nn.Sequential):
    """Norm-relu-conv1x1 (compressing channels), then 2x2 average pooling."""

    def __init__(
        self, num_input_features: int, num_output_features: int, norm_layer: NormLayer
    ) -> None:
        super().__init__()
        self.norm, self.relu = norm_and_activation(
            norm_layer, num_input_features, nn.ReLU(inplace=True)
        )
        self.conv = nn.Conv2d(num_input_features, num_output_features, kernel_size=1, bias=False)
        self.pool = nn.AvgPool2d(kernel_size=2, stride=2)


@checked_arguments(
    growth_rate=COUNT,
    num_init_features=COUNT,
    bn_size=COUNT,
    compression=ValueRange(low=0, high=1, low_open=True),
    drop_rate=DROP_RATE,
    num_classes=COUNT,
    in_channels=COUNT,
)
class DenseNet(nn.Module):
    """DenseNet-BC: a stem, dense blocks joined by compressing transitions, norm, pool, linear.

    Args:
        growth_rate: channels each dense layer adds (k in the paper).
        block_config: number of dense layers in each block.
        num_init_features: channels out of the stem.
        bn_size: bottleneck width as a multiple of ``growth_rate``.
        compression: fraction of channels a transition keeps.
        drop_rate: dropout after each dense layer.
        num_classes: outputs of the classifier.
        norm: norm spec for every norm layer (see ``normlab.norm``).
        in_channels: channels of the input image.
        stem: ``"imagenet"`` (7x7/2 conv, norm, relu, 3x3/2 max pool) or ``"cifar"`` (3x3 conv).
        memory_efficient: recompute each layer's concat-norm-relu-conv1x1 in backward.
    """

    def __init__(
        self,
        growth_rate: int = 32,
        block_config: tuple[int, ...] = (6, 12, 24, 16),
        num_init_features: int = 64,
        bn_size: int = 4,
        compression: float = 0.5,
        drop_rate: float = 0.0,
        num_classes: int = 1000,
        norm: NormSpec = "bn",
        in_channels: int = 3,
        stem: Stem = "imagenet",
        memory_efficient: bool = False,
    ) -> None:
        super().__init__()
        norm_layer = get_norm_layer(norm)

        if stem == "imagenet":
            norm0, relu0 = norm_and_activation(norm_layer, num_init_features, nn.ReLU(inplace=True))
            layers = [
                (
                    "conv0",
                    nn.Conv2d(
                        in_channels,
                        num_init_features,
                        kernel_size=7,
                        stride=2,
                        padding=3,
                        bias=False,
                    ),
                ),
                ("norm0", norm0),
                ("relu0", relu0),
                ("pool0", nn.MaxPool2d(kernel_size=3, stride=2, padding=1)),
            ]
        elif stem == "cifar":
            # The first dense layer starts with norm-relu, so the CIFAR stem is a bare conv.
            layers = [
                (
                    "conv0",
                    nn.Conv2d(in_channels, num_init_features, kernel_size=3, padding=1, bias=False),
                )
            ]
        else:
            raise ValueError(f"stem must be 'imagenet' or 'cifar', got {stem!r}")
        self.features = nn.Sequential(OrderedDict(layers))

        num_features = num_init_features
        for i, num_layers in enumerate(block_config):
            block = _DenseBlock(
                num_layers,
                num_features,
                bn_size=bn_size,
                growth_rate=growth_rate,
                drop_rate=drop_rate,
                norm_layer=norm_layer,
                memory_efficient=memory_efficient,
            )
            self.features.add_module(f"denseblock{i + 1}", block)
            num_features += num_layers * growth_rate
            if i != len(block_config) - 1:
                out_features = int(num_features * compression)
                self.features.add_module(
                    f"transition{i + 1}", _Transition(num_features, out_features, norm_layer)
                )
                num_features = out_features
        # Pre-activation layers leave the last block un-normalised; torchvision calls this norm5.
        # Its ReLU is a module of `features` (torchvision applies F.relu in forward), so that the
        # norm can absorb it; `features` thus returns activated maps, fused or not.
        norm5, relu5 = norm_and_activation(norm_layer, num_features, nn.ReLU(inplace=True))
        self.features.add_module("norm5", norm5)
        self.features.add_module("relu5", relu5)

        self.classifier = nn.Linear(num_features, num_classes)
        self._init_weights()
        standardize_conv_weights(self)  # norm.weight_standardization=true

    def _init_weights(self) -> None:
        # torchvision's init, for any registered norm: some have no weight, or keep it as a buffer.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight)
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)
            elif is_norm_layer(m):
                weight, bias = getattr(m, "weight", None), getattr(m, "bias", None)
                if isinstance(weight, nn.Parameter):
                    nn.init.ones_(weight)
                if isinstance(bias, nn.Parameter):
                    nn.init.zeros_(bias)

    def forward(self, x: Tensor) -> Tensor:
        x = torch.flatten(F.adaptive_avg_pool2d(self.features(x), 1), 1)
        return self.classifier(x)


class DenseNetOptions(TypedDict, total=False):
    """Keyword arguments the named constructors pass on to :class:`DenseNet`."""

    num_classes: int
    norm: NormSpec
    in_channels: int
    drop_rate: float
    memory_efficient: bool


# torchvision's ImageNet variants: growth rate, layers per block, stem channels.
_IMAGENET_VARIANTS: dict[int, tuple[int, tuple[int, ...], int]] = {
    121: (32, (6, 12, 24, 16), 64),
    161: (48, (6, 12, 36, 24), 96),
    169: (32, (6, 12, 32, 32), 64),
    201: (32, (6, 12, 48, 32), 64),
}


def _imagenet_densenet(depth: int, options: DenseNetOptions) -> DenseNet:
    growth_rate, block_config, num_init_features = _IMAGENET_VARIANTS[depth]
    return DenseNet(growth_rate, block_config, num_init_features, **options)


def densenet121(**options: Unpack[DenseNetOptions]) -> DenseNet:
    """DenseNet-121 (k=32), torchvision layout; 8.0 M parameters."""
    return _imagenet_densenet(121, options)


def densenet161(**options: Unpack[DenseNetOptions]) -> DenseNet:
    """DenseNet-161 (k=48), torchvision layout; 28.7 M parameters."""
    return _imagenet_densenet(161, options)


def densenet169(**options: Unpack[DenseNetOptions]) -> DenseNet:
    """DenseNet-169 (k=32), torchvision layout; 14.1 M parameters."""
    return _imagenet_densenet(169, options)


def densenet201(**options: Unpack[DenseNetOptions]) -> DenseNet:
    """DenseNet-201 (k=32), torchvision layout; 20.0 M parameters."""
    return _imagenet_densenet(201, options)


def densenet_bc(
    depth: int = 100, growth_rate: int = 12, **options: Unpack[DenseNetOptions]
) -> DenseNet:
    """CIFAR DenseNet-BC of a given depth: 3 blocks of (depth − 4) / 6 bottleneck layers, a 3×3
    stem of 2k channels, compression 0.5 (depth 40: 176,122 params at 10 classes)."""
    layers, remainder = divmod(depth - 4, 6)
    if remainder or layers < 1:
        raise ValueError(f"DenseNet-BC depth must be 6n + 4 with n >= 1, got {depth}")
    options = {"num_classes": 10, **options}
    return DenseNet(growth_rate, (layers,) * 3, 2 * growth_rate, stem="cifar", **options)


def densenet_bc_100(**options: Unpack[DenseNetOptions]) -> DenseNet:
    """CIFAR DenseNet-BC, depth 100, k=12: 3 blocks of 16 bottleneck layers (769,162 params at
    10 classes, the default here)."""
    return densenet_bc(100, 12, **options)
