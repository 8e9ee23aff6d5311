"""Norms published as fixes for BatchNorm at small batches: Batch Renormalization, Ghost BN,
Filter Response Normalization + TLU, EvoNorm-B0/S0 and a channels-first RMSNorm.

Each follows its paper's equations exactly (``tests/norm/test_small_batch_norms.py`` restates them
in float64). timm has FRN and EvoNorm layers, but they compute their statistics in float32 even
for float64 input, take 4-D input only, have no learnable FRN epsilon, no cumulative-average
momentum and no fixed group count for EvoNorm-S0 other than 32; so these are our own.

Their training passes are as cheap as we could make them in eager PyTorch: brn runs ATen's
BatchNorm kernel with its r and d folded into the affine weights, ghost_bn ATen's BatchNorm per
virtual batch, the others a hand-derived backward pass (``normlab.ops.norm_functions``, by
chunks of samples that stay in cache; EvoNorm's and FRN's float32 CPU passes in fused C loops,
``normlab.ops.cpu_kernels``); all save only the input and its statistics.
Statistics are float32 under bf16 autocast; every forward compiles as one graph.

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
from normlab.ops.norm_functions import (
    ChannelRMSNorm,
    ChunkedBatchNorm,
    EvoNormB0Function,
    EvoNormS0Function,
    FilterResponseNorm,
    compute_dtype,
    variance_mean,
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
        r_limit, d_limit = self._limits()
        return float(r_limit), float(d_limit)

    def _limits(self) -> tuple[Tensor, Tensor]:
        # Tensors, not Python numbers: reading the step count as an int would be a graph break
        # (or a recompile per step) under torch.compile.
        steps_taken = self.num_batches_tracked.to(self.running_var.dtype)
        if self.ramp_steps > 0:
            progress = ((steps_taken - self.warmup_steps) / self.ramp_steps).clamp(0.0, 1.0)
        else:
            progress = (steps_taken >= self.warmup_steps).to(steps_taken.dtype)
        return 1.0 + (self.r_max - 1.0) * progress, self.d_max * progress

    def forward(self, x: Tensor) -> Tensor:
        if not self.training:
            return super().forward(x)
        self._check_input_dim(x)
        with torch.no_grad():
            stats_input = x.to(compute_dtype(x))
            var, mean = variance_mean(stats_input, [0, *range(2, x.dim())])
            r_limit, d_limit = self._limits()
            running_std = torch.sqrt(self.running_var + self.eps)
            r = (torch.sqrt(var + self.eps) / running_std).clamp(1.0 / r_limit, r_limit)
            d = ((mean - self.running_mean) / running_std).clamp(-d_limit, d_limit)
            unbiased = unbiased_variance(var, x.numel() // x.shape[1])
            update_running_stats(
                self.running_mean, self.running_var, mean, unbiased, step_momentum(self)
            )
        # γ·(x̂·r + d) + β is BN's γ'·x̂ + β' with γ' = γ·r and β' = γ·d + β (r, d constants),
        # so ATen's BatchNorm kernel computes it, batch statistics and backward included.
        weight, bias = (
            (self.weight * r, torch.addcmul(self.bias, self.weight, d)) if self.affine else (r, d)
        )
        return torch.batch_norm(
            x, weight, bias, None, None, True, 0.0, self.eps, torch.backends.cudnn.enabled
        )

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
        sizes = self._chunk_sizes(x)
        y, means, variances = ChunkedBatchNorm.apply(x, self.weight, self.bias, sizes, self.eps)
        counts = torch.tensor(sizes, dtype=means.dtype, device=means.device)[:, None]
        counts = counts * (x[0, 0].numel())
        with torch.no_grad():
            mean = (means * counts).sum(0) / counts.sum()
            pooled = (variances * counts).sum(0) / (counts.sum() - len(sizes))
            update_running_stats(
                self.running_mean, self.running_var, mean, pooled, step_momentum(self)
            )
        return y

    def _chunk_sizes(self, x: Tensor) -> tuple[int, ...]:
        full, remainder = divmod(x.shape[0], self.virtual_batch_size)
        sizes = [self.virtual_batch_size] * full
        if remainder * (x[0, 0].numel()) > 1:
            sizes.append(remainder)
        elif remainder:
            sizes[-1] += remainder
        return tuple(sizes)

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
        eps = abs(self.eps) if self.learned_eps is None else abs(self.eps) + self.learned_eps.abs()
        return FilterResponseNorm.apply(x, self.weight, self.bias, self.tau, eps)

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
        running_var = None if self.training else self.running_var
        y, batch_var = EvoNormB0Function.apply(
            x, self.weight, self.bias, self.v, running_var, self.eps
        )
        if self.training:
            update_running_average(
                self.running_var,
                unbiased_variance(batch_var, x.numel() // x.shape[1]),
                count_training_step(self.num_batches_tracked, self.momentum),
            )
        return y

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
        return EvoNormS0Function.apply(x, self.weight, self.bias, self.v, self.num_groups, self.eps)

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
        return ChannelRMSNorm.apply(x, self.weight, self.eps)


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
