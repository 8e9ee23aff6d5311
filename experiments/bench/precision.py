"""bf16 mixed precision vs float32: a training step of each model family on CPU.

    python -m experiments.bench.precision                       # part of `make bench`
    python -m experiments.bench.precision --steps 1 --repeats 1 --tiny   # smoke

Each family's experiment with its own model, data module (loader included), optimizer and
Lightning loop, with its own norm and batch size (in the table): densenet_digits (DenseNet-BC-100,
digits at 28 px, channels_last), convnext_digits (ConvNeXt-atto, ln), retinanet_digits
(RetinaNet R18-FPN on 128 px digit scenes) and pix2pix_digits (U-Net + PatchGAN at 64 px). ``trainer.precision=32-true`` and ``bf16-mixed`` (CPU autocast to bfloat16) alternate,
each on its own copy of the model; seconds per step over ``--steps`` steps. The report names
the CPU's vector capability and whether oneDNN runs bf16 on it (without AVX512-BF16 or AMX, bf16
convolutions are emulated and slower than float32), and, as every benchmark's, the commit, the
torch build and the machine's load. Writes precision.md next to this file (or ``--out``).
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
SMOKE = ["--steps", "1", "--repeats", "1", "--tiny", "--experiments", "pix2pix_digits"]
PRECISIONS = ("32-true", "bf16-mixed")
# Within this of 1 a per-round ratio is this shared machine's noise, not a difference
# (experiments/bench/README.md).
NOISE = 0.05


def verdict(ratio: float) -> str:
    """What a bf16-mixed / 32-true step-time ratio says."""
    if ratio < 1 - NOISE:
        return f"bf16-mixed is faster ({1 / ratio:.2f}× the steps per second)"
    if ratio > 1 + NOISE:
        return f"bf16-mixed is slower ({ratio:.2f}× the time per step)"
    return f"no difference beyond the noise (±{NOISE:.0%})"


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5, help="training steps per measurement")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--experiments", nargs="*", default=FAMILY_EXPERIMENTS, choices=FAMILY_EXPERIMENTS
    )
    parser.add_argument("--tiny", action="store_true", help="small data (a smoke run)")
    parser.add_argument("--out", type=Path, default=HERE / "precision.md")
    args = parser.parse_args(argv)
    register_resolvers()
    quiet_dependency_warnings()

    load_before = machine_load()
    rows = []
    with tempfile.TemporaryDirectory() as root:
        for experiment in args.experiments:
            overrides = TINY[experiment] if args.tiny else []
            steps = {
                precision: experiment_step(
                    experiment, overrides, Path(root), args.steps, "cpu", precision
                )
                for precision in PRECISIONS
            }
            batch_size = steps["32-true"][1]
            fp32, bf16 = compare(
                {precision: run for precision, (run, _) in steps.items()},
                repeats=args.repeats,
                warmup=1,
            )
            # As printed: the verdict's figure is then the one a reader of the table computes.
            ratio = round(bf16.ratio_to(fp32), 3)
            rows.append(
                f"| {experiment} | {batch_size} | {fp32.median * 1e3:.0f} "
                f"| {bf16.median * 1e3:.0f} | {ratio:.3f} | {verdict(ratio)} |"
            )
    return write_report(
        args.out,
        "bf16-mixed vs 32-true: training step time per model family on CPU",
        f"python -m experiments.bench.precision --steps {args.steps} --repeats {args.repeats}"
        f"{' --tiny' if args.tiny else ''}",
        "Other work may share the cores (the load above says how much), so absolute times are "
        "noisy and the per-round ratios are what to read.",
        f"CPU capability: {torch.backends.cpu.get_cpu_capability()}; oneDNN bf16 supported: "
        f"{torch.ops.mkldnn._is_mkldnn_bf16_supported()}.",
        f"Milliseconds per training step (data loading included), each measurement averaging "
        f"{args.steps} steps; median of {args.repeats} alternating rounds after one warm-up "
        "round. bf16 / fp32 = the median of the per-round ratios of step times.",
        "| experiment | batch | 32-true (ms) | bf16-mixed (ms) | bf16 / fp32 | verdict |\n"
        "|---|---:|---:|---:|---:|---|\n" + "\n".join(rows),
        load_before=load_before,
    )


if __name__ == "__main__":
    print(main())
