"""Gradient accumulation is not a bigger batch for BatchNorm: the study behind README.md here.

    make study-accumulation-vs-batch            # or: python -m experiments.accumulation_vs_batch.run
    python -m experiments.accumulation_vs_batch.run --collect       # re-tabulate finished runs
    python -m experiments.accumulation_vs_batch.run --data digits   # the earlier digits version

Every configuration takes an optimizer step every 32 samples and sees the same samples in the
same order, so only what the norm sees changes (k = 2 on Fashion-MNIST, 4 on digits):

- bn, batch k × accumulate 32/k: BN normalises over k samples;
- bn, batch 32: BN over 32;
- syncbn, 2 processes × 16: BN over the union, 32;
- gn, batch k × accumulate 32/k and gn, batch 32: GroupNorm, which never looks across samples.

Fashion-MNIST uses the norm studies' recipe (conf/experiment/fashion_norm_study.yaml); digits
uses experiment=densenet_digits (DenseNet-BC-100, 3 epochs, AdamW + one-cycle, lr 3e-3).
Runs land in logs/studies/accumulation_vs_batch[_digits]/; an interrupted study resumes.
Writes results[_digits].md (table, findings checked against the expectation) and
test_acc[_digits].png here.
"""

from __future__ import annotations

from pathlib import Path

from experiments.lib.study import (
    FASHION_MNIST,
    Configuration,
    DataRecipe,
    StudyJob,
    collect,
    configuration_jobs,
    data_study_main,
    job_minutes,
    machine_line,
    mean_and_spread,
    plot_configurations,
    slug,
    study_code_line,
    study_time_line,
    verdict,
)

HERE = Path(__file__).resolve().parent
DIGITS = DataRecipe(
    "digits",
    "densenet_digits",
    (),
    base_lr=0.003,
    description="DenseNet-BC (L=100, k=12) on scikit-learn's digits at 28 px, 3 epochs of AdamW "
    "+ one-cycle, channels_last",
    suffix="_digits",
)
# Samples per forward pass in the accumulated configurations.
MICRO_BATCH = {"fashion_mnist": 2, "digits": 4}
OPTIMIZER_BATCH = 32


def configurations(recipe: DataRecipe) -> dict[str, tuple[Configuration, int]]:
    """Display name → (configuration, samples each normalisation sees)."""
    k = MICRO_BATCH[recipe.name]
    steps = OPTIMIZER_BATCH // k
    # The same overrides, in the same order, as norm_vs_batch_size's batch-32 runs: a finished
    # twin there is copied instead of trained again.
    lr = f"task.optimizer.lr={recipe.lr(OPTIMIZER_BATCH):g}"

    def config(*overrides: str, processes: int = 1) -> Configuration:
        return Configuration((*recipe.overrides, *overrides), processes)

    accumulated = (f"data.batch_size={k}", lr, f"trainer.accumulate_grad_batches={steps}")
    return {
        f"bn {k}×{steps} (accumulated)": (config("norm=bn", *accumulated), k),
        "bn 32": (config("norm=bn", "data.batch_size=32", lr), 32),
        "syncbn 2×16": (
            config("norm=syncbn", "trainer=ddp_cpu", "data.global_batch_size=32", lr, processes=2),
            32,
        ),
        f"gn {k}×{steps} (accumulated)": (config("norm=gn", *accumulated), 1),
        "gn 32": (config("norm=gn", "data.batch_size=32", lr), 1),
    }


def jobs(recipe: DataRecipe, seeds: list[int]) -> list[StudyJob]:
    configs = {name: config for name, (config, _) in configurations(recipe).items()}
    return configuration_jobs(recipe.experiment, configs, seeds)


