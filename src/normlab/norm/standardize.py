"""Weight Standardization (Qiao et al., 2019; BiT's WS + GN): ``norm.weight_standardization=true``.

Not a norm but a switch on any norm spec: every convolution whose output feeds a norm built from
that spec computes with its weight standardised per output channel,
``Ŵ = (W − mean(W)) / sqrt(var(W) + eps)`` (mean and biased variance over the channel's
input channels and kernel), through ``torch.nn.utils.parametrize``. The stored parameter stays
the raw ``W`` (state dict key ``<conv>.parametrizations.weight.original``).

How a convolution is found to feed a norm: the spec's factory marks every norm it builds (with
:data:`MARK`), and
:func:`standardize_conv_weights` (which each model calls at the end of its constructor, and
``convert_norms`` calls after converting) takes the child registered right before each marked
norm in the same parent if it is a convolution. That is the conv → norm pattern of every
normlab model (``nn.Sequential(conv, norm, ...)``, ``conv1``/``bn1`` attribute pairs); the
tests check for each model family that each such convolution's output is its norm's input.

At inference the standardised weight is a constant: ``bake_standardized_weights`` replaces the
parametrization by the weight it computes (``fold_norms`` does this on its copy before folding;
``normlab.export`` traces the parametrized network as it is when it does not fold).
"""

from __future__ import annotations

from itertools import pairwise

import torch
from torch import Tensor, nn
from torch.nn.modules.conv import _ConvNd, _ConvTransposeNd
from torch.nn.utils import parametrize

from normlab.errors import ConfigError

SPEC_KEY = "weight_standardization"
# Small next to the variance of any initialised conv weight (≥ ~1e-5 for fan-in ≤ 10^5).
EPS = 1e-6
# Set on each norm built from a spec with the switch on (normlab.norm.registry).
MARK = "_normlab_standardizes_input_conv"


class StandardizedWeight(nn.Module):
    """The parametrization: a conv weight standardised per output channel."""

    def __init__(self, transposed: bool, groups: int, eps: float = EPS) -> None:
        super().__init__()
        self.transposed, self.groups, self.eps = transposed, groups, eps

    def forward(self, weight: Tensor) -> Tensor:
        if not self.transposed:  # out × in/groups × kernel: one output channel per row
            return self._standardize(weight, tuple(range(1, weight.dim())))
        # Transposed: in × out/groups × kernel; output channel j of group g reads the rows of
        # group g in column j.
        in_channels = weight.shape[0]
        grouped = weight.reshape(self.groups, in_channels // self.groups, *weight.shape[1:])
        dims = (1, *range(3, grouped.dim()))
        return self._standardize(grouped, dims).reshape(weight.shape)

    def _standardize(self, weight: Tensor, dims: tuple[int, ...]) -> Tensor:
        # Two passes (mean, then squared deviations) instead of torch.var_mean, whose Welford
        # reduction made forward + backward ~2x slower on CPU (7.4 against 4.2 ms, 256×256×3×3).
        centred = weight - weight.mean(dims, keepdim=True)
        var = centred.square().mean(dims, keepdim=True)
        return centred * torch.rsqrt(var + self.eps)

    def extra_repr(self) -> str:
        return f"eps={self.eps}"


def is_standardized(conv: nn.Module) -> bool:
    return parametrize.is_parametrized(conv, "weight") and any(
        isinstance(p, StandardizedWeight) for p in conv.parametrizations["weight"]
    )


def standardize_conv_weights(model: nn.Module) -> list[str]:
    """Standardise the weight of the convolution before every marked norm of ``model`` (in
    place; a convolution already standardised is left as it is). Returns the names of the
    convolutions standardised by this call."""
    names = {module: name for name, module in model.named_modules()}
    standardized = []
    for parent in model.modules():
        children = list(parent._modules.values())
        for before, norm in pairwise(children):
            if not getattr(norm, MARK, False) or not isinstance(before, _ConvNd):
                continue
            if is_standardized(before):
                continue
            transposed = isinstance(before, _ConvTransposeNd)
            parametrize.register_parametrization(
                before, "weight", StandardizedWeight(transposed, before.groups)
            )
            standardized.append(names[before])
    return standardized


def bake_standardized_weights(model: nn.Module) -> int:
    """Replace every weight standardization in ``model`` by the weight it computes now (in place);
    returns how many convolutions had one.

    Not ``parametrize.remove_parametrizations``: it deletes the property from the module's
    parametrized class, which a ``copy.deepcopy`` of the model shares with the original (so
    baking a copy, as ``fold_norms`` does, would break the original)."""
    baked = 0
    for module in model.modules():
        if not (isinstance(module, _ConvNd) and is_standardized(module)):
            continue
        if len(module.parametrizations) > 1 or len(module.parametrizations["weight"]) > 1:
            raise ConfigError(
                f"{type(module).__name__} has parametrizations besides weight standardization; "
                "remove them before folding or exporting"
            )
        original = module.parametrizations["weight"].original
        with torch.no_grad():
            weight = nn.Parameter(module.weight.clone(), requires_grad=original.requires_grad)
        del module._modules["parametrizations"]
        # parametrize swapped in a subclass of the conv's own class; its parent is that class.
        module.__class__ = type(module).__bases__[0]
        module.weight = weight
        baked += 1
    return baked
