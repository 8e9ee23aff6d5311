"""Does SyncBN rescue BatchNorm when each process holds 2 images? The study behind README.md here.

    make study-syncbn-small-batch          # or: python -m experiments.syncbn_small_batch.run
    python -m experiments.syncbn_small_batch.run --collect   # re-tabulate without training

norm_vs_batch_size's digits recipe (conf/experiment/densenet_digits_study.yaml) at 4 images per
step, its learning rate scaled to them, three ways:

- bn, 2 processes × 2 (DDP on CPU, gloo): each process normalises over its own 2 images;
- syncbn, 2 processes × 2: BN statistics over the union of both processes' images, 4;
- bn, 1 process × 4: the single-process reference.

Runs land in logs/studies/syncbn_small_batch/; writes runs.csv, results.md and test_error.png.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from experiments.lib.command_line import study_main
from experiments.lib.jobs import Configuration, StudyJob, configuration_jobs
from experiments.lib.plots import plot_errors
from experiments.lib.recipes import SMALL_DENSENET_DIGITS, DataRecipe
from experiments.lib.results import RunTable, claim_rule_line, report_header, results_table
from normlab.collect.comparison import Claim, judged

BATCH = 4
DDP = ("trainer=ddp_cpu", f"data.global_batch_size={BATCH}")
CONFIGURATIONS = {
    "bn 2×2 (DDP)": Configuration((*DDP, "norm=bn"), processes=2),
    "syncbn 2×2 (DDP)": Configuration((*DDP, "norm=syncbn"), processes=2),
    "bn 1×4": Configuration(("norm=bn", f"data.batch_size={BATCH}")),
}
# The study's one data set: its runs.csv, results.md and run folder carry no data-set suffix.
RECIPE = replace(SMALL_DENSENET_DIGITS, suffix="")
# "syncbn matches BN over the same 4 images": the difference within this many points of test
# error (README.md).
MARGIN = 1.0


def jobs(recipe: DataRecipe, seeds: list[int]) -> list[StudyJob]:
    lr = (f"task.optimizer.lr={recipe.lr(BATCH):g}",)
    configurations = {
        name: Configuration((*lr, *c.overrides), c.processes) for name, c in CONFIGURATIONS.items()
    }
    return configuration_jobs(recipe.experiment, configurations, seeds)


def report(recipe: DataRecipe, table: RunTable, here: Path) -> str:
    title = f"{BATCH} images per optimizer step, three ways"
    errors = plot_errors(
        table, list(CONFIGURATIONS), title, recipe.experiment, here / "test_error.png"
    )
    sync, local, single = errors["syncbn 2×2 (DDP)"], errors["bn 2×2 (DDP)"], errors["bn 1×4"]
    lines = [
        *report_header(
            "syncbn_small_batch",
            recipe,
            f"python -m normlab.train experiment={recipe.experiment} logger=csv "
            f"task.optimizer.lr={recipe.lr(BATCH):g} seed=S <the configuration's overrides in "
            "run.py>",
            table,
        ),
        f"Test error (%); {BATCH} images per optimizer step everywhere:",
        "",
        *results_table(errors),
        "",
        claim_rule_line(f"±{MARGIN:g} points of error"),
        "",
        "- syncbn over 2 × 2 matches BN on 4 images in one process: syncbn 2×2 − bn 1×4 = "
        f"{judged(Claim.within(MARGIN), sync, single)}.",
        "- plain BN on 2 images per process is worse than BN on 4: bn 2×2 − bn 1×4 = "
        f"{judged(Claim.higher(), local, single)}.",
        "",
        "Every seed with each configuration's 95 % interval: `test_error.png`.",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    study_main(__doc__.splitlines()[0], "syncbn_small_batch", [RECIPE], jobs, report)


if __name__ == "__main__":
    main()
