"""Train `experiment=retinanet_digits` once, timed, and commit-ready results next to this file.

    make exp-retinanet-digits                    # or: python experiments/retinanet_digits/run.py
    make exp-retinanet-digits ARGS="norm=gn"     # extra Hydra overrides go to the training run

Writes results.md (command, machine, wall time, the test mAP table, the validation curve) and
val_map.png here; the run itself lands under logs/detection/retinanet_digits/.

    python experiments/retinanet_digits/run.py --from-run RUN_DIR --minutes M

re-tabulates an existing run of the same experiment (its wall time given in minutes).
"""

from __future__ import annotations

import csv
import os
import platform
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
from matplotlib.figure import Figure

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
METRICS = ["map", "map_50", "map_75", "map_small", "map_medium", "map_large", "mar_100"]


def train(overrides: list[str]) -> tuple[Path, float, list[str]]:
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d_%H-%M-%S")
    run_dir = ROOT / "logs" / "detection" / "retinanet_digits" / f"study_{stamp}"
    command = [
        sys.executable,
        "-m",
        "normlab.train",
        "experiment=retinanet_digits",
        "logger=csv",
        f"hydra.run.dir={run_dir}",
        *overrides,
    ]
    start = time.perf_counter()
    subprocess.run(command, cwd=ROOT, check=True, env={**os.environ, "WANDB_MODE": "offline"})
    return run_dir, time.perf_counter() - start, command


def read_metrics(run_dir: Path) -> tuple[dict[str, float], list[tuple[int, float, float]]]:
    with (run_dir / "csv" / "metrics.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    test = {m: float(r[f"test/{m}"]) for r in rows for m in METRICS if r.get(f"test/{m}")}
    curve = [
        (int(r["epoch"]), float(r["val/map"]), float(r["val/map_50"]))
        for r in rows
        if r.get("val/map_50")
    ]
    return test, curve


def plot(curve: list[tuple[int, float, float]], path: Path) -> None:
    figure = Figure(figsize=(5, 3.2), dpi=120)
    axes = figure.add_subplot()
    epochs = [e + 1 for e, _, _ in curve]
    axes.plot(epochs, [m50 for _, _, m50 in curve], marker="o", label="mAP@0.5")
    axes.plot(epochs, [m for _, m, _ in curve], marker="o", label="mAP@[.5:.95]")
    axes.set_xlabel("epoch")
    axes.set_ylabel("validation")
    axes.set_ylim(0, 1)
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    figure.savefig(path)


def main() -> None:
    overrides = sys.argv[1:]
    if overrides[:1] == ["--from-run"]:
        run_dir, seconds = Path(overrides[1]), 60 * float(overrides[3])
        saved = (run_dir / ".hydra" / "overrides.yaml").read_text().splitlines()
        overrides = [line.removeprefix("- ") for line in saved if "experiment=" not in line]
        command = [sys.executable, "-m", "normlab.train", "experiment=retinanet_digits", *overrides]
    else:
        run_dir, seconds, command = train(overrides)
    test, curve = read_metrics(run_dir)
    plot(curve, HERE / "val_map.png")
    shown = " ".join(["python -m normlab.train", "experiment=retinanet_digits", *overrides])
    lines = [
        "# retinanet_digits: results",
        "",
        f"Command: `{shown}` (run by `make exp-retinanet-digits`).",
        f"Machine: {os.cpu_count()} CPU cores, {platform.processor() or platform.machine()}, "
        f"torch {torch.__version__}, no GPU. Date: {datetime.now(timezone.utc):%Y-%m-%d}.",
        f"Wall time, data generation and test included: **{seconds / 60:.1f} min**.",
        "",
        "Test split (300 scenes whose digit samples never appear in training), COCO metrics:",
        "",
        "| " + " | ".join(METRICS) + " |",
        "|" + "---|" * len(METRICS),
        "| " + " | ".join(f"{test.get(m, float('nan')):.3f}" for m in METRICS) + " |",
        "",
        "Validation after each epoch (`val_map.png`):",
        "",
        "| epoch | mAP | mAP@0.5 |",
        "|---|---|---|",
        *(f"| {e + 1} | {m:.3f} | {m50:.3f} |" for e, m, m50 in curve),
        "",
    ]
    (HERE / "results.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
