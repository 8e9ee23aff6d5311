"""BatchNorm or InstanceNorm in pix2pix, at batch 1 and 16? The study behind README.md here.

    make study-pix2pix-bn-vs-in                # or: python -m experiments.pix2pix_bn_vs_in.run
    python -m experiments.pix2pix_bn_vs_in.run --collect     # re-tabulate without training

pix2pix on digit pairs (conf/experiment/pix2pix_digits_study.yaml: edge map → digit, 64 px,
300 training pairs, 2 + 2 epochs, the generator tested as the reference does without --eval)
with bn or in everywhere, at batch 1 (the reference's) and batch 16. Runs land in
logs/studies/pix2pix_bn_vs_in/; writes runs.csv, results.md, test_l1.png and val_l1.png here.
"""

from __future__ import annotations

from pathlib import Path

from experiments.lib.command_line import study_main
from experiments.lib.jobs import Configuration, StudyJob, configuration_jobs, slug
from experiments.lib.plots import caption, plot_cells, plot_curves
from experiments.lib.recipes import DataRecipe
from experiments.lib.results import RunTable, claim_rule_line, report_header, results_table
from normlab.collect.comparison import Claim, judged

RECIPE = DataRecipe(
    "digit_pairs",
    "pix2pix_digits_study",
    "pix2pix (6-level U-Net and a PatchGAN at ngf = ndf = 32, Adam 2e-4, λ_L1 = 100) on 300 "
    "digit edge-map → digit pairs at 64 px, 2 + 2 epochs (constant, then linear decay), "
    "batch statistics and dropout at test time as in the reference",
)
CONFIGURATIONS = {
    f"{norm} batch {batch}": Configuration((f"norm={norm}", f"data.batch_size={batch}"))
    for batch in (1, 16)
    for norm in ("bn", "in")
}
# Test L1 ([-1, 1] scale) margins stated in README.md: "BN is IN at batch 1" holds if bn − in
# stays within ±EQUAL; "IN does at least as well at batch 16" if bn − in ≥ −NOT_WORSE.
EQUAL, NOT_WORSE = 0.002, 0.01


def jobs(recipe: DataRecipe, seeds: list[int]) -> list[StudyJob]:
    return configuration_jobs(recipe.experiment, CONFIGURATIONS, seeds)


def report(recipe: DataRecipe, table: RunTable, here: Path) -> str:
    names = list(CONFIGURATIONS)
    metrics = {
        metric: {name: table.cell(slug(name), f"test/{metric}") for name in names}
        for metric in ("l1", "psnr", "ssim")
    }
    l1 = metrics["l1"]
    note = caption(table, recipe.experiment)
    plot_cells({"": l1}, "test L1 ([-1, 1] scale)", "pix2pix: BN or IN", note, here / "test_l1.png")
    curves = {name: table.curves(slug(name), "val/l1") for name in names}
    plot_curves(curves, "val L1", "Validation L1, mean over seeds", note, here / "val_l1.png")
    lines = [
        *report_header(
            "pix2pix_bn_vs_in",
            recipe,
            f"python -m normlab.train experiment={recipe.experiment} logger=csv norm=N "
            "data.batch_size=B seed=S",
            table,
        ),
        "Test L1 ([-1, 1] scale, lower is better):",
        "",
        *results_table(l1, digits=4),
        "",
        "Test PSNR (dB):",
        "",
        *results_table(metrics["psnr"], digits=2),
        "",
        "Test SSIM:",
        "",
        *results_table(metrics["ssim"], digits=3),
        "",
        claim_rule_line(f"±{EQUAL:g} L1 at batch 1, {NOT_WORSE:g} L1 at batch 16"),
        "",
        "- At batch 1, BN is instance norm (the pix2pix paper's remark): bn − in = "
        f"{judged(Claim.within(EQUAL), l1['bn batch 1'], l1['in batch 1'], digits=4)}.",
        "- At batch 16, instance norm does at least as well as BN, which mixes images' "
        "statistics (why the reference recommends instance norm for batched training): bn − in = "
        f"{judged(Claim.at_least(NOT_WORSE), l1['bn batch 16'], l1['in batch 16'], digits=4)}.",
        "",
        "Validation L1 per epoch (mean over seeds): `val_l1.png`.",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    study_main(__doc__.splitlines()[0], "pix2pix_bn_vs_in", [RECIPE], jobs, report)


if __name__ == "__main__":
    main()
