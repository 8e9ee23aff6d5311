"""What should replace BN at 2 images per step? The literature's small-batch norms side by side:
the study behind README.md here.

    make study-small-batch-norms          # or: python -m experiments.small_batch_norms.run
    python -m experiments.small_batch_norms.run --collect   # re-tabulate finished runs only

Fashion-MNIST with the norm studies' recipe (conf/experiment/fashion_norm_study.yaml), every
norm in NORMS at 2 and 32 images per step (learning rate scaled linearly, 0.1 at 32), plus Ghost
BN's own use: virtual batches of 4 inside a batch of 32. Batch Renorm's warm-up and ramp are
set in steps, so they scale with the run: r_max = 1, d_max = 0 for the first 5 % of the steps,
then a linear ramp to r_max = 3, d_max = 5 over the next 25 % (the paper: 5k plain steps, then
relaxed by 25k-40k of ~130k). Runs land in logs/studies/small_batch_norms/<name>_b<batch>_seed<s>;
bn and gn runs identical to norm_vs_batch_size's are copied from there when it has them. Writes
results.md and error_by_norm.png here.
"""

from __future__ import annotations

from pathlib import Path

from hydra import compose, initialize_config_dir
from matplotlib.figure import Figure

from experiments.lib.study import (
    FASHION_MNIST,
    DataRecipe,
    StudyJob,
    data_study_main,
    final_value,
    job_minutes,
    machine_line,
    mean_and_spread,
    study_code_line,
    study_time_line,
    verdict,
)
from normlab.utils.hydra_run import CONFIG_DIR

HERE = Path(__file__).resolve().parent
# Display name → norm overrides.
NORMS = {
    "bn": ("norm=bn",),
    "brn": ("norm=brn",),
    "gn": ("norm=gn",),
    "gn+ws": ("norm=gn", "norm.weight_standardization=true"),
    "frn": ("norm=frn",),
    "evonorm_b0": ("norm=evonorm_b0",),
    "evonorm_s0": ("norm=evonorm_s0",),
    "rms": ("norm=rms",),
}
BATCHES = [2, 32]
GHOST = "ghost_bn (virtual 4)"
GHOST_BATCH, GHOST_VIRTUAL = 32, 4


def training_steps(recipe: DataRecipe, batch: int) -> int:
    """Optimizer steps of a run at ``batch``: the recipe's training images and epochs, read from
    its composed config."""
    with initialize_config_dir(str(CONFIG_DIR), version_base=None):
        cfg = compose("config", [f"experiment={recipe.experiment}", *recipe.overrides])
    if cfg.data.train_subset is None:
        raise ValueError(f"experiment={recipe.experiment} must set data.train_subset")
    return cfg.trainer.max_epochs * -(-cfg.data.train_subset // batch)


def norm_overrides(recipe: DataRecipe, name: str, batch: int) -> tuple[str, ...]:
    if name != "brn":
        return NORMS[name]
    steps = training_steps(recipe, batch)
    return (
        *NORMS[name],
        f"norm.warmup_steps={round(0.05 * steps)}",
        f"norm.ramp_steps={round(0.25 * steps)}",
    )


def job_name(name: str, batch: int, seed: int) -> str:
    return f"{name.replace('+', '_').split(' ')[0]}_b{batch}_seed{seed}"


def configurations(recipe: DataRecipe) -> dict[tuple[str, int], tuple[str, ...]]:
    """(display name, batch) → overrides, in the order the study trains them (slowest first)."""
    configs = {
        (name, batch): (
            *recipe.overrides,
            *norm_overrides(recipe, name, batch),
            f"data.batch_size={batch}",
            f"task.optimizer.lr={recipe.lr(batch):g}",
        )
        for batch in BATCHES
        for name in NORMS
    }
    configs[GHOST, GHOST_BATCH] = (
        *recipe.overrides,
        "norm=ghost_bn",
        f"norm.virtual_batch_size={GHOST_VIRTUAL}",
        f"data.batch_size={GHOST_BATCH}",
        f"task.optimizer.lr={recipe.lr(GHOST_BATCH):g}",
    )
    return configs


def jobs(recipe: DataRecipe, seeds: list[int]) -> list[StudyJob]:
    # The same override order as norm_vs_batch_size for bn and gn, so those runs are reused.
    return [
        StudyJob(job_name(name, batch, seed), recipe.experiment, (*overrides, f"seed={seed}"))
        for (name, batch), overrides in configurations(recipe).items()
        for seed in seeds
    ]


def plot(errors: dict[tuple[str, int], list[float]], path: Path) -> None:
    """Test error per norm, batch 2 and batch 32 side by side, every seed as a dot."""
    names = [*NORMS, GHOST]
    figure = Figure(figsize=(8, 3.8), dpi=120)
    axes = figure.add_subplot()
    for offset, batch in zip((-0.2, 0.2), BATCHES, strict=True):
        for index, name in enumerate(names):
            values = errors.get((name, batch))
            if values is None:
                continue
            color = "C0" if batch == 2 else "C1"
            label = f"batch {batch}" if index == 0 else None
            axes.bar(index + offset, mean_and_spread(values)[0], 0.38, color=color, label=label)
            axes.scatter([index + offset] * len(values), values, color="black", s=8, zorder=3)
    axes.set_xticks(range(len(names)), [n.replace(" (", "\n(") for n in names], fontsize=8)
    axes.set_ylabel("test error (%)")
    axes.grid(alpha=0.3, axis="y")
    axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path)


