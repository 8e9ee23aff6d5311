"""End-to-end training throughput of each experiment with norm=bn vs norm=cuda_bn.

    python -m experiments.bench.training_throughput --device cuda --precision bf16-mixed   # GPU
    python -m experiments.bench.training_throughput --steps 2 --repeats 1 --tiny           # smoke

Each experiment's own model, data module (its loader included), optimizer and Trainer loop, on
one device; images/s over ``--steps`` training steps per measurement, the two norms alternating.
On CPU cuda_bn runs PyTorch's BN (backend auto), so the comparison is meant for a GPU, where it
runs our Triton kernels with the activations the models hand over fused in.
Writes training_throughput.md next to this file (or --out).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

from experiments.lib.benchmark import (
    FAMILY_EXPERIMENTS,
    TINY,
    compare,
    experiment_step,
    machine_load,
    write_report,
)
from normlab.utils.dependency_warnings import quiet_dependency_warnings
from normlab.utils.hydra_run import register_resolvers

HERE = Path(__file__).resolve().parent
# Arguments of the tiny run in `make test` (tests/experiments/test_benchmarks.py).
SMOKE = [
    "--steps",
    "1",
    "--repeats",
    "1",
    "--tiny",
    "--device",
    "cpu",
    "--precision",
    "32-true",
    "--experiments",
    "pix2pix_digits",
]
EXPERIMENTS = FAMILY_EXPERIMENTS


def candidate(experiment: str, norm: str, overrides: list[str], args, root: Path):
    run, batch_size = experiment_step(
        experiment, [f"norm={norm}", *overrides], root, args.steps, args.device, args.precision
    )
    return lambda: run() / batch_size  # seconds per image


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20, help="training steps per measurement")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cuda", choices=["cpu", "cuda"])
    parser.add_argument("--precision", default="bf16-mixed", choices=["32-true", "bf16-mixed"])
    parser.add_argument("--experiments", nargs="*", default=EXPERIMENTS, choices=EXPERIMENTS)
    parser.add_argument("--tiny", action="store_true", help="small data (a smoke run)")
    parser.add_argument("--out", type=Path, default=HERE / "training_throughput.md")
    args = parser.parse_args(argv)
    load_before = machine_load()
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("no CUDA device: run on a GPU machine (or --device cpu for a smoke run)")
    register_resolvers()
    quiet_dependency_warnings()

    rows = []
    with tempfile.TemporaryDirectory() as root:
        for experiment in args.experiments:
            overrides = TINY[experiment] if args.tiny else []
            timings = compare(
                {
                    norm: candidate(experiment, norm, overrides, args, Path(root))
                    for norm in ("bn", "cuda_bn")
                },
                repeats=args.repeats,
                warmup=1,
            )
            bn, cuda_bn = timings
            rows.append(
                f"| {experiment} | {1 / bn.median:.1f} | {1 / cuda_bn.median:.1f} "
                f"| {1 / cuda_bn.ratio_to(bn):.3f} |"
            )
    return write_report(
        args.out,
        "Training throughput: norm=bn vs norm=cuda_bn",
        f"python -m experiments.bench.training_throughput --steps {args.steps} --repeats "
        f"{args.repeats} --device {args.device} --precision {args.precision}"
        f"{' --tiny' if args.tiny else ''}",
        f"Images/s over {args.steps} training steps (data loading included), median of "
        f"{args.repeats} alternating rounds; speed-up = median of per-round bn/cuda_bn ratios.",
        "| experiment | bn (img/s) | cuda_bn (img/s) | speed-up |\n|---|---:|---:|---:|\n"
        + "\n".join(rows),
        load_before=load_before,
    )


if __name__ == "__main__":
    print(main())
