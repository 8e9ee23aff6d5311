"""Synchronised BatchNorm that works on every backend (gloo on CPU, NCCL on CUDA).

torch's ``nn.SyncBatchNorm`` refuses CPU tensors whenever a process group exists, so a laptop
cannot run multi-process code that uses it. :class:`SyncBatchNorm` has BatchNorm's parameters and
buffers (state dicts move between ``bn`` and ``syncbn`` both ways); in training with more than one
process in its group it normalises over the union of their batches
(:func:`normlab.ops.sync_collectives.sync_batch_norm` says how), with ``momentum=None`` as a cumulative
average of the running statistics. In eval mode, without a process group, or with a group of one,
it is exactly BatchNorm.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from normlab.ops.bn_stats import step_momentum
from normlab.ops.sync_collectives import sync_batch_norm, sync_group
from normlab.ranges import ArgumentError


class SyncBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm over the union of the batches of all processes in a group (see module doc).

    Any input N×C×* with at least two dimensions. ``group_size``: synchronise within blocks of
    that many consecutive ranks (``None``: all ranks). ``process_group``: an explicit group,
    overriding ``group_size``. Statistics are computed in float64 for float64 inputs and in
    float32 otherwise.
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        group_size: int | None = None,
        process_group: Any = None,
        device: Any = None,
        dtype: Any = None,
    ) -> None:
        super().__init__(
            num_features, eps, momentum, affine, track_running_stats, device=device, dtype=dtype
        )
        if group_size is not None and group_size < 1:
            raise ArgumentError(
                "group_size", group_size, f"{{key}} must be a positive integer, got {group_size}"
            )
        self.group_size = group_size
        self.process_group = process_group

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def forward(self, input: Tensor) -> Tensor:
        self._check_input_dim(input)
        group = sync_group(self.process_group, self.group_size) if self.training else None
        if group is None:
            return super().forward(input)

        return sync_batch_norm(
            input, self.weight, self.bias, self.running_mean, self.running_var,
            step_momentum(self), self.eps, group,
        )  # fmt: skip

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, group_size={self.group_size}"

    @classmethod
    def from_batchnorm(
        cls, bn: nn.modules.batchnorm._BatchNorm, group_size: int | None = None
    ) -> SyncBatchNorm:
        """A synchronised copy of ``bn`` with the same parameters, buffers and train/eval mode."""
        sync = cls(
            bn.num_features,
            bn.eps,
            bn.momentum,
            bn.affine,
            bn.track_running_stats,
            group_size=group_size,
        )
        sync.load_state_dict(bn.state_dict())
        sync.to(device=_device_of(bn))
        sync.train(bn.training)
        for name, parameter in bn.named_parameters(recurse=False):
            getattr(sync, name).requires_grad_(parameter.requires_grad)
        return sync


def _device_of(module: nn.Module) -> torch.device:
    tensor = next(iter(module.parameters()), None)
    if tensor is None:
        tensor = next(iter(module.buffers()), None)
    return tensor.device if tensor is not None else torch.device("cpu")