def report(recipe: DataRecipe, root: Path, seeds: list[int]) -> str:
    configs = configurations(recipe)
    errors = {
        key: [
            100 * (1 - final_value(root / job_name(key[0], key[1], s), "test/acc")) for s in seeds
        ]
        for key in configs
    }
    minutes = {
        key: mean_and_spread([job_minutes(root / job_name(key[0], key[1], s)) for s in seeds])[0]
        for key in configs
    }
    plot(errors, HERE / "error_by_norm.png")

    def mean(name: str, batch: int) -> float:
        return mean_and_spread(errors[name, batch])[0]

    def noise(*keys: tuple[str, int]) -> float:
        """Twice the largest seed std among the cells compared: smaller gaps are not findings."""
        return 2 * max(mean_and_spread(errors[key])[1] for key in keys)

    def cell(key: tuple[str, int]) -> str:
        if key not in errors:
            return "—"
        average, std = mean_and_spread(errors[key])
        return f"{average:.1f} ± {std:.1f}"

    def relative_time(key: tuple[str, int]) -> str:
        return "—" if key not in minutes else f"{minutes[key] / minutes['bn', key[1]]:.2f}"

    rows = [
        f"| {name} | {cell((name, 2))} | {cell((name, 32))} | "
        + (
            f"{mean(name, 2) - mean(name, 32):+.1f}"
            if (name, 2) in errors and (name, 32) in errors
            else "—"
        )
        + f" | {relative_time((name, 2))} | {relative_time((name, 32))} |"
        for name in [*NORMS, GHOST]
    ]

    def flat(name: str) -> str:
        gap, limit = mean(name, 2) - mean(name, 32), noise((name, 2), (name, 32))
        return (
            f"{name}: batch 2 − batch 32 = {gap:+.1f} points, noise {limit:.1f} — "
            f"{verdict(abs(gap) <= limit)}"
        )

    bn_loss = mean("bn", 2) - mean("bn", 32)
    bn_loss_noise = noise(("bn", 2), ("bn", 32))
    brn_gain = mean("bn", 2) - mean("brn", 2)
    brn_noise = noise(("bn", 2), ("brn", 2))
    if bn_loss <= bn_loss_noise:
        brn_line = (
            f"- **BRN recovers much of BN's small-batch loss**: not testable here — BN loses "
            f"{bn_loss:+.1f} points from batch 32 to 2 (noise {bn_loss_noise:.1f}), so there is "
            f"no loss to recover; brn at 2 vs bn at 2: {-brn_gain:+.1f} points (noise "
            f"{brn_noise:.1f})."
        )
    else:
        recovered = brn_gain / bn_loss
        comparison = (
            f"{brn_gain:.1f} points better than bn at 2 (noise {brn_noise:.1f}), "
            f"{100 * recovered:.0f} % of the loss"
            if brn_gain >= 0
            else f"{-brn_gain:.1f} points worse than bn at 2 (noise {brn_noise:.1f})"
        )
        brn_line = (
            f"- **BRN recovers much of BN's small-batch loss**: BN loses {bn_loss:+.1f} points "
            f"from batch 32 to 2 (noise {bn_loss_noise:.1f}); brn at 2 is {comparison} — "
            f"{verdict(brn_gain > brn_noise and recovered >= 0.5)} (counted as agreeing if the "
            "gain exceeds the noise and recovers at least half)."
        )

    def competitive(name: str) -> str:
        gap = mean(name, 32) - mean("bn", 32)
        limit = noise((name, 32), ("bn", 32))
        return (
            f"{name} at 32 vs bn at 32: {gap:+.1f} points, noise {limit:.1f} — "
            f"{verdict(gap <= limit)}"
        )

    ghost_gap = mean(GHOST, GHOST_BATCH) - mean("bn", GHOST_BATCH)
    ghost_noise = noise((GHOST, GHOST_BATCH), ("bn", GHOST_BATCH))
    job_list = jobs(recipe, seeds)
    lines = [
        "# small_batch_norms: results",
        "",
        "Command: `python -m experiments.small_batch_norms.run` (`make study-small-batch-norms`); "
        f"each run is `python -m normlab.train experiment={recipe.experiment} logger=csv "
        f"norm=N data.batch_size=B task.optimizer.lr={recipe.base_lr:g}·B/32 seed=S` plus the "
        "norm's overrides in run.py.",
        f"Recipe: {recipe.description}.",
        f"Machine: {machine_line()}. {study_time_line(root, job_list)} (two 1-thread runs at a "
        f"time). {study_code_line(root, job_list)}.",
        "",
        f"Test error (%), mean ± std over seeds {', '.join(map(str, seeds))}; time: minutes per "
        "run (start-up, training and evaluation) relative to bn at the same batch:",
        "",
        "| norm | batch 2 | batch 32 | 2 − 32 | time × bn, batch 2 | time × bn, batch 32 |",
        "|---|---:|---:|---:|---:|---:|",
        *rows,
        "",
        "Each paper's claim, checked here; a gap counts only if it exceeds twice the largest seed "
        "std of the cells compared (the noise):",
        "",
        "- **GN and WS+GN are flat across the batch** (Wu & He 2018; Qiao et al. 2019): "
        + "; ".join(flat(name) for name in ("gn", "gn+ws"))
        + ".",
        brn_line,
        "- **FRN and EvoNorm-S0 are batch-independent** (Singh & Krishnan 2020; Liu et al. "
        "2020): " + "; ".join(flat(name) for name in ("frn", "evonorm_s0")) + ".",
        "- **... and competitive with BN at its best batch**: "
        + "; ".join(competitive(name) for name in ("frn", "evonorm_s0"))
        + " (counted as agreeing if not worse beyond the noise).",
        f"- **Ghost BN (virtual batch {GHOST_VIRTUAL} inside {GHOST_BATCH}) generalises at "
        f"least as well as BN over the whole batch** (Hoffer et al. 2017): ghost_bn − bn = "
        f"{ghost_gap:+.1f} points, noise {ghost_noise:.1f} — "
        f"{verdict(ghost_gap <= ghost_noise)}.",
        "",
        "Per-seed errors are in the run dirs (`csv/metrics.csv`); the plot is "
        "`error_by_norm.png`; the layers' own cost, one norm at a time: "
        "[../bench/norm_cost.md](../bench/norm_cost.md).",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    data_study_main(
        __doc__.splitlines()[0], "small_batch_norms", [FASHION_MNIST], jobs, report, [42, 1, 2]
    )


if __name__ == "__main__":
    main()
