"""How each norm's accuracy depends on the per-device batch: the study behind README.md here.

    make study-norm-vs-batch-size              # or: python -m experiments.norm_vs_batch_size.run
    python -m experiments.norm_vs_batch_size.run --collect      # re-tabulate finished runs only
    python -m experiments.norm_vs_batch_size.run --data digits  # the earlier digits version

Every norm in GRID × the images per step GRID gives it × seed, on Fashion-MNIST (the norm studies'
recipe, conf/experiment/fashion_norm_study.yaml) or on scikit-learn's digits (DenseNet-BC L=40 at
16 px, 5 epochs of AdamW + one-cycle). The learning rate scales linearly with the batch, so every
configuration sees the same samples for the same number of epochs. Runs land in
logs/studies/norm_vs_batch_size[_digits]/<norm>_b<batch>_seed<seed>; finished runs are kept, so
an interrupted study resumes. Writes results[_digits].md and error_vs_batch[_digits].png here.
"""

from __future__ import annotations

from pathlib import Path

from matplotlib.figure import Figure

from experiments.lib.study import (
    FASHION_MNIST,
    DataRecipe,
    StudyJob,
    data_study_main,
    final_value,
    machine_line,
    mean_and_spread,
    study_code_line,
    study_time_line,
    verdict,
)

HERE = Path(__file__).resolve().parent
DIGITS = DataRecipe(
    "digits",
    "densenet_digits",
    ("model=densenet_bc_40", "data.image_size=16", "trainer.max_epochs=5"),
    base_lr=0.01,
    description="DenseNet-BC (L=40, k=12) on scikit-learn's digits at 16 px, 5 epochs of AdamW + "
    "one-cycle",
    suffix="_digits",
)
BATCHES = [2, 4, 8, 32]
# Norm → the batches it runs at. The paper's batch sweep compares BN and GN; on Fashion-MNIST ln
# and in run at the two ends only, which keeps the study within an hour on 2 cores (the full
# grid took 68 min). On a CPU cuda_bn runs PyTorch's BatchNorm, so on Fashion-MNIST its row would
# repeat bn's run for run (the digits table shows it): it is left out there.
GRID = {
    "fashion_mnist": {"bn": BATCHES, "gn": BATCHES, "ln": [2, 32], "in": [2, 32]},
    "digits": {norm: BATCHES for norm in ("bn", "gn", "ln", "in", "cuda_bn")},
}
# A seed whose test error exceeds this did not train (the norms that do reach ~1-3 % on digits
# and ~10-15 % on Fashion-MNIST); its cell's spread then says nothing about seed noise.
FAILED_ERROR = {"fashion_mnist": 50.0, "digits": 20.0}
# The GroupNorm paper (Wu & He 2018, Figure 1 / Table 2): ResNet-50 on ImageNet, top-1 error (%)
# at 32 and at 2 images per GPU.
PAPER = {"bn": (23.6, 34.7), "gn": (24.1, 24.1)}


def job_name(norm: str, batch: int, seed: int) -> str:
    return f"{norm}_b{batch}_seed{seed}"


def jobs(recipe: DataRecipe, seeds: list[int]) -> list[StudyJob]:
    # Slowest first (small batches, then the others), so the last jobs to finish are short ones.
    return [
        StudyJob(
            job_name(norm, batch, seed),
            recipe.experiment,
            (
                *recipe.overrides,
                f"norm={norm}",
                f"data.batch_size={batch}",
                f"task.optimizer.lr={recipe.lr(batch):g}",
                f"seed={seed}",
            ),
        )
        for batch in BATCHES
        for seed in seeds
        for norm, batches in GRID[recipe.name].items()
        if batch in batches
    ]


def plot(errors: dict[str, dict[int, list[float]]], path: Path) -> None:
    figure = Figure(figsize=(6, 3.8), dpi=120)
    axes = figure.add_subplot()
    for offset, (norm, by_batch) in enumerate(errors.items()):
        batches = sorted(by_batch)
        stats = [mean_and_spread(by_batch[b]) for b in batches]
        # A small horizontal offset per norm keeps error bars of equal results apart.
        xs = [b * 1.04 ** (offset - 2) for b in batches]
        axes.errorbar(
            xs, [m for m, _ in stats], [s for _, s in stats], marker="o", capsize=3, label=norm
        )
    axes.set_xscale("log", base=2)
    means = [mean_and_spread(v)[0] for by_batch in errors.values() for v in by_batch.values()]
    # A norm that fails to train (tens of % where the others reach a few) would flatten the rest.
    logarithmic = max(means) > 5 * min(means)
    if logarithmic:
        axes.set_yscale("log")
    axes.set_xticks(BATCHES, [str(b) for b in BATCHES])
    axes.set_xlabel("images per device (batch)")
    axes.set_ylabel("test error (%), mean ± std over seeds" + (" (log)" if logarithmic else ""))
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path)


