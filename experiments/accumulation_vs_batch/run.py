"""Gradient accumulation is not a bigger batch for BatchNorm: the study behind README.md here.

    make study-accumulation-vs-batch               # or: python -m experiments.accumulation_vs_batch.run
    python -m experiments.accumulation_vs_batch.run --seeds 42 1 --from-runs DIR   # re-tabulate

DenseNet-BC-100 on digits (experiment=densenet_digits: 3 epochs, AdamW + one-cycle, lr 3e-3), every
configuration seeing the same samples with the same optimizer batch of 32, so only what the norm
sees changes:

- bn, batch 4 × accumulate 8: BN normalises over 4 samples;
- bn, batch 32: BN over 32;
- syncbn, 2 processes × 16: BN over the union, 32;
- gn, batch 4 × accumulate 8 and gn, batch 32: GroupNorm, which never looks across samples.

Writes results.md (table, findings checked against the expectation) and val_acc.png here.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

from experiments.lib.study import (
    column,
    machine_line,
    plot_curves,
    read_metrics,
    run_training,
    study_root,
    write_results,
)

HERE = Path(__file__).resolve().parent
CONFIGS = {
    "bn 4×8 (accumulated)": ["norm=bn", "data.batch_size=4", "trainer.accumulate_grad_batches=8"],
    "bn 32": ["norm=bn", "data.batch_size=32"],
    "syncbn 2×16": ["norm=syncbn", "trainer=ddp_cpu", "data.global_batch_size=32"],
    "gn 4×8 (accumulated)": ["norm=gn", "data.batch_size=4", "trainer.accumulate_grad_batches=8"],
    "gn 32": ["norm=gn", "data.batch_size=32"],
}
# Samples each norm layer normalises over, per configuration.
NORM_BATCH = {
    "bn 4×8 (accumulated)": 4,
    "bn 32": 32,
    "syncbn 2×16": 32,
    "gn 4×8 (accumulated)": 1,
    "gn 32": 1,
}


def run_dir(root: Path, name: str, seed: int) -> Path:
    slug = name.split(" (")[0].replace(" ", "_").replace("×", "x")
    return root / f"{slug}_seed{seed}"


def run_minutes(directory: Path) -> float:
    """Training wall time of a run from its directory: config written → last metrics row."""
    started = (directory / ".hydra" / "config.yaml").stat().st_mtime
    return ((directory / "csv" / "metrics.csv").stat().st_mtime - started) / 60


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[42, 1])
    parser.add_argument("--from-runs", type=Path, help="tabulate earlier runs instead of training")
    args = parser.parse_args()
    root = args.from_runs or study_root("accumulation_vs_batch")

    if not args.from_runs:
        for name, overrides in CONFIGS.items():
            for seed in args.seeds:
                run_training(
                    "densenet_digits", [*overrides, f"seed={seed}"], run_dir(root, name, seed)
                )

    accuracy = {
        name: [column(read_metrics(run_dir(root, name, s)), "test/acc")[-1][1] for s in args.seeds]
        for name in CONFIGS
    }
    minutes = {
        name: statistics.mean(run_minutes(run_dir(root, name, s)) for s in args.seeds)
        for name in CONFIGS
    }
    curves = {
        name: [column(read_metrics(run_dir(root, name, s)), "val/acc") for s in args.seeds]
        for name in CONFIGS
    }
    plot_curves(curves, "validation accuracy (mean over seeds)", HERE / "val_acc.png")
    mean = {name: statistics.mean(values) for name, values in accuracy.items()}
    spread = {name: max(values) - min(values) for name, values in accuracy.items()}

    def compare(big: str, small: str) -> tuple[float, float, str]:
        """Mean gap big − small, the seed spread of the two, and the per-seed (paired) gaps:
        a given seed fixes the initial weights and the sample order in every configuration."""
        paired = ", ".join(
            f"{100 * (b - a):+.1f}" for b, a in zip(accuracy[big], accuracy[small], strict=True)
        )
        return mean[big] - mean[small], max(spread[big], spread[small]), paired

    def verdict(holds: bool) -> str:
        return "**agrees**" if holds else "**disagrees**"

    bn_gap, bn_noise, bn_paired = compare("bn 32", "bn 4×8 (accumulated)")
    gn_gap, gn_noise, gn_paired = compare("gn 32", "gn 4×8 (accumulated)")
    sync_gap, sync_noise, sync_paired = compare("bn 32", "syncbn 2×16")
    unstable = [
        f"{name} ({', '.join(f'{100 * a:.1f}' for a in accuracy[name])} %)"
        for name in CONFIGS
        if min(accuracy[name]) < 0.9 * max(accuracy[name])
    ]
    rows = [
        f"| {name} | {NORM_BATCH[name]} | "
        + " | ".join(f"{100 * a:.1f}" for a in accuracy[name])
        + f" | **{100 * mean[name]:.1f}** | {minutes[name]:.1f} |"
        for name in CONFIGS
    ]
    seeds = " | ".join(f"seed {s}" for s in args.seeds)
    lines = [
        "# accumulation_vs_batch: results",
        "",
        "Command: `python -m experiments.accumulation_vs_batch.run --seeds "
        + " ".join(map(str, args.seeds))
        + "` (`make study-accumulation-vs-batch`); each run is `python -m normlab.train "
        "experiment=densenet_digits logger=csv seed=S` plus the overrides in run.py.",
        f"Machine: {machine_line()}.",
        "",
        "Test accuracy (%) after 3 epochs; optimizer batch 32 and the same samples everywhere.",
        "",
        f"| configuration | samples per normalisation | {seeds} | mean | minutes per run* |",
        "|---|---:|" + "---:|" * len(args.seeds) + "---:|---:|",
        *rows,
        "",
        "Findings, each checked against its expectation; a difference counts only if it exceeds "
        "the seed-to-seed spread of the two configurations compared (per-seed differences in "
        "brackets, seeds in the order above):",
        "",
        f"- BN with accumulation vs the true batch: bn 32 − bn 4×8 = {100 * bn_gap:+.1f} points "
        f"[{bn_paired}], seed spread {100 * bn_noise:.1f}. Expected: accumulation does not give "
        f"BN a big batch, so bn 4×8 is worse — {verdict(bn_gap > bn_noise)}.",
        f"- GN is indifferent to the per-step batch: gn 32 − gn 4×8 = {100 * gn_gap:+.1f} points "
        f"[{gn_paired}], seed spread {100 * gn_noise:.1f} — "
        f"{verdict(abs(gn_gap) <= gn_noise)}.",
        f"- syncbn over 2 × 16 equals BN on batch 32: bn 32 − syncbn 2×16 = "
        f"{100 * sync_gap:+.1f} points [{sync_paired}], seed spread {100 * sync_noise:.1f} — "
        f"{verdict(abs(sync_gap) <= sync_noise)}.",
        *(
            [
                "- Unstable: "
                + "; ".join(unstable)
                + " — a run below 90 % of its configuration's best did not train properly, "
                "and the comparisons involving it say more about that than about the batch."
            ]
            if unstable
            else []
        ),
        "",
        "Validation accuracy per epoch, mean over seeds: `val_acc.png`. *Minutes from the run "
        "directory's timestamps (config written → last metrics row), mean over seeds.",
        "",
    ]
    write_results(HERE / "results.md", "\n".join(lines))


if __name__ == "__main__":
    main()
