"""Norms published as fixes for BatchNorm at small batches: Batch Renormalization, Ghost BN,
Filter Response Normalization + TLU, EvoNorm-B0/S0 and a channels-first RMSNorm.

Each follows its paper's equations exactly (``tests/norm/test_small_batch_norms.py`` restates them
in float64). timm has FRN and EvoNorm layers, but they compute their statistics in float32 even
for float64 input, take 4-D input only, have no learnable FRN epsilon, no cumulative-average
momentum and no fixed group count for EvoNorm-S0 other than 32; so these are our own.

``BatchRenorm2d`` and ``GhostBatchNorm2d`` are ``nn.BatchNorm2d`` subclasses: same buffers and
state dict, BN's eval-mode forward (so they fold into convolutions), only training differs; their
statistics stay per process under ``trainer.sync_batchnorm`` (their traits do not sync). They
and EvoNorm-B0 keep their running statistics with ``normlab.ops.bn_stats``, as every BatchNorm
here does (same step count, Bessel correction and running-average update).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from normlab.norm.builtin import GROUP_RANGES, resolve_num_groups
from normlab.norm.registry import register_norm
from normlab.norm.traits import NormTraits
from normlab.ops.bn_stats import (
    count_training_step,
    step_momentum,
    unbiased_variance,
    update_running_average,
    update_running_stats,
)
from normlab.ranges import COUNT, NON_NEGATIVE, ArgumentError, ValueRange

# Activations an EvoNorm or FRN + TLU takes the place of. These layers are norm *and*
# activation in one (their papers replace BN + ReLU with them), so a model's ReLU after them
# would be a second nonlinearity the paper does not have.
_RECTIFIERS: tuple[type[nn.Module], ...] = (nn.ReLU, nn.LeakyReLU)
_EVONORM_REPLACES: tuple[type[nn.Module], ...] = (*_RECTIFIERS, nn.SiLU)


def _per_channel(tensor: Tensor, ndim: int) -> Tensor:
    """A C-vector shaped to broadcast against an N×C×… tensor of ``ndim`` dimensions."""
    return tensor.view(1, -1, *([1] * (ndim - 2)))


class BatchRenorm2d(nn.BatchNorm2d):
    """Batch Renormalization (Ioffe, 2017).

    Training: ``x̂ = (x − μ_B)/σ_B · r + d`` with ``r = clip(σ_B/σ, 1/r_max, r_max)`` and
    ``d = clip((μ_B − μ)/σ, −d_max, d_max)`` held constant in the backward pass; ``μ_B`` and
    ``σ_B = sqrt(var_B + eps)`` are the batch's (biased variance), ``μ`` and
    ``σ = sqrt(running_var + eps)`` the running statistics before this step's update; then
    ``γ·x̂ + β``. The running statistics are updated exactly as BN updates them. Eval: BN's.

    Schedule: with ``t`` the training steps taken before this one (``num_batches_tracked``), the
    limits in force are ``1 + (r_max − 1)·p`` and ``d_max·p`` with
    ``p = clip((t − warmup_steps)/ramp_steps, 0, 1)`` (``ramp_steps=0``: a jump from 0 to 1 at
    ``warmup_steps``). So the first ``warmup_steps`` steps are plain BN (r = 1, d = 0), and the
    limits reach their final values ``ramp_steps`` steps later.
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        r_max: float = 3.0,
        d_max: float = 5.0,
        warmup_steps: int = 100,
        ramp_steps: int = 400,
    ) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats=True)
        self.r_max, self.d_max = r_max, d_max
        self.warmup_steps, self.ramp_steps = warmup_steps, ramp_steps

    def current_limits(self) -> tuple[float, float]:
        """The ``(r_max, d_max)`` the next training step uses, after warm-up and ramp."""
        steps_taken = int(self.num_batches_tracked)
        if self.ramp_steps > 0:
            progress = min(max((steps_taken - self.warmup_steps) / self.ramp_steps, 0.0), 1.0)
        else:
            progress = float(steps_taken >= self.warmup_steps)
        return 1.0 + (self.r_max - 1.0) * progress, self.d_max * progress

    def forward(self, x: Tensor) -> Tensor:
        if not self.training:
            return super().forward(x)
        self._check_input_dim(x)
        dims = [0, *range(2, x.dim())]
        var, mean = torch.var_mean(x, dims, correction=0)
        std = torch.sqrt(var + self.eps)
        with torch.no_grad():
            r_max, d_max = self.current_limits()
            running_std = torch.sqrt(self.running_var + self.eps)
            r = (std / running_std).clamp(1.0 / r_max, r_max)
            d = ((mean - self.running_mean) / running_std).clamp(-d_max, d_max)
            unbiased = unbiased_variance(var, x.numel() // x.shape[1])
            update_running_stats(
                self.running_mean, self.running_var, mean, unbiased, step_momentum(self)
            )
        # γ·((x − μ_B)/σ_B·r + d) + β as one scale and shift per channel; r and d are constants.
        scale = r / std
        shift = d - mean * scale
        if self.affine:
            scale, shift = scale * self.weight, shift * self.weight + self.bias
        return torch.addcmul(_per_channel(shift, x.dim()), x, _per_channel(scale, x.dim()))

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, r_max={self.r_max}, d_max={self.d_max}, "
            f"warmup_steps={self.warmup_steps}, ramp_steps={self.ramp_steps}"
        )


