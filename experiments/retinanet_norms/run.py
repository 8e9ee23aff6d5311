"""Which norms should a RetinaNet trained from scratch use, in its backbone and in its heads?

    make study-retinanet-norms                 # or: python -m experiments.retinanet_norms.run
    python -m experiments.retinanet_norms.run --collect      # re-tabulate finished runs only

RetinaNet R18-FPN on digit scenes (experiment=retinanet_digits: 128-px COCO-format scenes, batch 8,
AdamW + one-cycle) for EPOCHS epochs, from scratch:

- backbone frozen_bn / bn / syncbn (2 DDP processes × 4 images, BN statistics over all 8),
  each with GroupNorm in the two head towers (the v2 heads);
- bn backbone with no norm in the heads (the v1 detector).

One seed per configuration (a run takes ~9 minutes of one core here, and the study has to fit in
45 minutes on two), plus two more seeds of "bn + gn heads" that measure how far runs of one
configuration scatter: a gap between configurations counts only above twice that spread.
Runs land in logs/studies/retinanet_norms/<configuration>_seed<seed>.
Writes results.md, test_map.png and val_map.png here.
"""

from __future__ import annotations

from pathlib import Path

from experiments.lib.study import (
    Configuration,
    StudyJob,
    collect,
    collect_curves,
    configuration_jobs,
    machine_line,
    mean_and_spread,
    plot_configurations,
    plot_curves,
    results_table,
    study_code_line,
    study_main,
    study_root,
    study_time_line,
    verdict,
)

HERE = Path(__file__).resolve().parent
ROOT = study_root("retinanet_norms")
EPOCHS = 4
RECIPE = (f"trainer.max_epochs={EPOCHS}",)
CONFIGURATIONS = {
    "frozen_bn + gn heads": Configuration((*RECIPE, "norm=frozen_bn", "model.head_norm=gn")),
    "bn + gn heads": Configuration((*RECIPE, "norm=bn", "model.head_norm=gn")),
    "syncbn 2×4 + gn heads": Configuration(
        (
            *RECIPE,
            "norm=syncbn",
            "model.head_norm=gn",
            "trainer=ddp_cpu",
            "data.global_batch_size=8",
        ),
        processes=2,
    ),
    "bn + no head norm": Configuration((*RECIPE, "norm=bn", "model.head_norm=null")),
}
# The configuration whose seed-to-seed spread is measured, and the extra seeds it runs with.
NOISE_CONFIGURATION = "bn + gn heads"
NOISE_SEEDS = [1, 2]


def jobs(seeds: list[int]) -> list[StudyJob]:
    extra = [seed for seed in NOISE_SEEDS if seed not in seeds]
    probe = {NOISE_CONFIGURATION: CONFIGURATIONS[NOISE_CONFIGURATION]}
    return configuration_jobs("retinanet_digits", CONFIGURATIONS, seeds) + configuration_jobs(
        "retinanet_digits", probe, extra
    )


def report(seeds: list[int]) -> str:
    names = list(CONFIGURATIONS)
    maps = collect(ROOT, names, seeds, "test/map")
    maps_50 = collect(ROOT, names, seeds, "test/map_50")
    plot_configurations(maps, "test mAP (COCO, 0.5:0.95)", HERE / "test_map.png")
    plot_curves(collect_curves(ROOT, names, seeds, "val/map"), "val mAP", HERE / "val_map.png")
    mean = {name: mean_and_spread(values)[0] for name, values in maps.items()}
    noise_seeds = [*seeds, *(seed for seed in NOISE_SEEDS if seed not in seeds)]
    probe = collect(ROOT, [NOISE_CONFIGURATION], noise_seeds, "test/map")[NOISE_CONFIGURATION]
    noise = 2 * mean_and_spread(probe)[1]
    frozen, bn, sync, bare = names

    def gap(a: str, b: str) -> float:
        return mean[a] - mean[b]

    lines = [
        "# retinanet_norms: results",
        "",
        "Command: `python -m experiments.retinanet_norms.run` (`make study-retinanet-norms`); each "
        f"run is `python -m normlab.train experiment=retinanet_digits logger=csv "
        f"trainer.max_epochs={EPOCHS} seed=S` plus the configuration's overrides in run.py.",
        f"Machine: {machine_line()}. {study_time_line(ROOT, jobs(seeds))}. "
        f"{study_code_line(ROOT, jobs(seeds))}.",
        "",
        f"Test mAP (COCO 0.5:0.95) after {EPOCHS} epochs from scratch:",
        "",
        *results_table(maps, seeds, digits=3),
        "",
        "Test mAP@0.5:",
        "",
        *results_table(maps_50, seeds, digits=3),
        "",
        f"Seed-to-seed spread: {NOISE_CONFIGURATION} over seeds "
        f"{', '.join(map(str, noise_seeds))} reaches test mAP "
        f"{', '.join(f'{value:.3f}' for value in probe)} (std {noise / 2:.3f}).",
        "",
        f"Findings (a gap counts only above twice that std, {noise:.3f} mAP). Expectations from "
        "detectron2's R50-FPN table (FrozenBN 41.0 < SyncBN 41.9 < GN 42.6 box AP) and the "
        "RetinaNet v2 heads:",
        "",
        f"- A trainable BN backbone beats a frozen one when nothing is pretrained (frozen_bn "
        f"from scratch is a fixed identity scale): bn − frozen_bn = {gap(bn, frozen):+.3f} — "
        f"{verdict(gap(bn, frozen) > noise)}.",
        f"- syncbn over 2 × 4 images matches BN over 8 in one process: syncbn − bn = "
        f"{gap(sync, bn):+.3f} — {verdict(abs(gap(sync, bn)) <= noise)}.",
        f"- GN in the heads helps a detector trained from scratch: gn heads − no head norm = "
        f"{gap(bn, bare):+.3f} — {verdict(gap(bn, bare) > noise)}.",
        "",
        "Validation mAP per epoch: `val_map.png`.",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    study_main(
        __doc__.splitlines()[0],
        ROOT,
        jobs,
        report,
        HERE / "results.md",
        default_seeds=[42],
    )


if __name__ == "__main__":
    main()
