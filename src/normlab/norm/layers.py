"""Norm layers that torch does not provide in the form the registry needs."""

from __future__ import annotations

from torch import nn


class NoNorm(nn.Identity):
    """Identity that remembers its channel count, so `convert_norms` can turn it back into a norm."""

    def __init__(self, num_features: int) -> None:
        super().__init__()
        self.num_features = num_features

    def extra_repr(self) -> str:
        return str(self.num_features)
