"""Side-by-side timing: candidates measured in alternation in one run, so machine noise cancels.

Every benchmark under ``experiments/bench/`` uses :func:`compare`: warm-up calls, then ``repeats``
rounds in which each candidate runs once (in an order that changes every round), each timed over
``inner`` calls. The table reports min / median / max per candidate and the median of the
per-round ratios to the baseline, the number a speed claim should quote.
"""

from __future__ import annotations

import os
import random
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import lightning.pytorch as pl
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from experiments.lib.jobs import REPO_ROOT, machine_line
from normlab.runs import fill_from_datamodule, instantiate_data
from normlab.utils.hydra_run import CONFIG_DIR
from normlab.utils.run_info import git_sha

# The experiment of each model family, and the overrides that make it a smoke run's size.
FAMILY_EXPERIMENTS = ["densenet_digits", "convnext_digits", "retinanet_digits", "pix2pix_digits"]
TINY = {
    "densenet_digits": ["data.image_size=8", "data.batch_size=8"],
    "convnext_digits": ["data.batch_size=8"],
    "retinanet_digits": [
        "model.fpn_channels=64",
        "data.batch_size=2",
        *(f"data.num_{split}=4" for split in ("train", "val", "test")),
    ],
    "pix2pix_digits": [
        "model.generator.ngf=4",
        "model.discriminator.ndf=4",
        "data.batch_size=2",
        *(f"data.num_{split}=4" for split in ("train", "val", "test")),
    ],
}


@dataclass
class Timing:
    """Seconds per call of one candidate, one entry per round."""

    name: str
    seconds: list[float]

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)

    def ratio_to(self, baseline: Timing) -> float:
        """Median over rounds of this round's time / the baseline's time in the same round."""
        return statistics.median(
            mine / theirs for mine, theirs in zip(self.seconds, baseline.seconds, strict=True)
        )


