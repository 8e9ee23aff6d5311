"""Norm cost table: forward+backward of every registry norm on one tensor, relative to bn.

    python -m experiments.bench.norm_cost                         # part of `make bench`

Each norm is built from the registry with its default arguments (``conf/norm/*.yaml`` defaults;
ghost_bn with a virtual batch of a quarter of the batch, so that it splits the batch) and runs in training mode on a 32×256×28×28 float32 tensor (the size of a ResNet stage-2 feature
map at batch 32): forward, then backward of a fixed upstream gradient. Every norm runs on that
tensor in both memory formats (NCHW-contiguous and channels_last; a norm's cost can differ by 2×
between them), and all of them alternate in every round. One table per format, each relative to
bn in that format, and bn's channels_last time relative to its NCHW time. A last column gives
the bytes each norm keeps for its backward pass relative to bn's (the activation memory a norm
costs a network). The report names the commit and the machine's load while it ran. Writes
norm_cost.md next to this file.

``ln`` is timm's LayerNorm2d: it permutes to channels-last, calls F.layer_norm and permutes back.
The table also times the other way to write it, ``ln (reduce dim 1)``: mean and variance over the
channel dimension in place, no permute. ``ln`` keeps whichever is faster in each format; the two
agree to float32 rounding (checked here before timing).

``<norm> compiled`` rows (``--compiled``; by default the small-batch norms): the same layer under
``torch.compile(fullgraph=True)`` (inductor's fused C++ loops, compiled and warmed up before the
timing), the fastest code for its formula measured on this machine. An eager path that misses
2× bn is judged against it: where the compiled layer misses too, that is the measured floor.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from torch import nn

from experiments.lib.benchmark import Timing, compare, machine_load, markdown_table, write_report
from normlab.norm import NORMS, build_norm

HERE = Path(__file__).resolve().parent
# Arguments of the tiny run in `make test` (tests/experiments/test_benchmarks.py).
SMOKE = ["--shape", "2", "8", "4", "4", "--repeats", "1", "--inner", "1", "--compiled"]
# Norms also timed compiled by default: those whose eager path is normlab's own composition.
COMPILED = ["brn", "evonorm_b0", "evonorm_s0", "frn", "ghost_bn", "rms"]
COMPILED_SUFFIX = " compiled"


MEMORY_FORMATS = {"NCHW": torch.contiguous_format, "channels_last": torch.channels_last}


REDUCED_LN = "ln (reduce dim 1)"


class ChannelReducedLayerNorm(nn.Module):
    """Channels-first LayerNorm written as a reduction over dim 1 (no permute): the alternative
    ``ln`` implementation the table compares with timm's."""

    def __init__(self, num_features: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        var, mean = torch.var_mean(x, dim=1, correction=0, keepdim=True)
        scale = self.weight[:, None, None] * torch.rsqrt(var + self.eps)
        return (x - mean) * scale + self.bias[:, None, None]


def build(name: str, shape: torch.Size) -> nn.Module:
    if name.endswith(COMPILED_SUFFIX):
        layer = build(name.removesuffix(COMPILED_SUFFIX), shape)
        return torch.compile(layer, fullgraph=True, dynamic=False)
    if name == REDUCED_LN:
        return ChannelReducedLayerNorm(shape[1], eps=build_norm("ln", shape[1]).eps)
    spec = {"name": name}
    if name == "ghost_bn":  # its default (32 samples) would be one chunk, that is bn, at batch 32
        spec["virtual_batch_size"] = max(1, shape[0] // 4)
    return build_norm(spec, shape[1])


def forward_backward(name: str, x: torch.Tensor, grad: torch.Tensor):
    layer = build(name, x.shape).train()
    x = x.detach().requires_grad_(True)

    def call() -> None:
        # frozen_bn and none have no parameters: the input gradient keeps backward honest.
        torch.autograd.grad(layer(x), x, grad)

    if name.endswith(COMPILED_SUFFIX):
        call()  # compiles: not part of the timing
    return call


def saved_bytes(name: str, x: torch.Tensor) -> int:
    """Bytes a forward keeps for its backward: the unique storages autograd saves (the input
    counts once however many times it is saved; a fresh activation counts in full)."""
    layer = build(name, x.shape).train()
    storages: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        layer(x.detach().requires_grad_(True))
    return sum(storages.values())


def with_memory_column(table: str, saved: dict[str, int]) -> str:
    """``table`` (a :func:`markdown_table`) with each norm's saved bytes relative to bn's ("—"
    for the compiled rows: inductor decides what its graphs keep, out of the hooks' sight)."""
    header, rule, *rows = table.splitlines()
    lines = [f"{header} saved for backward × bn |", f"{rule}---:|"]
    for row in rows:
        name = row.split(" | ")[0].removeprefix("| ")
        ratio = f"{saved[name] / saved['bn']:.2f}" if name in saved else "—"
        lines.append(f"{row} {ratio} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", type=int, nargs=4, default=[32, 256, 28, 28])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--inner", type=int, default=3)
    parser.add_argument(
        "--threads", type=int, help="intra-op threads (default: torch's, one per core)"
    )
    parser.add_argument(
        "--compiled", nargs="*", default=COMPILED, help="norms also timed under torch.compile"
    )
    parser.add_argument("--out", type=Path, default=HERE / "norm_cost.md")
    args = parser.parse_args(argv)
    load_before = machine_load()
    if args.threads:
        torch.set_num_threads(args.threads)

    generator = torch.Generator().manual_seed(0)
    x = torch.randn(args.shape, generator=generator)
    grad = torch.randn(args.shape, generator=generator)
    names = ["bn", *sorted(name for name in NORMS if name != "bn"), REDUCED_LN]
    compiled = [f"{name}{COMPILED_SUFFIX}" for name in args.compiled]
    with torch.no_grad():  # the two ln implementations compute the same thing
        reference, reduced = build("ln", x.shape), build(REDUCED_LN, x.shape)
        torch.testing.assert_close(reduced(x), reference(x), atol=1e-5, rtol=1e-5)
    candidates = {
        (name, layout): forward_backward(
            name, x.contiguous(memory_format=fmt), grad.contiguous(memory_format=fmt)
        )
        for layout, fmt in MEMORY_FORMATS.items()
        for name in [*names, *compiled]
    }
    timings = compare(
        {f"{name} ({layout})": call for (name, layout), call in candidates.items()},
        repeats=args.repeats,
        inner=args.inner,
    )
    # The same rounds, split by format; each table names the norms plainly.
    by_format = {
        layout: [
            Timing(name, t.seconds)
            for (name, lay), t in zip(candidates, timings, strict=True)
            if lay == layout
        ]
        for layout in MEMORY_FORMATS
    }
    saved = {
        layout: {name: saved_bytes(name, x.contiguous(memory_format=fmt)) for name in names}
        for layout, fmt in MEMORY_FORMATS.items()
    }
    bn_ratio = by_format["channels_last"][0].ratio_to(by_format["NCHW"][0])
    shape = "×".join(map(str, args.shape))
    return write_report(
        args.out,
        f"Norm cost: forward+backward on {shape}, relative to bn",
        f"python -m experiments.bench.norm_cost --shape {' '.join(map(str, args.shape))} "
        f"--repeats {args.repeats} --inner {args.inner}"
        + (f" --threads {args.threads}" if args.threads else "")
        + (f" --compiled {' '.join(args.compiled)}" if args.compiled != COMPILED else "")
        + (f" --out {args.out.name}" if args.out.name != "norm_cost.md" else ""),
        "Other work may share the cores (the load above says how much), so absolute times are "
        "noisy and the per-round ratios to bn are what to read.",
        f"Training mode, float32, CPU; each measurement averages {args.inner} calls, "
        f"{args.repeats} rounds in which every norm runs once. `syncbn` outside a process group "
        "and `cuda_bn` on CPU tensors (backend auto) run PyTorch's BatchNorm; `ghost_bn` splits "
        "the batch into 4 virtual batches.",
        f"bn on channels_last input / bn on NCHW input = {bn_ratio:.3f}",
        "The last column: bytes autograd keeps for the backward pass (unique storages, input "
        f"included), relative to bn's ({saved['NCHW']['bn'] / 2**20:.1f} MiB).",
        *(
            f"## {layout} input\n\n{with_memory_column(markdown_table(rows), saved[layout])}"
            for layout, rows in by_format.items()
        ),
        load_before=load_before,
    )


if __name__ == "__main__":
    print(main())
