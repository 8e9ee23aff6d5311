"""What population_statistics measures of one trained run, after training:

    python -m experiments.population_statistics.evaluate RUN_DIR

writes ``RUN_DIR/study_metrics.json``: test error (%) of the run's ``last.ckpt`` evaluated

- ``population``: as trained, with the running statistics training left (a check: it must equal
  the run's own test/acc);
- ``batch_test`` / ``batch_train``: with mini-batch statistics (:func:`batch_statistics`) of
  shuffled batches of the training batch size, on the test images / on the training images
  (Wu & Johnson 2021, §4: the train–test inconsistency of the normalization batch);
- ``precise_<N>``: with the running statistics recomputed by PreciseBN
  (:func:`recompute_norm_statistics`) over N training images in batches of the training batch
  size (§3);
- ``ema_copy`` / ``ema_recompute``: the EMA weights with the raw model's running statistics
  (``ema.norm_buffers=copy``) or with PreciseBN over ``ema.recompute_images`` training images
  (``recompute``), which is what those modes hold at the end of training; ``average`` is the
  run's own test/acc_ema.

Norms without running statistics (gn, frn) evaluate alike every way: only ``population`` is
written for them. The study runs this once per run (``run_evaluations``), each with one thread.
"""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import torch
from omegaconf import OmegaConf
from torch import nn
from torch.utils.data import DataLoader, Dataset

from experiments.lib.jobs import STUDY_METRICS
from normlab.callbacks import recompute_norm_statistics
from normlab.callbacks.statistics import running_statistics_layers
from normlab.norm import batch_statistics
from normlab.runs import instantiate_data, load_run_info, load_trained_module
from normlab.tasks.base import Task

# Training images PreciseBN averages over (Wu & Johnson find 10³–10⁴ enough).
PRECISE_IMAGES = (100, 1_000, 10_000)
# Seeds of the shuffled batches each evaluation draws (fixed: every run sees the same batches).
SHUFFLE_SEED = 0
POPULATION_BATCH = 500


def loader(dataset: Dataset, batch: int, collate_fn: object, shuffle: bool) -> DataLoader:
    generator = torch.Generator().manual_seed(SHUFFLE_SEED)
    return DataLoader(
        dataset, batch_size=batch, shuffle=shuffle, generator=generator, collate_fn=collate_fn
    )


@torch.no_grad()
def error_percent(module: Task, batches: DataLoader) -> float:
    wrong = total = 0
    for images, labels in batches:
        wrong += int((module(images).argmax(1) != labels).sum())
        total += len(labels)
    return 100.0 * wrong / total


def with_precise_statistics(module: Task, batches: DataLoader, images: int) -> Task:
    """A copy of ``module`` whose running statistics PreciseBN recomputed over ``images``
    training images (whole batches)."""
    recomputed = copy.deepcopy(module)
    num_batches = max(1, images // batches.batch_size)
    recompute_norm_statistics(
        recomputed, batches, recomputed.forward_for_norm_statistics, num_batches
    )
    return recomputed.eval()


def with_statistics_of(module: Task, source: nn.Module) -> Task:
    """A copy of ``module`` holding ``source``'s norm running statistics."""
    copied = copy.deepcopy(module)
    stats = running_statistics_layers(source)
    for name, layer in running_statistics_layers(copied).items():
        for key, buffer in stats[name].named_buffers(recurse=False):
            getattr(layer, key).copy_(buffer)
    return copied.eval()


def measure(run_dir: Path) -> dict[str, float]:
    checkpoint = str(run_dir / "checkpoints" / "last.ckpt")
    info = load_run_info(checkpoint)
    trained = OmegaConf.create(info["config"])
    datamodule = instantiate_data(trained.data)
    datamodule.prepare_data()
    datamodule.setup("fit")
    datamodule.setup("test")
    batch = int(trained.data.batch_size)
    collate = datamodule.collate_fn
    test = loader(datamodule.test_set, POPULATION_BATCH, collate, shuffle=False)
    test_batches = loader(datamodule.test_set, batch, collate, shuffle=True)
    train_batches = loader(datamodule.train_set, batch, collate, shuffle=True)

    torch.manual_seed(SHUFFLE_SEED)
    raw = load_trained_module(checkpoint, trained, "raw").eval()
    measured = {"population": error_percent(raw, test)}
    if not running_statistics_layers(raw):
        return measured
    with batch_statistics(raw):
        measured["batch_test"] = error_percent(raw, test_batches)
        measured["batch_train"] = error_percent(raw, train_batches)
    for images in PRECISE_IMAGES:
        precise = with_precise_statistics(raw, train_batches, images)
        measured[f"precise_{images}"] = error_percent(precise, test)
    if info["ema_weights"]:
        averaged = load_trained_module(checkpoint, trained, "ema").eval()
        measured["ema_copy"] = error_percent(with_statistics_of(averaged, raw), test)
        images = int(trained.ema.recompute_images)
        recomputed = with_precise_statistics(averaged, train_batches, images)
        measured["ema_recompute"] = error_percent(recomputed, test)
    return measured


def main() -> None:
    if len(sys.argv) != 2:
        raise SystemExit("usage: python -m experiments.population_statistics.evaluate RUN_DIR")
    run_dir = Path(sys.argv[1])
    measured = measure(run_dir)
    print(json.dumps(measured, indent=1))
    (run_dir / STUDY_METRICS).write_text(json.dumps(measured, indent=1))


if __name__ == "__main__":
    main()
