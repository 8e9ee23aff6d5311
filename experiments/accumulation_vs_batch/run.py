"""Gradient accumulation is not a bigger batch for BatchNorm: the study behind README.md here.

    make study-accumulation-vs-batch            # or: python -m experiments.accumulation_vs_batch.run
    python -m experiments.accumulation_vs_batch.run --collect       # re-tabulate without training
    python -m experiments.accumulation_vs_batch.run --data digits   # the earlier digits version

Every configuration takes an optimizer step every 32 samples and sees the same samples in the
same order, so only what the norm sees changes (k = 2 on Fashion-MNIST, 4 on digits):

- bn, batch k × accumulate 32/k: BN normalises over k samples;
- bn, batch 32: BN over 32;
- syncbn, 2 processes × 16: BN over the union, 32;
- gn, batch k × accumulate 32/k and gn, batch 32: GroupNorm, which never looks across samples.

Fashion-MNIST uses the norm studies' recipe (conf/experiment/fashion_norm_study.yaml); digits
uses conf/experiment/densenet_digits.yaml. Runs land in
logs/studies/accumulation_vs_batch[_digits]/; writes runs[_digits].csv, results[_digits].md and
test_error[_digits].png here.
"""

from __future__ import annotations

from pathlib import Path

from experiments.lib.command_line import study_main
from experiments.lib.jobs import Configuration, StudyJob, configuration_jobs, slug
from experiments.lib.plots import plot_errors
from experiments.lib.recipes import DENSENET_DIGITS, FASHION_MNIST, DataRecipe
from experiments.lib.results import RunTable, claim_rule_line, report_header
from normlab.collect.comparison import Claim, judged

# Samples per forward pass in the accumulated configurations.
MICRO_BATCH = {"fashion_mnist": 2, "digits": 4}
OPTIMIZER_BATCH = 32
# "GN is indifferent to the per-step batch" and "syncbn over 2 × 16 equals BN on 32": the
# difference within ±MARGIN points of test error (README.md).
MARGIN = 1.0


def configurations(recipe: DataRecipe) -> dict[str, tuple[Configuration, int]]:
    """Display name → (configuration, samples each normalisation sees)."""
    k = MICRO_BATCH[recipe.name]
    steps = OPTIMIZER_BATCH // k
    # The same overrides, in the same order, as norm_vs_batch_size's batch-32 runs: a finished
    # twin there is copied instead of trained again.
    lr = f"task.optimizer.lr={recipe.lr(OPTIMIZER_BATCH):g}"
    accumulated = (f"data.batch_size={k}", lr, f"trainer.accumulate_grad_batches={steps}")
    return {
        f"bn {k}×{steps} (accumulated)": (Configuration(("norm=bn", *accumulated)), k),
        "bn 32": (Configuration(("norm=bn", "data.batch_size=32", lr)), 32),
        "syncbn 2×16": (
            Configuration(
                ("norm=syncbn", "trainer=ddp_cpu", "data.global_batch_size=32", lr), processes=2
            ),
            32,
        ),
        f"gn {k}×{steps} (accumulated)": (Configuration(("norm=gn", *accumulated)), 1),
        "gn 32": (Configuration(("norm=gn", "data.batch_size=32", lr)), 1),
    }


def jobs(recipe: DataRecipe, seeds: list[int]) -> list[StudyJob]:
    configs = {name: config for name, (config, _) in configurations(recipe).items()}
    return configuration_jobs(recipe.experiment, configs, seeds)


def report(recipe: DataRecipe, table: RunTable, here: Path) -> str:
    configs = configurations(recipe)
    names = list(configs)
    title = f"An optimizer step every {OPTIMIZER_BATCH} samples"
    path = here / f"test_error{recipe.suffix}.png"
    errors = plot_errors(table, names, title, recipe.experiment, path)
    accumulated_bn, accumulated_gn = names[0], names[3]
    width = max(cell.n for cell in errors.values())
    rows = [
        f"| {name} | {configs[name][1]} | "
        + " | ".join([f"{v:.1f}" for v in errors[name].values] + ["—"] * (width - errors[name].n))
        + f" | **{errors[name].text()}** | {table.minutes(slug(name)):.1f} |"
        for name in names
    ]
    lines = [
        *report_header(
            "accumulation_vs_batch",
            recipe,
            f"python -m normlab.train experiment={recipe.experiment} logger=csv seed=S "
            "<the configuration's overrides in run.py>",
            table,
        ),
        f"Test error (%); an optimizer step every {OPTIMIZER_BATCH} samples and the same "
        "samples everywhere; minutes per run: wall time of the whole run (start-up, training, "
        "validation and test), mean over seeds.",
        "",
        "| configuration | samples per normalisation | "
        + " | ".join(f"run {i + 1}" for i in range(width))
        + " | mean ± std | minutes per run |",
        "|---|---:|" + "---:|" * width + "---:|---:|",
        *rows,
        "",
        claim_rule_line(f"±{MARGIN:g} points of error"),
        "",
        f"- Accumulation does not give BN a big batch, so {accumulated_bn.split(' (')[0]} is "
        f"worse than bn 32: {accumulated_bn} − bn 32 = "
        f"{judged(Claim.higher(), errors[accumulated_bn], errors['bn 32'])}.",
        f"- GN is indifferent to the per-step batch: {accumulated_gn} − gn 32 = "
        f"{judged(Claim.within(MARGIN), errors[accumulated_gn], errors['gn 32'])}.",
        "- syncbn over 2 × 16 equals BN on batch 32: syncbn 2×16 − bn 32 = "
        f"{judged(Claim.within(MARGIN), errors['syncbn 2×16'], errors['bn 32'])}.",
        "",
        f"Every seed with each configuration's 95 % interval: `test_error{recipe.suffix}.png`.",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    study_main(
        __doc__.splitlines()[0],
        "accumulation_vs_batch",
        [FASHION_MNIST, DENSENET_DIGITS],
        jobs,
        report,
        reuse_runs=True,
    )


if __name__ == "__main__":
    main()