def report(recipe: DataRecipe, root: Path, seeds: list[int]) -> str:
    configs = configurations(recipe)
    names = list(configs)
    accuracy = {
        name: [100 * a for a in values]
        for name, values in collect(root, names, seeds, "test/acc").items()
    }
    plot_configurations(accuracy, "test accuracy (%)", HERE / f"test_acc{recipe.suffix}.png")
    mean = {name: mean_and_spread(values)[0] for name, values in accuracy.items()}
    spread = {name: max(values) - min(values) for name, values in accuracy.items()}
    minutes = {
        name: mean_and_spread([job_minutes(root / f"{slug(name)}_seed{s}") for s in seeds])[0]
        for name in names
    }
    accumulated_bn, accumulated_gn = names[0], names[3]

    def compare(big: str, small: str) -> tuple[float, float, str]:
        """Mean gap big − small, the larger seed spread (max − min) of the two, and the
        per-seed (paired) gaps: a seed fixes the initial weights and the sample order in every
        configuration."""
        paired = ", ".join(
            f"{b - a:+.1f}" for b, a in zip(accuracy[big], accuracy[small], strict=True)
        )
        return mean[big] - mean[small], max(spread[big], spread[small]), paired

    bn_gap, bn_noise, bn_paired = compare("bn 32", accumulated_bn)
    gn_gap, gn_noise, gn_paired = compare("gn 32", accumulated_gn)
    sync_gap, sync_noise, sync_paired = compare("bn 32", "syncbn 2×16")
    unstable = [
        f"{name} ({', '.join(f'{a:.1f}' for a in accuracy[name])} %)"
        for name in names
        if min(accuracy[name]) < 0.9 * max(accuracy[name])
    ]
    rows = [
        f"| {name} | {configs[name][1]} | "
        + " | ".join(f"{a:.1f}" for a in accuracy[name])
        + f" | **{mean[name]:.1f}** | {minutes[name]:.1f} |"
        for name in names
    ]
    job_list = jobs(recipe, seeds)
    data_flag = f" --data {recipe.name}" if recipe.suffix else ""
    lines = [
        "# accumulation_vs_batch: results",
        "",
        f"Command: `python -m experiments.accumulation_vs_batch.run{data_flag}` "
        f"(`make study-accumulation-vs-batch"
        + (f' ARGS="{data_flag.strip()}"' if data_flag else "")
        + f"`); each run is `python -m normlab.train experiment={recipe.experiment} logger=csv "
        "seed=S` plus the overrides in run.py.",
        f"Recipe: {recipe.description}.",
        f"Machine: {machine_line()}. {study_time_line(root, job_list)} (two 1-thread runs or one "
        f"2-process run at a time). {study_code_line(root, job_list)}.",
        "",
        f"Test accuracy (%); an optimizer step every {OPTIMIZER_BATCH} samples and the same "
        "samples everywhere.",
        "",
        "| configuration | samples per normalisation | "
        + " | ".join(f"seed {s}" for s in seeds)
        + " | mean | minutes per run |",
        "|---|---:|" + "---:|" * len(seeds) + "---:|---:|",
        *rows,
        "",
        "Findings, each checked against its expectation; a difference counts only if it exceeds "
        "the seed-to-seed spread (max − min) of the two configurations compared (per-seed "
        "differences in brackets, seeds in the order above):",
        "",
        f"- BN with accumulation vs the true batch: bn 32 − {accumulated_bn} = {bn_gap:+.1f} "
        f"points [{bn_paired}], seed spread {bn_noise:.1f}. Expected: accumulation does not give "
        f"BN a big batch, so {accumulated_bn.split(' (')[0]} is worse — "
        f"{verdict(bn_gap > bn_noise)}.",
        f"- GN is indifferent to the per-step batch: gn 32 − {accumulated_gn} = {gn_gap:+.1f} "
        f"points [{gn_paired}], seed spread {gn_noise:.1f} — {verdict(abs(gn_gap) <= gn_noise)}.",
        f"- syncbn over 2 × 16 equals BN on batch 32: bn 32 − syncbn 2×16 = {sync_gap:+.1f} "
        f"points [{sync_paired}], seed spread {sync_noise:.1f} — "
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
        f"Test accuracy per configuration, every seed a dot: `test_acc{recipe.suffix}.png`. "
        "Minutes per run: wall time of the whole run (start-up, training, validation and test), "
        "mean over seeds.",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    data_study_main(
        __doc__.splitlines()[0],
        "accumulation_vs_batch",
        [FASHION_MNIST, DIGITS],
        jobs,
        report,
        default_seeds=[42, 1, 2],
    )


if __name__ == "__main__":
    main()
