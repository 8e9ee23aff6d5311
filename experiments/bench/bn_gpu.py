"""cuda_bn's Triton kernels vs PyTorch's BatchNorm on a GPU: time, GB/s, % of peak bandwidth.

    make bench-bn                    # or: python -m experiments.bench.bn_gpu
    python -m experiments.bench.bn_gpu --tiny --device cpu   # smoke run (TRITON_INTERPRET=1)

For ResNet-50 / DenseNet-121 shapes, NCHW and channels_last, fp32 and bf16, in training mode:
forward, backward and forward+backward of native BN (recording whether torch picked cuDNN or its
native kernels) vs cuda_bn, and BN followed by ReLU vs cuda_bn with the ReLU fused. Candidates are
timed in alternation (experiments.lib.benchmark.compare). Bandwidth counts the traffic a BN cannot
avoid: forward reads x and writes y (2 × bytes), backward reads x and dy and writes dx (3 ×).
Writes bn_gpu.md next to this file (or --out).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from experiments.lib.benchmark import compare, machine_load, write_report
from normlab.ops.batchnorm import CudaBatchNorm

HERE = Path(__file__).resolve().parent
# Arguments of the tiny run in `make test` (tests/experiments/test_benchmarks.py).
SMOKE = ["--device", "cpu", "--tiny", "--repeats", "1", "--inner", "1", "--warmup", "0"]
SHAPES = [(32, 64, 112, 112), (32, 256, 56, 56), (32, 1024, 14, 14), (256, 2048, 7, 7)]
TINY_SHAPES = [(2, 3, 5, 7)]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# Peak memory bandwidth (bytes/s) by device name; add yours to get the "% of peak" column.
PEAK_BANDWIDTH = {"H200": 4.8e12, "H100 PCIe": 2.0e12, "H100": 3.35e12, "A100": 2.0e12}


def peak_bandwidth(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_BANDWIDTH.items() if key in name), None)


def native_backend(x: torch.Tensor, bn: nn.BatchNorm2d) -> str:
    backend = torch._C._select_batch_norm_backend(
        x, bn.weight, bn.bias, bn.running_mean, bn.running_var, True, bn.eps
    )
    return str(backend).rsplit(".", 1)[-1]


def passes(layer: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, dy: torch.Tensor):
    """(forward, backward, forward+backward) closures for one layer."""
    x = x.detach().requires_grad_(True)
    kept = layer(x)

    def forward() -> None:
        with torch.no_grad():
            layer(x)

    def backward() -> None:
        torch.autograd.grad(kept, x, dy, retain_graph=True)

    def forward_backward() -> None:
        torch.autograd.grad(layer(x), x, dy)

    return forward, backward, forward_backward


def bench_case(shape, layout, dtype_name, device, repeats, inner, warmup) -> tuple[list[str], str]:
    dtype = DTYPES[dtype_name]
    memory_format = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    x = torch.randn(shape, device=device, dtype=dtype).contiguous(memory_format=memory_format)
    dy = torch.randn_like(x)
    channels = shape[1]
    native = nn.BatchNorm2d(channels).to(device)
    ours = CudaBatchNorm(channels, backend="triton").to(device)
    ours_relu = CudaBatchNorm(channels, backend="triton", activation="relu").to(device)
    layers = {
        "native": native,
        "cuda_bn": ours,
        "native+relu": lambda t: F.relu(native(t)),
        "cuda_bn(relu)": ours_relu,
    }
    closures = {name: passes(layer, x, dy) for name, layer in layers.items()}
    numel_bytes = x.numel() * x.element_size()
    peak = peak_bandwidth(device)
    rows = []
    for index, (pass_name, traffic) in enumerate(
        (("forward", 2), ("backward", 3), ("forward+backward", 5))
    ):
        for baseline, candidate in (("native", "cuda_bn"), ("native+relu", "cuda_bn(relu)")):
            timings = compare(
                {baseline: closures[baseline][index], candidate: closures[candidate][index]},
                repeats=repeats,
                warmup=warmup,
                inner=inner,
                device=device,
            )
            base, mine = timings
            speedup = 1 / mine.ratio_to(base)
            gbps = traffic * numel_bytes / mine.median / 1e9
            percent = f"{100 * gbps * 1e9 / peak:.0f} %" if peak else "n/a"
            rows.append(
                f"| {'×'.join(map(str, shape))} | {layout} | {dtype_name} | {pass_name} "
                f"| {baseline} {base.median * 1e3:.3f} | {candidate} {mine.median * 1e3:.3f} "
                f"| {speedup:.2f}× | {gbps:.0f} | {percent} |"
            )
    return rows, native_backend(x, native)


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="tiny shapes (a smoke run)")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--inner", type=int, default=20, help="calls per timed measurement")
    parser.add_argument("--warmup", type=int, default=3, help="untimed calls per candidate")
    parser.add_argument("--out", type=Path, default=HERE / "bn_gpu.md")
    args = parser.parse_args(argv)
    load_before = machine_load()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error(
            "no CUDA device: run on a GPU machine (or --device cpu --tiny for a smoke run)"
        )

    rows, backends = [], []
    for shape in TINY_SHAPES if args.tiny else SHAPES:
        for layout in ("nchw", "channels_last"):
            for dtype_name in DTYPES:
                case_rows, backend = bench_case(
                    shape, layout, dtype_name, device, args.repeats, args.inner, args.warmup
                )
                rows += case_rows
                backends.append(f"{'×'.join(map(str, shape))} {layout} {dtype_name}: {backend}")
    return write_report(
        args.out,
        "cuda_bn vs native BatchNorm (training mode)",
        f"python -m experiments.bench.bn_gpu --device {args.device} --repeats {args.repeats} "
        f"--inner {args.inner} --warmup {args.warmup}{' --tiny' if args.tiny else ''}",
        "Median ms per call over alternating rounds; speed-up = median of per-round "
        "baseline/candidate ratios; GB/s and % of peak for the candidate, counting 2× the "
        "tensor's bytes forward and 3× backward.",
        "| shape | layout | dtype | pass | baseline (ms) | candidate (ms) | speed-up "
        "| GB/s | % of peak |\n|---|---|---|---|---|---|---:|---:|---:|\n" + "\n".join(rows),
        "Native backend chosen by torch (`torch._C._select_batch_norm_backend`):\n\n"
        + "\n".join(f"- {line}" for line in backends),
        load_before=load_before,
    )


if __name__ == "__main__":
    print(main())