class EpochTimer(pl.Callback):
    """Seconds from the start to the end of a training epoch (a fit's setup excluded)."""

    seconds: float

    def on_train_epoch_start(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        self._start = time.perf_counter()

    def on_train_epoch_end(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        self.seconds = time.perf_counter() - self._start


def timed_epoch(
    module: pl.LightningModule,
    loader: object,
    steps: int,
    accelerator: str = "cpu",
    precision: str = "32-true",
) -> float:
    """Fit ``module`` for one epoch of ``steps`` batches of ``loader`` with a bare Trainer (no
    logger, checkpoints, progress bar or validation); seconds from epoch start to epoch end."""
    timer = EpochTimer()
    pl.Trainer(
        accelerator=accelerator,
        devices=1,
        precision=precision,
        max_epochs=1,
        limit_train_batches=steps,
        limit_val_batches=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[timer],
    ).fit(module, train_dataloaders=loader)
    return timer.seconds


def experiment_task(
    overrides: list[str], data_root: Path
) -> tuple[DictConfig, pl.LightningModule, pl.LightningDataModule]:
    """What ``python -m normlab.train *overrides`` builds before fitting: its config, its task
    module (seed 0) and its data module, set up for fit with data under ``data_root``."""
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("config", overrides=[*overrides, f"paths.data_dir={data_root}"])
    datamodule = instantiate_data(cfg.data)
    datamodule.prepare_data()
    datamodule.setup("fit")
    fill_from_datamodule(cfg, datamodule)
    torch.manual_seed(0)
    module = instantiate(OmegaConf.to_container(cfg.task, resolve=True), _recursive_=False)
    return cfg, module, datamodule


def experiment_step(
    experiment: str, overrides: list[str], data_root: Path, steps: int, device: str, precision: str
) -> tuple[Callable[[], float], int]:
    """(a call that trains ``experiment``'s own model, data module, optimizer and Trainer loop
    for ``steps`` steps and returns the seconds per step, data loading included; the batch
    size). The model is built once, seeded, and keeps training from call to call; data is
    generated under ``data_root``."""
    cfg, module, datamodule = experiment_task([f"experiment={experiment}", *overrides], data_root)

    def run() -> float:
        loader = datamodule.train_dataloader()
        return timed_epoch(module, loader, steps, device, precision) / steps

    return run, cfg.data.batch_size


def _synchronize(device: torch.device | None) -> None:
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize(device)


def round_order(names: list[str], round_index: int) -> list[str]:
    """The order of one round: two candidates take turns going first; more are shuffled (seeded by
    the round), so that no candidate always runs right after the same one. A rotation keeps the
    neighbours, and a candidate after a heavy one inherits its cache and allocator state: in
    norm_cost syncbn, which runs bn's code, measured 1.16× bn on channels_last with rotation
    (at bcdac0d)."""
    if len(names) <= 2:
        shift = round_index % len(names)
        return names[shift:] + names[:shift]
    order = list(names)
    random.Random(round_index).shuffle(order)
    return order


def compare(
    candidates: dict[str, Callable[[], object]],
    repeats: int = 7,
    warmup: int = 2,
    inner: int = 1,
    device: torch.device | None = None,
) -> list[Timing]:
    """Time every candidate ``repeats`` times, alternating, after ``warmup`` calls of each.

    A candidate that returns a float has measured itself (seconds per call, e.g. excluding a
    setup that real runs pay once); otherwise its wall time is taken. ``device``: a CUDA device
    to synchronise around each measurement (kernels run asynchronously). The first candidate is
    the baseline of :func:`markdown_table`.
    """
    if repeats < 1 or inner < 1:
        raise ValueError(f"repeats and inner must be ≥ 1, got {repeats} and {inner}")
    names = list(candidates)
    for name in names:
        for _ in range(warmup):
            candidates[name]()
    seconds: dict[str, list[float]] = {name: [] for name in names}
    for round_index in range(repeats):
        for name in round_order(names, round_index):
            _synchronize(device)
            start = time.perf_counter()
            measured = [candidates[name]() for _ in range(inner)]
            _synchronize(device)
            if all(isinstance(m, float) for m in measured):
                seconds[name].append(sum(measured) / inner)
            else:
                seconds[name].append((time.perf_counter() - start) / inner)
    return [Timing(name, seconds[name]) for name in names]


def markdown_table(timings: list[Timing], unit: str = "ms") -> str:
    """Min / median / max per candidate and the per-round ratio to the first (the baseline)."""
    scale = {"s": 1.0, "ms": 1e3, "us": 1e6}[unit]
    baseline = timings[0]
    lines = [
        f"| candidate | min ({unit}) | median ({unit}) | max ({unit}) | × {baseline.name} |",
        "|---|---:|---:|---:|---:|",
    ]
    for timing in timings:
        low, mid, high = min(timing.seconds), timing.median, max(timing.seconds)
        lines.append(
            f"| {timing.name} | {low * scale:.2f} | {mid * scale:.2f} | {high * scale:.2f} "
            f"| {timing.ratio_to(baseline):.3f} |"
        )
    return "\n".join(lines)


def machine_load() -> float:
    """The 1-minute load average: taken before and after a benchmark, it says whether other work
    shared the cores while it ran (the tables print both)."""
    return os.getloadavg()[0]


def write_report(path: Path, title: str, command: str, *sections: str, load_before: float) -> str:
    """A benchmark's markdown file: title, the command that reproduces it, the machine and torch
    build, the commit of the code measured (``-dirty`` if tracked files differed from it), the
    machine load before (``load_before``, from :func:`machine_load`) and after, then sections."""
    text = "\n\n".join(
        [
            f"# {title}",
            f"Command: `{command}`  \nMachine: {machine_line()}, "
            f"{torch.get_num_threads()} intra-op threads  \n"
            f"Code: commit {git_sha(REPO_ROOT)}  \n"
            f"Machine load (1-minute load average on {os.cpu_count()} cores): "
            f"{load_before:.1f} before, {machine_load():.1f} after",
            *sections,
        ]
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text + "\n")
    return text