class GhostBatchNorm2d(nn.BatchNorm2d):
    """Ghost Batch Normalization (Hoffer et al., 2017).

    Training: the batch is split into consecutive chunks of ``virtual_batch_size`` samples (the
    last one holds the remainder and may be smaller; a remainder with a single value per channel,
    one sample of a 1×1 map, joins the chunk before it, since it has no variance of its own), and
    each chunk is normalised with its own statistics, as BN would normalise it alone. The running statistics are updated once per
    forward, with BN's momentum, from: the batch mean (the size-weighted mean of the chunk means)
    and the pooled within-chunk variance ``Σ_k n_k·var_k / Σ_k (n_k − 1)`` (``var_k`` biased,
    ``n_k`` values per channel in chunk k), the unbiased estimate of the variance each chunk is
    normalised with. With one chunk (``virtual_batch_size`` ≥ batch) this is exactly BN. Eval: BN's.
    """

    def __init__(
        self,
        num_features: int,
        virtual_batch_size: int = 32,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
    ) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats=True)
        self.virtual_batch_size = virtual_batch_size

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or x.shape[0] <= self.virtual_batch_size:
            return super().forward(x)
        self._check_input_dim(x)
        dims = [0, *range(2, x.dim())]
        outputs, means, variances, counts = [], [], [], []
        for chunk in x.split(self._chunk_sizes(x)):
            count = chunk.numel() // chunk.shape[1]
            var, mean = torch.var_mean(chunk, dims, correction=0)
            scale = torch.rsqrt(var + self.eps)
            shift = -mean * scale
            if self.affine:
                scale, shift = scale * self.weight, shift * self.weight + self.bias
            ndim = x.dim()
            outputs.append(
                torch.addcmul(_per_channel(shift, ndim), chunk, _per_channel(scale, ndim))
            )
            means.append(mean.detach())
            variances.append(var.detach())
            counts.append(count)
        self._update_running_statistics(means, variances, counts)
        return torch.cat(outputs)

    def _chunk_sizes(self, x: Tensor) -> list[int]:
        full, remainder = divmod(x.shape[0], self.virtual_batch_size)
        sizes = [self.virtual_batch_size] * full
        if remainder * (x[0, 0].numel()) > 1:
            sizes.append(remainder)
        elif remainder:
            sizes[-1] += remainder
        return sizes

    @torch.no_grad()
    def _update_running_statistics(
        self, means: list[Tensor], variances: list[Tensor], counts: list[int]
    ) -> None:
        total = sum(counts)
        mean = sum(n * m for n, m in zip(counts, means, strict=True)) / total
        pooled = sum(n * v for n, v in zip(counts, variances, strict=True)) / (total - len(counts))
        update_running_stats(self.running_mean, self.running_var, mean, pooled, step_momentum(self))

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, virtual_batch_size={self.virtual_batch_size}"


