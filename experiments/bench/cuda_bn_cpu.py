"""cuda_bn's CPU fallback vs nn.BatchNorm2d: one DenseNet-BC-100 training step, side by side.

    make bench-cuda-bn-cpu          # or: python -m experiments.bench.cuda_bn_cpu [--repeats N]

On CPU tensors ``norm=cuda_bn`` (backend auto) runs PyTorch's native BN and applies the ReLU it
absorbed from the model in place, so its step should cost what ``norm=bn``'s does (goal ≤ 1.05×).
The step is the one `make train` runs: digits at 28 px, batch 32, channels_last, AdamW.
Writes cuda_bn_cpu.md next to this file.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F

from experiments.lib.benchmark import compare, machine_load, markdown_table, write_report
from normlab.data import DigitsDataModule
from normlab.models import densenet_bc_100

HERE = Path(__file__).resolve().parent
# Arguments of the tiny run in `make test` (tests/experiments/test_benchmarks.py).
SMOKE = ["--repeats", "1", "--inner", "1", "--batch-size", "4"]
GOAL = 1.05


def training_step(norm: str, images: torch.Tensor, labels: torch.Tensor):
    torch.manual_seed(0)
    model = densenet_bc_100(num_classes=10, in_channels=1, norm=norm)
    model = model.to(memory_format=torch.channels_last).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(images), labels).backward()
        optimizer.step()

    return step


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    # The step time varies by ±20 % on a shared 2-core machine: 15 rounds make the ratio stable.
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--inner", type=int, default=3, help="steps per timed measurement")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--out", type=Path, default=HERE / "cuda_bn_cpu.md")
    args = parser.parse_args(argv)
    load_before = machine_load()

    data = DigitsDataModule(batch_size=args.batch_size, image_size=28, augment=False, seed=0)
    data.setup("fit")
    images, labels = next(iter(data.train_dataloader()))
    images = images.contiguous(memory_format=torch.channels_last)
    timings = compare(
        {norm: training_step(norm, images, labels) for norm in ("bn", "cuda_bn")},
        repeats=args.repeats,
        inner=args.inner,
    )
    ratio = timings[1].ratio_to(timings[0])
    verdict = "meets" if ratio <= GOAL else "misses"
    return write_report(
        args.out,
        "cuda_bn on CPU vs nn.BatchNorm2d: DenseNet-BC-100 training step",
        f"python -m experiments.bench.cuda_bn_cpu --repeats {args.repeats} --inner {args.inner} "
        f"--batch-size {args.batch_size}",
        f"One step = forward, cross-entropy, backward, AdamW on a batch of {args.batch_size} "
        f"digits (28 px, channels_last); each measurement averages {args.inner} steps, "
        f"{args.repeats} alternating rounds after 2 warm-up steps each.",
        markdown_table(timings),
        f"cuda_bn / bn = {ratio:.3f} (median of per-round ratios): {verdict} the goal ≤ {GOAL}.",
        load_before=load_before,
    )


if __name__ == "__main__":
    print(main())
