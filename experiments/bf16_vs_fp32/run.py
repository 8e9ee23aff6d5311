"""Does bf16 mixed precision change what a norm study finds? The study behind README.md here.

    make study-bf16-vs-fp32          # or: python -m experiments.bf16_vs_fp32.run
    python -m experiments.bf16_vs_fp32.run --collect   # re-tabulate without training

Fashion-MNIST with the norm studies' recipe (conf/experiment/fashion_norm_study.yaml): bn, gn,
frn and evonorm_s0 at 2 and 32 images per step (learning rate scaled linearly, 0.1 at 32), each
trained with ``trainer.precision=32-true`` (the recipe's) and ``bf16-mixed`` (CPU autocast to
bfloat16). The 32-true runs are small_batch_norms' runs of the same norms and batches (same
overrides), copied from logs/studies/small_batch_norms/ when it ran at the same commit. Runs land
in logs/studies/bf16_vs_fp32/; writes runs.csv, results.md and error_by_precision.png here.
"""

from __future__ import annotations

from pathlib import Path

from experiments.lib.command_line import study_main
from experiments.lib.jobs import Configuration, StudyJob, configuration_jobs, slug
from experiments.lib.plots import caption, plot_cells
from experiments.lib.recipes import FASHION_MNIST, DataRecipe
from experiments.lib.results import RunTable, claim_rule_line, report_header
from normlab.collect.comparison import Cell, Claim, difference, direction_words, judged

NORMS = ["bn", "gn", "frn", "evonorm_s0"]
BATCHES = [2, 32]
# Display name → the overrides that set the precision (none: the recipe's 32-true, so that the
# runs are small_batch_norms' twins).
PRECISIONS = {"fp32": (), "bf16": ("trainer.precision=bf16-mixed",)}
# "bf16-mixed matches fp32": bf16 − fp32 within ±MARGIN points of test error, as README.md states
# it before the numbers (the margin of the other norm studies' equivalence claims).
MARGIN = 2.0


def name(norm: str, batch: int, precision: str) -> str:
    return f"{norm} b{batch} {precision}"


def configurations(recipe: DataRecipe) -> dict[str, Configuration]:
    # The order and overrides of small_batch_norms' jobs for these norms: norm, batch, lr.
    return {
        name(norm, batch, precision): Configuration(
            (
                f"norm={norm}",
                f"data.batch_size={batch}",
                f"task.optimizer.lr={recipe.lr(batch):g}",
                *overrides,
            )
        )
        for batch in BATCHES
        for norm in NORMS
        for precision, overrides in PRECISIONS.items()
    }


def jobs(recipe: DataRecipe, seeds: list[int]) -> list[StudyJob]:
    return configuration_jobs(recipe.experiment, configurations(recipe), seeds)


def changed_beyond_seed_noise(bf16: Cell, fp32: Cell) -> str:
    """The issue's question, "does bf16 change the error by more than the seed noise?": yes
    where the 95 % interval of bf16 − fp32 excludes 0."""
    words = direction_words(difference(bf16, fp32))
    if words in ("higher", "lower"):
        return f"yes ({words})"
    return "no" if words == "inconclusive" else "— (n < 2)"


def report(recipe: DataRecipe, table: RunTable, here: Path) -> str:
    errors = {key: table.error(slug(key)) for key in configurations(recipe)}
    plot_cells(
        {
            precision: {
                f"{norm} b{batch}": errors[name(norm, batch, precision)]
                for batch in BATCHES
                for norm in NORMS
            }
            for precision in PRECISIONS
        },
        "test error (%)",
        "bf16-mixed vs 32-true, per norm and batch",
        caption(table, recipe.experiment),
        here / "error_by_precision.png",
    )
    rows, findings = [], []
    for batch in BATCHES:
        for norm in NORMS:
            fp32, bf16 = (errors[name(norm, batch, precision)] for precision in PRECISIONS)
            minutes = [table.minutes(slug(name(norm, batch, p))) for p in PRECISIONS]
            rows.append(
                f"| {norm} | {batch} | {fp32.text()} | {bf16.text()} | "
                f"{difference(bf16, fp32).text()} | {changed_beyond_seed_noise(bf16, fp32)} | "
                f"{minutes[1] / minutes[0]:.2f} |"
            )
            findings.append(
                f"{norm} at {batch}: {judged(Claim.within(MARGIN), bf16.values, fp32.values)}"
            )
    lines = [
        *report_header(
            "bf16_vs_fp32",
            recipe,
            f"python -m normlab.train experiment={recipe.experiment} logger=csv norm=N "
            f"data.batch_size=B task.optimizer.lr={recipe.lr(32):g}·B/32 seed=S "
            "[trainer.precision=bf16-mixed]",
            table,
        ),
        "Test error (%), mean ± std over the seeds; bf16 − fp32 with its 95 % Welch interval; "
        "'beyond seed noise': whether that interval excludes 0; time: a bf16-mixed run's "
        "minutes (start-up, training and evaluation) over the fp32 run's:",
        "",
        "| norm | batch | fp32 | bf16-mixed | bf16 − fp32 | beyond seed noise | time bf16 / fp32 |",
        "|---|---:|---:|---:|---:|---|---:|",
        *rows,
        "",
        claim_rule_line(f"±{MARGIN:g} points of error"),
        "",
        f"- **bf16-mixed matches fp32** (bf16 − fp32 within ±{MARGIN:g} points): "
        + "; ".join(findings)
        + ".",
        "",
        "Every seed with each cell's 95 % interval: `error_by_precision.png`; the step time of "
        "each model family in both precisions: [../bench/precision.md](../bench/precision.md).",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    study_main(
        __doc__.splitlines()[0], "bf16_vs_fp32", [FASHION_MNIST], jobs, report, reuse_runs=True
    )


if __name__ == "__main__":
    main()
