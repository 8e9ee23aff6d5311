"""Norm layers that torch does not provide in the form the registry needs."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channel axis of an N×C×H×W tensor, independently at every pixel.

    This is ConvNeXt's "channels-first" LayerNorm. It is not GroupNorm(1, C), which would also
    normalise over H and W.
    """

    def __init__(self, num_channels: int, eps: float = 1e-6, affine: bool = True) -> None:
        super().__init__(num_channels, eps=eps, elementwise_affine=affine)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 2, 3, 1)
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class NoNorm(nn.Identity):
    """Identity that remembers its channel count, so `convert_norms` can turn it back into a norm."""

    def __init__(self, num_features: int) -> None:
        super().__init__()
        self.num_features = num_features

    def extra_repr(self) -> str:
        return str(self.num_features)
