"""Does SyncBN rescue BatchNorm when each process holds 2 images? The study behind README.md here.

    make study-syncbn-small-batch          # or: python -m experiments.syncbn_small_batch.run
    python -m experiments.syncbn_small_batch.run --collect   # re-tabulate finished runs only

DenseNet-BC (L=40, k=12) on digits at 16 px, 5 epochs of AdamW + one-cycle at lr 0.00125 (the
norm_vs_batch_size recipe at batch 4), three ways of training on 4 images per step:

- bn, 2 processes × 2 (DDP on CPU, gloo): each process normalises over its own 2 images;
- syncbn, 2 processes × 2: BN statistics over the union of both processes' images, 4;
- bn, 1 process × 4: the single-process reference.

Runs land in logs/studies/syncbn_small_batch/<configuration>_seed<seed>; finished runs are kept.
Writes results.md and test_error.png here.
"""

from __future__ import annotations

from pathlib import Path

from experiments.lib.study import (
    Configuration,
    collect_test_errors,
    configuration_jobs,
    configuration_study_main,
    machine_line,
    mean_and_spread,
    plot_configurations,
    results_table,
    study_code_line,
    study_root,
    study_time_line,
    verdict,
)

HERE = Path(__file__).resolve().parent
ROOT = study_root("syncbn_small_batch")
RECIPE = (
    "model=densenet_bc_40",
    "data.image_size=16",
    "trainer.max_epochs=5",
    "task.optimizer.lr=0.00125",
)
DDP = ("trainer=ddp_cpu", "data.global_batch_size=4")
CONFIGURATIONS = {
    "bn 2×2 (DDP)": Configuration((*RECIPE, *DDP, "norm=bn"), processes=2),
    "syncbn 2×2 (DDP)": Configuration((*RECIPE, *DDP, "norm=syncbn"), processes=2),
    "bn 1×4": Configuration((*RECIPE, "norm=bn", "data.batch_size=4")),
}


def report(seeds: list[int]) -> str:
    jobs = configuration_jobs("densenet_digits", CONFIGURATIONS, seeds)
    errors = collect_test_errors(ROOT, list(CONFIGURATIONS), seeds)
    plot_configurations(errors, "test error (%)", HERE / "test_error.png")
    mean = {name: mean_and_spread(values)[0] for name, values in errors.items()}
    std = {name: mean_and_spread(values)[1] for name, values in errors.items()}

    def noise(*names: str) -> float:
        return 2 * max(std[name] for name in names)

    sync, local, single = "syncbn 2×2 (DDP)", "bn 2×2 (DDP)", "bn 1×4"
    sync_gap = mean[sync] - mean[single]
    local_gap = mean[local] - mean[single]
    lines = [
        "# syncbn_small_batch: results",
        "",
        "Command: `python -m experiments.syncbn_small_batch.run` (`make study-syncbn-small-batch`);"
        " each run is `python -m normlab.train experiment=densenet_digits logger=csv "
        + " ".join(RECIPE)
        + " seed=S` plus the configuration's overrides in run.py.",
        f"Machine: {machine_line()}. {study_time_line(ROOT, jobs)}. {study_code_line(ROOT, jobs)}.",
        "",
        "Test error (%) after 5 epochs; 4 images per optimizer step everywhere:",
        "",
        *results_table(errors, seeds),
        "",
        "Findings (a gap counts only if it exceeds twice the larger seed std of the two "
        "configurations):",
        "",
        f"- syncbn over 2 × 2 matches BN on 4 images in one process: {sync} − {single} = "
        f"{sync_gap:+.1f} points, noise {noise(sync, single):.1f} — "
        f"{verdict(abs(sync_gap) <= noise(sync, single))}.",
        f"- plain BN on 2 images per process is worse than BN on 4: {local} − {single} = "
        f"{local_gap:+.1f} points, noise {noise(local, single):.1f} — "
        f"{verdict(local_gap > noise(local, single))}.",
        "",
        "Per-seed values are in the run dirs (`csv/metrics.csv`); the plot is `test_error.png`.",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    configuration_study_main(
        __doc__.splitlines()[0],
        "syncbn_small_batch",
        "densenet_digits",
        CONFIGURATIONS,
        report,
        default_seeds=[42, 1, 2],
    )


if __name__ == "__main__":
    main()