class FilterResponseNorm2d(nn.Module):
    """Filter Response Normalization with a Thresholded Linear Unit (Singh & Krishnan, 2020).

    ``ν² = mean over the spatial axes of x²``; ``y = max(γ·x/sqrt(ν² + ε) + β, τ)`` with a learned
    per-channel threshold ``τ`` (``tlu=False`` drops the max). ``ε = |eps|``, or with
    ``learnable_eps`` ``|eps| + |ε_l|`` with a learned scalar ``ε_l`` (initialised to 1e-4, our
    choice: at 0 the gradient of ``|ε_l|`` is 0 and it would never move). No batch dependence:
    training and eval compute the same. With TLU it is the paper's replacement for BN + ReLU and
    takes over a following ReLU / LeakyReLU (:meth:`absorb_activation`) instead of stacking one.
    """

    def __init__(
        self, num_features: int, eps: float = 1e-6, learnable_eps: bool = False, tlu: bool = True
    ) -> None:
        super().__init__()
        if eps == 0 and not learnable_eps:
            raise ArgumentError("eps", eps, "frn: {key}=0 divides by zero on an all-zero map; use "
                                "eps > 0 or learnable_eps=true")  # fmt: skip
        self.num_features, self.eps = num_features, eps
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))
        self.tau = nn.Parameter(torch.zeros(num_features)) if tlu else None
        self.learned_eps = nn.Parameter(torch.full((1,), 1e-4)) if learnable_eps else None

    def forward(self, x: Tensor) -> Tensor:
        nu2 = x.square().mean(dim=tuple(range(2, x.dim())), keepdim=True)
        eps = abs(self.eps) if self.learned_eps is None else abs(self.eps) + self.learned_eps.abs()
        ndim = x.dim()
        y = torch.addcmul(
            _per_channel(self.bias, ndim),
            x * torch.rsqrt(nu2 + eps),
            _per_channel(self.weight, ndim),
        )
        return y if self.tau is None else torch.maximum(y, _per_channel(self.tau, ndim))

    def absorb_activation(self, activation: nn.Module) -> bool:
        """TLU is this layer's rectifier: a following ReLU / LeakyReLU is dropped, not stacked."""
        return self.tau is not None and isinstance(activation, _RECTIFIERS)

    def extra_repr(self) -> str:
        return (
            f"{self.num_features}, eps={self.eps}, learnable_eps={self.learned_eps is not None}, "
            f"tlu={self.tau is not None}"
        )


class EvoNormB0(nn.Module):
    """EvoNorm-B0 (Liu et al., 2020): ``y = x / max(sqrt(var_B + eps), v⊙x + sqrt(var_HW + eps))
    · γ + β``, ``var_B`` the biased variance over N and the spatial axes per channel (in eval its
    running average, kept as BN keeps ``running_var``: same momentum, unbiased), ``var_HW`` the
    biased variance over the spatial axes per sample and channel. It is a norm and an activation
    in one and takes over the ReLU / LeakyReLU / SiLU a model puts after it."""

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1) -> None:
        super().__init__()
        self.num_features, self.eps, self.momentum = num_features, eps, momentum
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))
        self.v = nn.Parameter(torch.ones(num_features))
        self.register_buffer("running_var", torch.ones(num_features))
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long))

    def forward(self, x: Tensor) -> Tensor:
        ndim = x.dim()
        spatial = tuple(range(2, ndim))
        if self.training:
            batch_var = x.var(dim=(0, *spatial), correction=0)
            update_running_average(
                self.running_var,
                unbiased_variance(batch_var.detach(), x.numel() // x.shape[1]),
                count_training_step(self.num_batches_tracked, self.momentum),
            )
        else:
            batch_var = self.running_var
        instance_std = torch.sqrt(x.var(dim=spatial, correction=0, keepdim=True) + self.eps)
        batch_std = _per_channel(torch.sqrt(batch_var + self.eps), ndim)
        denominator = torch.maximum(batch_std, x * _per_channel(self.v, ndim) + instance_std)
        return torch.addcmul(
            _per_channel(self.bias, ndim), x / denominator, _per_channel(self.weight, ndim)
        )

    def absorb_activation(self, activation: nn.Module) -> bool:
        return isinstance(activation, _EVONORM_REPLACES)

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}, momentum={self.momentum}"


