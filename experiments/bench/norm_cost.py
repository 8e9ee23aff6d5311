"""Norm cost table: forward+backward of every registry norm on one tensor, relative to bn.

    python experiments/bench/norm_cost.py                         # part of `make bench`

Each norm is built from the registry with its default arguments (``conf/norm/*.yaml`` defaults)
and runs in training mode on a 32×256×28×28 float32 tensor (the size of a ResNet stage-2 feature
map at batch 32): forward, then backward of a fixed upstream gradient. All norms alternate in
every round. Writes norm_cost.md next to this file.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from normlab.norm import NORMS, build_norm
from normlab.utils.benchmark import compare, markdown_table, write_report

HERE = Path(__file__).resolve().parent
# Arguments of the tiny run in `make test` (tests/test_benchmarks.py).
SMOKE = ["--shape", "2", "8", "4", "4", "--repeats", "1", "--inner", "1"]


def forward_backward(name: str, x: torch.Tensor, grad: torch.Tensor):
    layer = build_norm(name, x.shape[1]).train()
    x = x.detach().requires_grad_(True)

    def call() -> None:
        # frozen_bn and none have no parameters: the input gradient keeps backward honest.
        torch.autograd.grad(layer(x), x, grad)

    return call


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", type=int, nargs=4, default=[32, 256, 28, 28])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--inner", type=int, default=3)
    parser.add_argument("--out", type=Path, default=HERE / "norm_cost.md")
    args = parser.parse_args(argv)

    generator = torch.Generator().manual_seed(0)
    x = torch.randn(args.shape, generator=generator)
    grad = torch.randn(args.shape, generator=generator)
    names = ["bn", *sorted(name for name in NORMS if name != "bn")]
    timings = compare(
        {name: forward_backward(name, x, grad) for name in names},
        repeats=args.repeats,
        inner=args.inner,
    )
    shape = "×".join(map(str, args.shape))
    return write_report(
        args.out,
        f"Norm cost: forward+backward on {shape}, relative to bn",
        f"python experiments/bench/norm_cost.py --shape {' '.join(map(str, args.shape))} "
        f"--repeats {args.repeats} --inner {args.inner}",
        f"Training mode, float32, CPU; each measurement averages {args.inner} calls, "
        f"{args.repeats} rounds in which every norm runs once. `syncbn` outside a process group "
        "and `cuda_bn` on CPU tensors (backend auto) run PyTorch's BatchNorm.",
        markdown_table(timings),
    )


if __name__ == "__main__":
    print(main())