def report(recipe: DataRecipe, root: Path, seeds: list[int]) -> str:
    grid = GRID[recipe.name]
    norms = list(grid)
    errors = {
        norm: {
            b: [100 * (1 - final_value(root / job_name(norm, b, s), "test/acc")) for s in seeds]
            for b in batches
        }
        for norm, batches in grid.items()
    }
    plot(errors, HERE / f"error_vs_batch{recipe.suffix}.png")

    def cell(norm: str, batch: int) -> str:
        if batch not in errors[norm]:
            return "—"
        mean, std = mean_and_spread(errors[norm][batch])
        return f"{mean:.1f} ± {std:.1f}"

    def mean_error(norm: str, batch: int) -> float:
        return mean_and_spread(errors[norm][batch])[0]

    def noise(norm: str, *batches: int) -> float:
        """Twice the largest seed std among the cells compared: smaller gaps are not findings."""
        return 2 * max(mean_and_spread(errors[norm][b])[1] for b in batches)

    failed_error = FAILED_ERROR[recipe.name]
    failed = {
        norm: [b for b in grid[norm] if any(e > failed_error for e in errors[norm][b])]
        for norm in norms
    }
    bn_gap = mean_error("bn", 2) - mean_error("bn", 32)
    bn_noise = noise("bn", 2, 32)
    if bn_gap > bn_noise:
        bn_finding = f"BN at 2 is worse than at 32 beyond the noise — {verdict(True)}"
    elif -bn_gap > bn_noise:
        bn_finding = f"BN at 2 is *better* than at 32 beyond the noise — {verdict(False)}"
    else:
        bn_finding = f"the difference is within the noise — {verdict(False)}"

    def flat_line(norm: str) -> str:
        if failed[norm]:
            batches = ", ".join(str(b) for b in failed[norm])
            return (
                f"- {norm} stays flat across batches: some seeds did not train at batch "
                f"{batches} (test error > {failed_error:g} %; learning rate "
                f"{', '.join(f'{recipe.lr(b):g}' for b in failed[norm])}) — **disagrees**."
            )
        means = [mean_error(norm, b) for b in grid[norm]]
        spread, limit = max(means) - min(means), noise(norm, *grid[norm])
        return (
            f"- {norm} stays flat across batches: max − min of the means = {spread:.1f} points, "
            f"noise {limit:.1f} — {verdict(spread <= limit)}."
        )

    lines = [
        "# norm_vs_batch_size: results",
        "",
        "Command: `python -m experiments.norm_vs_batch_size.run"
        + (f" --data {recipe.name}" if recipe.suffix else "")
        + "` (`make study-norm-vs-batch-size"
        + (f' ARGS="--data {recipe.name}"' if recipe.suffix else "")
        + "`); each run is `python -m normlab.train "
        f"experiment={recipe.experiment} logger=csv "
        + "".join(f"{o} " for o in recipe.overrides)
        + f"norm=N data.batch_size=B task.optimizer.lr={recipe.base_lr:g}·B/32 seed=S`.",
        f"Recipe: {recipe.description}.",
        f"Machine: {machine_line()}. {study_time_line(root, jobs(recipe, seeds))} (two 1-thread "
        f"runs at a time). {study_code_line(root, jobs(recipe, seeds))}.",
        "",
        f"Test error (%), mean ± std over seeds {', '.join(map(str, seeds))}:",
        "",
        "| norm | " + " | ".join(f"batch {b}" for b in BATCHES) + " |",
        "|---|" + "---:|" * len(BATCHES),
        *(f"| {norm} | " + " | ".join(cell(norm, b) for b in BATCHES) + " |" for norm in norms),
        "",
        "Side by side with the GroupNorm paper (ResNet-50 on ImageNet, top-1 error at 32 → 2 "
        "images per GPU):",
        "",
        "| norm | paper, batch 32 → 2 | here, batch 32 → 2 |",
        "|---|---:|---:|",
        *(
            f"| {norm} | {PAPER[norm][0]:.1f} → {PAPER[norm][1]:.1f} % "
            f"({PAPER[norm][1] - PAPER[norm][0]:+.1f}) | {mean_error(norm, 32):.1f} → "
            f"{mean_error(norm, 2):.1f} % ({mean_error(norm, 2) - mean_error(norm, 32):+.1f}) |"
            for norm in PAPER
        ),
        "",
        "Findings, each checked against the paper's; a gap counts only if it exceeds twice the "
        "largest seed std of the cells compared (the noise):",
        "",
        f"- BN's error rises at batch 2: bn 2 − bn 32 = {bn_gap:+.1f} points, noise "
        f"{bn_noise:.1f}; {bn_finding}.",
        *(flat_line(norm) for norm in ("gn", "ln")),
    ]
    if "cuda_bn" in norms:
        cuda_gap = max(abs(mean_error("cuda_bn", b) - mean_error("bn", b)) for b in BATCHES)
        cuda_noise = max(noise("bn", b) for b in BATCHES)
        lines.append(
            f"- cuda_bn tracks bn: largest |cuda_bn − bn| over batches = {cuda_gap:.1f} points, "
            f"noise {cuda_noise:.1f} — {verdict(cuda_gap <= cuda_noise)}."
        )
    lines += [
        "",
        f"Per-seed errors are in the run dirs (`csv/metrics.csv`); the plot is "
        f"`error_vs_batch{recipe.suffix}.png`.",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    data_study_main(
        __doc__.splitlines()[0],
        "norm_vs_batch_size",
        [FASHION_MNIST, DIGITS],
        jobs,
        report,
        default_seeds=[42, 1, 2],
    )


if __name__ == "__main__":
    main()
