"""EvoNorm-B0, EvoNorm-S0 and FRN + TLU on the CPU in fused C loops (``cpu_kernels.c``), for float32
input in eager mode.

Why our own kernels: ATen has none of these norms, and composed of ATen ops each pass is a chain
of 5-17 elementwise kernels. Even by cache-sized chunks of samples (``norm_functions``) EvoNorm
ran forward + backward at 2.1-2.8× BatchNorm's time on 32×256×28×28 (``experiments/bench``),
where inductor's fused loops of the same formula took 1.3-1.4× on NCHW input; FRN on
channels-last input 1.6-2.2×. One loop per pass over a sample does what inductor does, without
its warm-up or a graph per shape: the C source builds in under a second with the system's C
compiler, once per machine (:func:`library`), and needs no torch headers (a one-line torch C++
extension took 22 s to compile on this 2-core VM). Compiled
models (inductor fuses the ATen formula itself), other dtypes, other devices, or a machine
without a C compiler run ``norm_functions``' ATen path; ``NORMLAB_CPU_KERNELS=0`` forces it.

Each call returns None where the kernels do not apply (or could not run), and the caller takes
the ATen path; results match it to float32 rounding (``tests/norm/test_fast_paths.py``) and
do not depend on the thread count (each thread runs whole samples).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import math
import os
import platform
import shutil
import stat
import subprocess
import tempfile
from pathlib import Path

import torch
from torch import Tensor

log = logging.getLogger(__name__)

_SOURCE = Path(__file__).with_name("cpu_kernels.c")
# Enough freedom to vectorise the reductions, not -ffast-math: NaN and inf keep their meaning.
_FLAGS = (
    "-O3", "-march=native", "-fno-math-errno", "-fno-trapping-math", "-fassociative-math",
    "-fno-signed-zeros", "-fopenmp", "-shared", "-fPIC",
)  # fmt: skip
_OFF = "NORMLAB_CPU_KERNELS"

_POINTER, _SIZE, _FLAG = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
_SIGNATURES = {
    "instance_statistics": [_POINTER] * 3 + [_SIZE] * 3 + [_FLAG] * 2,
    "evonorm_b0_forward": [_POINTER] * 7 + [_SIZE] * 3 + [_FLAG] * 2,
    "evonorm_b0_backward_sums": [_POINTER] * 10 + [_SIZE] * 3 + [_FLAG] * 2,
    "evonorm_b0_backward_input": [_POINTER] * 9 + [_SIZE] * 3 + [_FLAG] * 2,
    "evonorm_s0_forward": [_POINTER] * 7 + [_SIZE] * 4 + [_FLAG, ctypes.c_float, _FLAG],
    "evonorm_s0_backward": [_POINTER] * 10 + [_SIZE] * 4 + [_FLAG] * 2,
    "frn_forward": [_POINTER] * 6 + [_SIZE] * 3 + [_FLAG, ctypes.c_float, _FLAG],
    "frn_backward": [_POINTER] * 10 + [_SIZE] * 3 + [_FLAG] * 2,
}


def cache_dir() -> Path:
    """Where the built library is kept: ``$NORMLAB_CACHE_DIR``, else ``$XDG_CACHE_HOME/normlab``,
    else ``~/.cache/normlab``."""
    if "NORMLAB_CACHE_DIR" in os.environ:
        return Path(os.environ["NORMLAB_CACHE_DIR"])
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "normlab"


def _machine() -> str:
    """What ``-march=native`` builds for: a library made on one node of a cluster must not load
    on another with other instructions (home directories are shared)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        return "".join(sorted({line for line in lines if line.startswith(("flags", "model name"))}))
    except OSError:
        return f"{platform.machine()} {platform.processor()}"


@functools.cache
def library() -> ctypes.CDLL | None:
    """The kernels, built on first use into :func:`library_path`, or None, with one warning,
    where they cannot be built."""
    if os.environ.get(_OFF, "1") == "0":
        return None
    compiler = shutil.which(os.environ.get("CC", "cc"))
    if compiler is None:
        return _unavailable("no C compiler (cc, or $CC) on PATH")
    target = library_path(compiler)
    failures = (OSError, AttributeError, subprocess.SubprocessError)
    try:
        if not target.exists():
            _build(compiler, target)
            return _load(target)
        try:
            return _load(target)
        except failures:  # a damaged file from an earlier build: built again, once
            _build(compiler, target)
            return _load(target)
    except failures as error:
        return _unavailable(str(error).splitlines()[0] if str(error) else type(error).__name__)


def library_path(compiler: str) -> Path:
    """Where :func:`library` keeps the kernels built by ``compiler``: named by a hash of the
    source, compiler, flags and CPU."""
    key = "\n".join([_SOURCE.read_text(), compiler, *_FLAGS, _machine()])
    return cache_dir() / f"cpu_kernels-{hashlib.sha256(key.encode()).hexdigest()[:16]}.so"