class EvoNormS0(nn.Module):
    """EvoNorm-S0 (Liu et al., 2020): ``y = x·sigmoid(v⊙x) / sqrt(var_group(x) + eps) · γ + β``,
    ``var_group`` the biased variance of each sample's group of channels over the group's channels
    and the spatial axes. The groups are chosen as ``gn`` chooses them (``num_groups``, or
    ``group_size``, or the largest divisor of the channels up to ``max_groups``). No batch
    dependence. A norm and an activation in one: takes over the ReLU / LeakyReLU / SiLU a model
    puts after it."""

    def __init__(
        self,
        num_features: int,
        num_groups: int | None = None,
        group_size: int | None = None,
        max_groups: int = 32,
        eps: float = 1e-5,
    ) -> None:
        super().__init__()
        self.num_features, self.eps = num_features, eps
        self.num_groups = resolve_num_groups(
            num_features, num_groups, group_size, max_groups, norm="evonorm_s0"
        )
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))
        self.v = nn.Parameter(torch.ones(num_features))

    def forward(self, x: Tensor) -> Tensor:
        ndim = x.dim()
        batch = x.shape[0]
        grouped_var = x.reshape(batch, self.num_groups, -1).var(dim=-1, correction=0, keepdim=True)
        gated = x * torch.sigmoid(x * _per_channel(self.v, ndim))
        normalised = gated.reshape(batch, self.num_groups, -1) / torch.sqrt(grouped_var + self.eps)
        return torch.addcmul(
            _per_channel(self.bias, ndim), normalised.view_as(x), _per_channel(self.weight, ndim)
        )

    def absorb_activation(self, activation: nn.Module) -> bool:
        return isinstance(activation, _EVONORM_REPLACES)

    def extra_repr(self) -> str:
        return f"{self.num_features}, num_groups={self.num_groups}, eps={self.eps}"


class RMSNorm2d(nn.RMSNorm):
    """RMSNorm over the channels of each position of an N×C×… tensor (no mean subtraction):
    ``y = x / sqrt(mean_C(x²) + eps) · γ``. The channels-first counterpart of ``nn.RMSNorm`` as
    ``LayerNorm2d`` is of ``nn.LayerNorm``; same parameter name (``weight``)."""

    def __init__(self, num_features: int, eps: float = 1e-6, affine: bool = True) -> None:
        super().__init__(num_features, eps=eps, elementwise_affine=affine)

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x.movedim(1, -1)).movedim(-1, 1)


# -- registry entries: the classes (their defaults equal conf/norm/<name>.yaml) -------------------

_STEPS = ValueRange(low=0, integer=True)
# BN's statistics and eval-mode forward, so they fold; training is not BN's, so syncing them as BN
# would change what they compute: they stay per process.
_BN_IN_EVAL = NormTraits(batch_statistics=True, running_statistics=True, why_not_folded=None)
register_norm(
    "brn",
    ranges={"r_max": ValueRange(low=1), "d_max": NON_NEGATIVE, "warmup_steps": _STEPS,
            "ramp_steps": _STEPS},
    traits=_BN_IN_EVAL,
)(BatchRenorm2d)  # fmt: skip
register_norm("ghost_bn", ranges={"virtual_batch_size": COUNT}, traits=_BN_IN_EVAL)(
    GhostBatchNorm2d
)
# FRN takes |eps|, so any eps is allowed but a NaN; 0 only with a learned epsilon on top.
register_norm(
    "frn",
    ranges={"eps": ValueRange()},
    traits=NormTraits(
        why_not_folded="FRN normalises each sample with its own statistics (and TLU is a max), "
        "even at inference",
        absorbs_activation=True,
    ),
)(FilterResponseNorm2d)
register_norm(
    "evonorm_b0",
    traits=NormTraits(
        batch_statistics=True,
        why_not_folded="EvoNorm-B0 divides by a per-sample max of two statistics, not an affine "
        "map at inference",
        absorbs_activation=True,
    ),
)(EvoNormB0)
register_norm(
    "evonorm_s0",
    ranges=GROUP_RANGES,
    traits=NormTraits(
        why_not_folded="EvoNorm-S0 normalises each sample with its own group statistics, even "
        "at inference",
        absorbs_activation=True,
    ),
)(EvoNormS0)
register_norm(
    "rms",
    traits=NormTraits(
        channels="normalized_shape",
        why_not_folded="RMSNorm normalises each position with its own statistics, even at "
        "inference",
    ),
)(RMSNorm2d)
