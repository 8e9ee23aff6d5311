"""Does ConvNeXt need its LayerNorm, or does BatchNorm do as well? The study behind README.md here.

    make study-convnext-bn-vs-ln          # or: python -m experiments.convnext_bn_vs_ln.run
    python -m experiments.convnext_bn_vs_ln.run --collect    # re-tabulate without training

ConvNeXt-atto on digits (conf/experiment/convnext_digits_study.yaml) with its channels-first
LayerNorm (`ln`) and with BatchNorm (`bn`) in every block, the stem and the head. The ConvNeXt
paper ("substituting BN with LN", in its micro-design steps) reports 81.4 % → 81.5 % on
ImageNet: the swap costs nothing. Runs land in logs/studies/convnext_bn_vs_ln/; writes runs.csv,
results.md, test_error.png and val_acc.png here.
"""

from __future__ import annotations

from pathlib import Path

from experiments.lib.command_line import study_main
from experiments.lib.jobs import Configuration, StudyJob, configuration_jobs
from experiments.lib.plots import caption, plot_curves, plot_errors
from experiments.lib.recipes import DataRecipe
from experiments.lib.results import RunTable, claim_rule_line, report_header, results_table
from normlab.collect.comparison import Claim, judged

RECIPE = DataRecipe(
    "digits",
    "convnext_digits_study",
    "ConvNeXt-atto on scikit-learn's digits at 32 px, stride-2 stem, batch 64, AdamW + one-cycle "
    "at lr 2e-3, drop path 0.05, 5 epochs",
)
CONFIGURATIONS = {"ln": Configuration(("norm=ln",)), "bn": Configuration(("norm=bn",))}
# "The swap costs about nothing": bn − ln within this many points of test error (README.md).
MARGIN = 1.0


def jobs(recipe: DataRecipe, seeds: list[int]) -> list[StudyJob]:
    return configuration_jobs(recipe.experiment, CONFIGURATIONS, seeds)


def report(recipe: DataRecipe, table: RunTable, here: Path) -> str:
    title, path = "ConvNeXt-atto: LN or BN", here / "test_error.png"
    errors = plot_errors(table, list(CONFIGURATIONS), title, recipe.experiment, path)
    note = caption(table, recipe.experiment)
    curves = {name: table.curves(name, "val/acc") for name in CONFIGURATIONS}
    plot_curves(
        curves, "val accuracy", "Validation accuracy, mean over seeds", note, here / "val_acc.png"
    )
    lines = [
        *report_header(
            "convnext_bn_vs_ln",
            recipe,
            f"python -m normlab.train experiment={recipe.experiment} logger=csv norm=ln|bn seed=S",
            table,
        ),
        "ConvNeXt-atto test error (%):",
        "",
        *results_table(errors),
        "",
        claim_rule_line(f"±{MARGIN:g} points of error"),
        "",
        "- Swapping LN for BN costs about nothing (ConvNeXt paper: 81.5 % LN vs 81.4 % BN top-1): "
        f"bn − ln = {judged(Claim.within(MARGIN), errors['bn'], errors['ln'])}.",
        "",
        "Validation accuracy per epoch (mean over seeds): `val_acc.png`; test errors with every "
        "seed and 95 % intervals: `test_error.png`.",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    study_main(__doc__.splitlines()[0], "convnext_bn_vs_ln", [RECIPE], jobs, report)


if __name__ == "__main__":
    main()