def _load(target: Path) -> ctypes.CDLL:
    _check_private(target)
    lib = ctypes.CDLL(str(target))
    for name, arguments in _SIGNATURES.items():  # AttributeError: a file not built from ours
        function = getattr(lib, name)
        function.argtypes, function.restype = arguments, ctypes.c_int
    return lib


def _build(compiler: str, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    # Built beside the target and renamed: processes that build at once (DDP ranks, a sweep's
    # jobs) each load a whole file.
    with tempfile.TemporaryDirectory(dir=target.parent) as scratch:
        built = Path(scratch) / target.name
        command = [compiler, *_FLAGS, "-o", str(built), str(_SOURCE)]
        done = subprocess.run(command, capture_output=True, text=True, timeout=300)
        if done.returncode != 0:
            first = (done.stderr.strip() or f"exit status {done.returncode}").splitlines()[0]
            raise OSError(f"{Path(compiler).name} failed: {first}")
        os.replace(built, target)


def _check_private(target: Path) -> None:
    """A library is code this process runs: load it only from a folder nobody else can write."""
    for path in (target.parent, target):
        info = path.stat()
        if info.st_uid != os.getuid() or info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
            raise OSError(f"{path} is writable by other users: not loading code from it")


def _unavailable(why: str) -> None:
    log.warning(
        "normlab's fused CPU kernels are off (%s): EvoNorm and FRN run on ATen's ops, up to 2x "
        "slower; set %s=0 to silence this",
        why,
        _OFF,
    )
    return None


def _layout(x: Tensor) -> int | None:
    """0 for samples of channel-major values (NCHW, any spatial rank), 1 for channels last, None
    for anything else."""
    if x.is_contiguous():
        return 0
    formats = {4: torch.channels_last, 5: torch.channels_last_3d}
    if x.dim() in formats and x.is_contiguous(memory_format=formats[x.dim()]):
        return 1
    return None


def applies(x: Tensor, *parameters: Tensor) -> bool:
    """Whether the kernels take this call: eager float32 CPU tensors, x in a dense layout."""
    return (
        not torch.compiler.is_compiling()
        and x.device.type == "cpu"
        and x.dtype == torch.float32
        and x.dim() >= 2
        and x.numel() > 0
        and all(p.device.type == "cpu" and p.dtype == torch.float32 for p in parameters)
        and _layout(x) is not None
        and library() is not None
    )


def _address(t: Tensor | None) -> ctypes.c_void_p:
    return ctypes.c_void_p(None if t is None else t.data_ptr())


def _run(
    name: str,
    tensors: list[Tensor | None],
    x: Tensor,
    sizes: tuple[int, ...] = (),
    eps: float | None = None,
) -> bool:
    """Calls kernel ``name`` on ``tensors`` (contiguous) with x's N, C and positions, ``sizes``,
    x's layout, ``eps`` and the thread count; False where it failed (no memory or no thread)."""
    n, c, positions = x.shape[0], x.shape[1], math.prod(x.shape[2:])
    tail = (_layout(x),) if eps is None else (_layout(x), eps)
    addresses = [_address(t) for t in tensors]
    kernel = getattr(library(), name)
    return kernel(*addresses, n, c, positions, *sizes, *tail, torch.get_num_threads()) == 0


def s0_forward(
    x: Tensor, weight: Tensor, bias: Tensor, v: Tensor, groups: int, eps: float
) -> tuple[Tensor, Tensor, Tensor] | None:
    """EvoNorm-S0's output and each sample's group means and inverse standard deviations (N×G)."""
    y = torch.empty_like(x)
    statistics = x.new_empty((2, x.shape[0], groups))
    parameters = [_flat(v), _flat(weight), _flat(bias)]
    tensors = [x, y, *parameters, *statistics]
    if not _run("evonorm_s0_forward", tensors, x, sizes=(groups,), eps=eps):
        return None
    return y, statistics[0], statistics[1]


def s0_backward(
    x: Tensor, grad: Tensor, weight: Tensor, v: Tensor, mean: Tensor, invstd: Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor] | None:
    """The gradients of x, γ, β and v from :func:`s0_forward`'s statistics."""
    n, channels, groups = x.shape[0], x.shape[1], mean.shape[1]
    x_grad = torch.empty_like(x)
    sums = x.new_empty((3, n, channels))
    tensors = [x, _like(grad, x), x_grad, _flat(v), _flat(weight), _flat(mean), _flat(invstd)]
    if not _run("evonorm_s0_backward", [*tensors, *sums], x, sizes=(groups,)):
        return None
    products, v_products, grad_sums = sums  # Σ g·x·s, Σ g·x²·s·(1 − s), Σ g
    invstd = invstd.reshape(n, groups, 1)
    weight_grad = (products.view(n, groups, -1) * invstd).sum(0).flatten()
    scale = (invstd * weight.view(groups, -1)).view(n, channels)  # r·γ
    return x_grad, weight_grad, grad_sums.sum(0), (v_products * scale).sum(0)


def instance_statistics(x: Tensor) -> tuple[Tensor, Tensor] | None:
    """Biased variance and mean of each sample and channel (N×C), as ``variance_mean``."""
    statistics = x.new_empty((2, *x.shape[:2]))
    if not _run("instance_statistics", [x, statistics[1], statistics[0]], x):
        return None
    return statistics[0], statistics[1]


def b0_forward(
    x: Tensor, weight: Tensor, bias: Tensor, v: Tensor, instance_std: Tensor, batch_std: Tensor
) -> Tensor | None:
    """EvoNorm-B0's output, ``instance_std`` per sample and channel, ``batch_std`` per channel."""
    y = torch.empty_like(x)
    parameters = [_flat(v), _flat(weight), _flat(bias), _flat(instance_std), _flat(batch_std)]
    return y if _run("evonorm_b0_forward", [x, y, *parameters], x) else None


def b0_backward(
    x: Tensor,
    grad: Tensor,
    weight: Tensor,
    v: Tensor,
    instance_mean: Tensor,
    instance_std: Tensor,
    batch_std: Tensor,
    batch_mean: Tensor | None,
) -> tuple[Tensor, Tensor, Tensor, Tensor] | None:
    """The gradients of x, γ, β and v from :func:`b0_forward`'s statistics; ``batch_mean`` None
    where σ_B was the running one (a constant)."""
    n, channels = x.shape[:2]
    grad, sums = _like(grad, x), x.new_empty((5, n, channels))
    stds = [_flat(instance_std), _flat(batch_std)]
    if not _run("evonorm_b0_backward_sums", [x, grad, _flat(v), *stds, *sums], x):
        return None
    # Σ g·x/D, Σ g, Σ q and Σ q·i, Σ q·i·x (q = g·x/D², i = 1 where v·x + σ_I won the max)
    weight_sums, grad_sums, q_sums, instance_sums, v_sums = sums
    # dx = γ·g/D − γ·v·q·i + slope·x + offset: slope through σ_I (∂σ_I/∂x = (x − μ_I)/(n_I·σ_I),
    # ∂L/∂σ_I = −γ·Σ q·i) and, for the batch's σ_B, through it (∂L/∂σ_B = −γ·Σ q·(1 − i)).
    slope = instance_sums * weight.neg() / (stds[0].view(n, channels) * math.prod(x.shape[2:]))
    offset = slope.neg() * instance_mean.reshape(n, channels)
    if batch_mean is not None:
        batch_side = (instance_sums.sum(0) - q_sums.sum(0)) * weight
        batch_slope = batch_side / (stds[1].view(channels) * (x.numel() // channels))
        slope = slope + batch_slope
        offset = offset - batch_slope * batch_mean.reshape(-1)
    x_grad = torch.empty_like(x)
    factors = [_flat(v), _flat(weight), *stds, slope.contiguous(), offset.contiguous()]
    if not _run("evonorm_b0_backward_input", [x, grad, x_grad, *factors], x):
        return None
    return x_grad, weight_sums.sum(0), grad_sums.sum(0), weight.neg() * v_sums.sum(0)


def frn_forward(
    x: Tensor, weight: Tensor, bias: Tensor, tau: Tensor | None, eps: float
) -> tuple[Tensor, Tensor] | None:
    """FRN's output (with TLU where ``tau`` is given) and each sample's per-channel r (N×C)."""
    y, invrms = torch.empty_like(x), x.new_empty(x.shape[:2])
    parameters = [_flat(weight), _flat(bias), None if tau is None else _flat(tau)]
    return (y, invrms) if _run("frn_forward", [x, y, *parameters, invrms], x, eps=eps) else None


def frn_backward(
    x: Tensor, grad: Tensor, weight: Tensor, bias: Tensor, tau: Tensor | None, invrms: Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor] | None:
    """dx, and per sample and channel Σ g'·x, Σ g' and Σ g (N×C each), g' the upstream gradient
    where the TLU passed it; from :func:`frn_forward`'s r."""
    x_grad, sums = torch.empty_like(x), x.new_empty((3, *x.shape[:2]))
    parameters = [_flat(weight), _flat(bias), None if tau is None else _flat(tau), _flat(invrms)]
    if not _run("frn_backward", [x, _like(grad, x), x_grad, *parameters, *sums], x):
        return None
    return x_grad, sums[0], sums[1], sums[2]


def _like(x: Tensor, reference: Tensor) -> Tensor:
    """``x`` in ``reference``'s layout (an upstream gradient need not share the input's)."""
    if _layout(x) == _layout(reference) and x.dtype == reference.dtype:
        return x
    layout = torch.contiguous_format if _layout(reference) == 0 else _memory_format(reference)
    return x.to(reference.dtype).contiguous(memory_format=layout)


def _memory_format(x: Tensor) -> torch.memory_format:
    return torch.channels_last if x.dim() == 4 else torch.channels_last_3d


def _flat(t: Tensor) -> Tensor:
    """t's values as one dense buffer, the kernels' view of it: t itself when it is one already
    (parameters and statistics always are: no reshape or detach per call on the hot path)."""
    return t.contiguous()
