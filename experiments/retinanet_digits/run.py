"""Train `experiment=retinanet_digits` once, timed, and write results next to this file.

    make exp-retinanet-digits                    # or: python -m experiments.retinanet_digits.run
    make exp-retinanet-digits ARGS="norm=gn"     # extra Hydra overrides go to the training run
    python -m experiments.retinanet_digits.run --from-run RUN_DIR --minutes M

Writes results.md (command, machine, wall time, the test mAP table, the validation curve) and
val_map.png. ``--from-run`` re-tabulates an earlier run of the same experiment.
"""

from __future__ import annotations

import sys
from pathlib import Path

from matplotlib.figure import Figure

from experiments.lib.command_line import single_run, write_results
from experiments.lib.jobs import machine_line
from experiments.lib.results import column, read_metrics

HERE = Path(__file__).resolve().parent
METRICS = ["map", "map_50", "map_75", "map_small", "map_medium", "map_large", "mar_100"]


def plot(curves: dict[str, list[tuple[int, float]]], path: Path) -> None:
    figure = Figure(figsize=(5, 3.2), dpi=120)
    axes = figure.add_subplot()
    for label, points in curves.items():
        axes.plot([e + 1 for e, _ in points], [v for _, v in points], marker="o", label=label)
    axes.set_xlabel("epoch")
    axes.set_ylabel("validation")
    axes.set_ylim(0, 1)
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    figure.savefig(path)


def main() -> None:
    run_dir, seconds, overrides = single_run("detection", "retinanet_digits", sys.argv[1:])
    rows = read_metrics(run_dir)
    test = {m: column(rows, f"test/{m}")[-1][1] for m in METRICS}
    map50, map_all = column(rows, "val/map_50"), column(rows, "val/map")
    plot({"mAP@0.5": map50, "mAP@[.5:.95]": map_all}, HERE / "val_map.png")
    lines = [
        "# retinanet_digits: results",
        "",
        "Command: `python -m normlab.train "
        + " ".join(["experiment=retinanet_digits", *overrides])
        + "` (run by `make exp-retinanet-digits`).",
        f"Machine: {machine_line()}.",
        f"Wall time, data generation and test included: **{seconds / 60:.1f} min**.",
        "",
        "Test split (300 scenes whose digit samples never appear in training), COCO metrics:",
        "",
        "| " + " | ".join(METRICS) + " |",
        "|" + "---|" * len(METRICS),
        "| " + " | ".join(f"{test[m]:.3f}" for m in METRICS) + " |",
        "",
        "Validation after each epoch (`val_map.png`):",
        "",
        "| epoch | mAP | mAP@0.5 |",
        "|---|---|---|",
        *(
            f"| {e + 1} | {m:.3f} | {m50:.3f} |"
            for (e, m), (_, m50) in zip(map_all, map50, strict=True)
        ),
        "",
    ]
    write_results(HERE / "results.md", "\n".join(lines))


if __name__ == "__main__":
    main()
