"""The kernel launches cuda_bn's host code makes, recorded instead of run.

:func:`record_launches` swaps every Triton kernel of :mod:`kernels` for a recorder, so the real
host code — layouts, the tile plan, grids, block sizes, flags and argument dtypes — runs on CPU
tensors (or on shapes too large to compute on CPU: recorded kernels touch no data) and leaves a
list of :class:`Launch`. The tests count launches per layer and check every grid against CUDA's
limits with it; :mod:`aot` compiles each recorded launch for a GPU that is not there.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from normlab.ops.batchnorm import kernels, ops

KERNEL_NAMES = (
    "_partial_stats_kernel",
    "_merge_stats_kernel",
    "_normalize_kernel",
    "_partial_grad_sums_kernel",
    "_finish_grad_sums_kernel",
    "_grad_input_kernel",
)

# CUDA's largest grid: 2³¹−1 blocks along x, 65,535 along y and z.
CUDA_GRID_LIMITS = (2**31 - 1, 65_535, 65_535)


@dataclass(frozen=True)
class TensorArgument:
    """What a kernel's specialisation sees of a tensor argument: its dtype and whether its
    address is 16-byte aligned (Triton's divisibility hint), not its data."""

    dtype: torch.dtype
    misalignment: int

    def data_ptr(self) -> int:
        return self.misalignment


@dataclass(frozen=True)
class Launch:
    """One kernel launch: the kernel's name, its 3-D grid and its arguments (tensors as
    :class:`TensorArgument`; constexprs among the keyword arguments)."""

    kernel: str
    grid: tuple[int, int, int]
    args: tuple[Any, ...]
    kwargs: dict[str, Any] = field(hash=False)

    def grid_errors(self) -> list[str]:
        """Why CUDA would refuse this grid (empty if it would not)."""
        return [
            f"{self.kernel}: grid axis {axis} = {size}, CUDA allows 1 to {limit}"
            for axis, (size, limit) in enumerate(zip(self.grid, CUDA_GRID_LIMITS, strict=True))
            if not 1 <= size <= limit
        ]


def _argument(value: Any) -> Any:
    if isinstance(value, Tensor):
        return TensorArgument(value.dtype, value.data_ptr() % 16)
    return value


class _Recorder:
    def __init__(self, name: str, launches: list[Launch]) -> None:
        self.name, self.launches = name, launches

    def __getitem__(self, grid: tuple[int, ...]) -> Callable[..., None]:
        full_grid = tuple(int(size) for size in grid) + (1,) * (3 - len(grid))

        def record(*args: Any, **kwargs: Any) -> None:
            launch = Launch(self.name, full_grid, tuple(map(_argument, args)), kwargs)
            self.launches.append(launch)

        return record


@contextmanager
def record_launches() -> Iterator[list[Launch]]:
    """Within the block the kernels are not run but recorded, in launch order, in the list this
    yields. Their outputs are left uninitialised."""
    launches: list[Launch] = []
    originals = {name: getattr(kernels, name) for name in KERNEL_NAMES}
    try:
        for name in KERNEL_NAMES:
            setattr(kernels, name, _Recorder(name, launches))
        yield launches
    finally:
        for name, kernel in originals.items():
            setattr(kernels, name, kernel)


class _SimulatedProcessGroup:
    """The collectives of ``ranks`` processes that all hold this process's data: enough for the
    synchronised host code to run, and its launches to be recorded, in one process."""

    def __init__(self, ranks: int) -> None:
        self.ranks = ranks

    def get_world_size(self, group: Any = None) -> int:
        return self.ranks

    def all_gather(self, outputs: list[Tensor], tensor: Tensor, group: Any = None) -> None:
        for output in outputs:
            output.copy_(tensor)

    def all_reduce(self, tensor: Tensor, group: Any = None) -> None:
        tensor.mul_(self.ranks)


@contextmanager
def simulated_world(ranks: int) -> Iterator[None]:
    """``ops.sync_batch_norm`` sees ``ranks`` processes (pass ``group=None``)."""
    real = ops.dist
    ops.dist = _SimulatedProcessGroup(ranks)
    try:
        yield
    finally:
        ops.dist = real


@dataclass(frozen=True)
class LayerConfig:
    """One cuda_bn layer as a model would run it."""

    shape: tuple[int, ...]
    channels_last: bool = False
    dtype: torch.dtype = torch.float32  # fp16/bf16: what autocast hands a norm after a conv
    activation: str | None = None
    affine: bool = True
    half_weights: bool = False  # parameters and buffers in ``dtype`` too (``model.half()``)
    ranks: int = 1  # more: batch statistics synchronised over that many processes

    def describe(self) -> str:
        parts = [
            "x".join(map(str, self.shape)),
            "channels_last" if self.channels_last else "nchw",
            str(self.dtype).removeprefix("torch."),
            self.activation or "no-act",
        ]
        parts += ["no-affine"] if not self.affine else []
        parts += ["half-weights"] if self.half_weights else []
        parts += [f"sync{self.ranks}"] if self.ranks > 1 else []
        return " ".join(parts)


@dataclass
class LayerLaunches:
    train_forward: list[Launch]
    backward: list[Launch]
    eval_forward: list[Launch]

    def all(self) -> list[Launch]:
        return self.train_forward + self.backward + self.eval_forward


def _uninitialised(config: LayerConfig, requires_grad: bool) -> Tensor:
    memory_format = torch.contiguous_format
    if config.channels_last:
        memory_format = {4: torch.channels_last, 5: torch.channels_last_3d}[len(config.shape)]
    tensor = torch.empty(config.shape, dtype=config.dtype, memory_format=memory_format)
    return tensor.requires_grad_(requires_grad)


def record_layer(config: LayerConfig, eps: float = 1e-5, momentum: float = 0.1) -> LayerLaunches:
    """The launches of one training step (forward, backward) and one eval forward of a layer
    with ``config``, recorded from the real host code on uninitialised CPU tensors (the plan
    is whatever is in force: see :func:`kernels.forced_plan`)."""
    channels = config.shape[1]
    param_dtype = config.dtype if config.half_weights else torch.float32
    weight = bias = None
    if config.affine:
        weight = torch.ones(channels, dtype=param_dtype, requires_grad=True)
        bias = torch.zeros(channels, dtype=param_dtype, requires_grad=True)
    running_mean = torch.zeros(channels, dtype=param_dtype)
    running_var = torch.ones(channels, dtype=param_dtype)
    act = (config.activation, 0.01)
    x = _uninitialised(config, requires_grad=True)
    grad = _uninitialised(config, requires_grad=False)
    with record_launches() as forward:
        if config.ranks > 1:
            with simulated_world(config.ranks):
                y = ops.sync_batch_norm(
                    x, weight, bias, running_mean, running_var, momentum, eps, *act, None
                )
        else:
            y = ops.batch_norm(
                x, weight, bias, running_mean, running_var, True, momentum, eps, *act
            )
    with record_launches() as backward:
        if config.ranks > 1:
            with simulated_world(config.ranks):
                y.backward(grad)
        else:
            y.backward(grad)
    with record_launches() as evaluation, torch.no_grad():
        ops.batch_norm(x, weight, bias, running_mean, running_var, False, momentum, eps, *act)
    return LayerLaunches(forward, backward, evaluation)
