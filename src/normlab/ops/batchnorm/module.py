"""``CudaBatchNorm``: ``nn.BatchNorm2d``'s semantics on our Triton kernels (``norm=cuda_bn``)."""

from __future__ import annotations

import math
from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn

from normlab.ops.batchnorm import ops
from normlab.ops.batchnorm.kernels import ACTIVATIONS, INTERPRETED
from normlab.ops.batchnorm.reference import activate, batch_norm_reference
from normlab.ops.bn_stats import step_momentum
from normlab.ops.sync_collectives import sync_batch_norm as torch_sync_batch_norm
from normlab.ops.sync_collectives import sync_group
from normlab.ranges import ArgumentError

BACKENDS = ("auto", "triton", "reference")

# The activation modules a CudaBatchNorm can take over from the model (see ``absorb_activation``).
_FUSABLE = {nn.ReLU: "relu", nn.LeakyReLU: "leaky_relu", nn.SiLU: "silu"}


def _activate_in_place(y: Tensor, activation: str | None, negative_slope: float) -> Tensor:
    # In place is safe here: native BN keeps its input, not its output, for backward.
    if activation == "relu":
        return F.relu(y, inplace=True)
    if activation == "leaky_relu":
        return F.leaky_relu(y, negative_slope, inplace=True)
    if activation == "silu":
        return F.silu(y, inplace=True)
    return y


class CudaBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm (N×C×* input, any of 2-D to 5-D) with an optional fused activation.

    Parameters and buffers are BatchNorm's, so state dicts move between ``bn``, ``syncbn`` and
    ``cuda_bn`` both ways; training/eval semantics (momentum, ``momentum=None``, unbiased running
    variance, ``track_running_stats``, ``affine``) are ``nn.BatchNorm2d``'s.

    Args:
        activation: ``relu``, ``leaky_relu`` (``negative_slope``) or ``silu`` applied to the
            output inside the kernel, or None.
        fuse_activation: let models hand over the activation that follows this norm
            (:meth:`absorb_activation`, used by the registry's norm+activation hook).
        sync: batch statistics over all processes (or blocks of ``group_size`` consecutive
            ranks; or pass a ``process_group``) in training, as SyncBatchNorm.
        backend: ``auto`` (Triton kernels for CUDA tensors, PyTorch's native BN for CPU tensors,
            so CPU training is not slowed), ``triton`` (always the kernels; CPU tensors need
            ``TRITON_INTERPRET=1`` set before normlab is imported) or ``reference`` (plain
            PyTorch, the readable specification).
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        activation: str | None = None,
        negative_slope: float = 0.01,
        fuse_activation: bool = True,
        sync: bool = False,
        group_size: int | None = None,
        backend: str = "auto",
        process_group: Any = None,
        device: Any = None,
        dtype: Any = None,
    ) -> None:
        super().__init__(
            num_features, eps, momentum, affine, track_running_stats, device=device, dtype=dtype
        )
        if activation not in ACTIVATIONS:
            allowed = ", ".join(name for name in ACTIVATIONS if name)
            raise ArgumentError(
                "activation", activation, f"{{key}}={activation!r} is not one of: {allowed}, null"
            )
        if backend not in BACKENDS:
            raise ArgumentError(
                "backend", backend, f"{{key}}={backend!r} is not one of: {', '.join(BACKENDS)}"
            )
        if group_size is not None and group_size < 1:
            raise ArgumentError(
                "group_size", group_size, f"{{key}} must be a positive integer, got {group_size}"
            )
        self.activation = activation
        self.negative_slope = negative_slope
        self.fuse_activation = fuse_activation
        self.sync = sync
        self.group_size = group_size
        self.backend = backend
        self.process_group = process_group

    def absorb_activation(self, activation: nn.Module) -> bool:
        """Take over ``activation`` (ReLU, LeakyReLU, SiLU) that the model applies right after
        this norm; the caller then drops its own module. False if it cannot or may not."""
        name = _FUSABLE.get(type(activation))
        if name is None or not self.fuse_activation or self.activation is not None:
            return False
        self.activation = name
        if name == "leaky_relu":
            self.negative_slope = activation.negative_slope
        return True

    def fused_activation(self) -> nn.Module | None:
        """The activation this layer applies to its output, as a module (None if none)."""
        if self.activation is None:
            return None
        if self.activation == "leaky_relu":
            return nn.LeakyReLU(self.negative_slope)
        return {"relu": nn.ReLU, "silu": nn.SiLU}[self.activation]()

    def to_synchronised(self, group_size: int | None = None) -> CudaBatchNorm:
        """Lightning's ``sync_batchnorm=True`` (``NormSync``): the same layer with sync on."""
        self._unsynchronised = (self.sync, self.group_size)
        self.sync, self.group_size = True, group_size
        return self

    def to_unsynchronised(self) -> CudaBatchNorm:
        """Undo :meth:`to_synchronised`."""
        self.sync, self.group_size = getattr(self, "_unsynchronised", (False, None))
        return self

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def _sync_group(self) -> Any:
        return sync_group(self.process_group, self.group_size) if self.sync else None

    def _resolved_backend(self, x: Tensor) -> str:
        if self.backend == "auto":
            return "triton" if x.is_cuda else "native"
        if self.backend == "triton" and not x.is_cuda and not INTERPRETED:
            raise RuntimeError(
                "cuda_bn backend=triton got a CPU tensor: the Triton kernels need a CUDA device, "
                "or TRITON_INTERPRET=1 set before normlab is imported (slow; meant for tests). "
                "Use norm.backend=auto to run PyTorch's BN on CPU."
            )
        return self.backend

    def forward(self, input: Tensor) -> Tensor:
        self._check_input_dim(input)
        momentum = step_momentum(self)
        # As nn.BatchNorm2d: batch statistics in training, and in eval without running ones.
        use_batch_stats = self.training or (self.running_mean is None and self.running_var is None)
        running_mean = self.running_mean if not self.training or self.track_running_stats else None
        running_var = self.running_var if not self.training or self.track_running_stats else None
        backend = self._resolved_backend(input)
        act = (self.activation, self.negative_slope)

        group = self._sync_group() if self.training else None
        if group is not None:
            if backend == "triton":
                return ops.sync_batch_norm(
                    input, self.weight, self.bias, running_mean, running_var, momentum,
                    self.eps, *act, group,
                )  # fmt: skip
            y = torch_sync_batch_norm(
                input, self.weight, self.bias, running_mean, running_var, momentum, self.eps, group
            )
            return activate(y, *act)

        if use_batch_stats and input.shape[0] * math.prod(input.shape[2:]) == 1:
            raise ValueError(
                f"Expected more than 1 value per channel when training, got input size "
                f"{input.size()}"
            )
        if backend == "native":
            y = F.batch_norm(
                input, running_mean, running_var, self.weight, self.bias, use_batch_stats,
                momentum, self.eps,
            )  # fmt: skip
            return _activate_in_place(y, *act)
        if backend == "reference":
            return batch_norm_reference(
                input, self.weight, self.bias, running_mean, running_var, use_batch_stats,
                momentum, self.eps, *act,
            )  # fmt: skip
        return ops.batch_norm(
            input, self.weight, self.bias, running_mean, running_var, use_batch_stats, momentum,
            self.eps, *act,
        )  # fmt: skip

    def extra_repr(self) -> str:
        extra = f"{super().extra_repr()}, backend={self.backend}"
        if self.activation is not None:
            extra += f", activation={self.activation}"
        if self.sync:
            extra += f", sync=True, group_size={self.group_size}"
        return extra
