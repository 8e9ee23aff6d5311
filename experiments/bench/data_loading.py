"""Data loading: images/s of each DataModule's train loader vs the training step's appetite.

    python -m experiments.bench.data_loading                      # part of `make bench`

For each data module — digits, CIFAR-10 (python pickles), ImageFolder (PNG files), digit_scenes
(COCO json + PNGs) and digit_pairs (aligned AB PNGs); the CIFAR and ImageFolder files are written
in their real formats from scikit-learn's digits — the train loader's images/s with
``num_workers`` 0 and 2 (after its first batch), and the images/s the experiment that uses it
consumes in training steps (batches held in memory, Lightning loop). The loader is the bottleneck
where its rate is below the step's. Writes data_loading.md next to this file.
"""

from __future__ import annotations

import argparse
import pickle
import tempfile
import time
from itertools import islice
from pathlib import Path

import numpy as np
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from PIL import Image
from sklearn.datasets import load_digits
from torch.utils.data import DataLoader

from experiments.lib.benchmark import machine_load, timed_epoch, write_report
from normlab.runs import fill_from_datamodule, instantiate_data
from normlab.utils.dependency_warnings import quiet_dependency_warnings
from normlab.utils.hydra_run import CONFIG_DIR, register_resolvers

HERE = Path(__file__).resolve().parent
# Arguments of the tiny run in `make test` (tests/experiments/test_benchmarks.py).
SMOKE = ["--batches", "1", "--steps", "1", "--only", "digit_pairs"]


def digit_images(size: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """The 1,797 digits as uint8 RGB size×size images (nearest upscaling) and their labels."""
    digits = load_digits()
    gray = (digits.images / 16 * 255).astype(np.uint8)
    scale = size // 8
    big = gray.repeat(scale, axis=1).repeat(scale, axis=2)
    return np.stack([big] * 3, axis=-1), digits.target.astype(np.int64)


def write_cifar10(root: Path) -> None:
    """CIFAR-10's python format: pickled dicts with ``data`` N×3072 uint8 in CHW order."""
    images, labels = digit_images()
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rows = images.transpose(0, 3, 1, 2).reshape(len(images), -1)
    batches = np.array_split(np.arange(len(images) - 300), 5)
    for index, part in enumerate(batches, start=1):
        batch = {"data": rows[part], "labels": labels[part].tolist()}
        (folder / f"data_batch_{index}").write_bytes(pickle.dumps(batch, protocol=2))
    test = np.arange(len(images) - 300, len(images))
    test_batch = {"data": rows[test], "labels": labels[test].tolist()}
    (folder / "test_batch").write_bytes(pickle.dumps(test_batch, protocol=2))
    meta = {"label_names": [str(d) for d in range(10)]}
    (folder / "batches.meta").write_bytes(pickle.dumps(meta, protocol=2))


def write_image_folder(root: Path) -> None:
    images, labels = digit_images()
    for index, (image, label) in enumerate(zip(images, labels, strict=True)):
        split = "val" if index % 5 == 0 else "train"
        folder = root / split / str(label)
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(folder / f"{index:04d}.png")


def cases(root: Path) -> dict[str, list[str]]:
    """Data module → Hydra overrides of the experiment that trains on it."""
    write_cifar10(root / "cifar")
    write_image_folder(root / "imagefolder")
    classify = ["experiment=densenet_digits", "data.image_size=32"]
    return {
        "digits": classify,
        "cifar10": [*classify, "data=cifar10", f"data.root={root / 'cifar'}",
                    "data.check_integrity=false", "data.batch_size=32"],
        "imagefolder": [*classify, "data=imagefolder", f"data.root={root / 'imagefolder'}",
                        "data.batch_size=32"],
        "digit_scenes": ["experiment=retinanet_digits", f"data.root={root / 'generated'}"],
        "digit_pairs": ["experiment=pix2pix_digits", f"data.root={root / 'generated'}"],
    }  # fmt: skip


def experiment(overrides: list[str]) -> DictConfig:
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose("config", overrides=overrides)


def images_in(batch) -> int:
    """Samples in a batch: (images, targets) tuples, or dicts of tensors (pix2pix)."""
    first = next(iter(batch.values())) if isinstance(batch, dict) else batch[0]
    return len(first)


def loader_rate(cfg: DictConfig, workers: int, batches: int) -> float:
    """Images/s of the train loader over ``batches`` batches after the first."""
    data_cfg = cfg.data.copy()
    data_cfg.num_workers = workers
    data_cfg.pin_memory = False
    datamodule = instantiate_data(data_cfg)
    datamodule.prepare_data()
    datamodule.setup("fit")
    iterator = iter(datamodule.train_dataloader())
    next(iterator)
    start, images = time.perf_counter(), 0
    for batch in islice(iterator, batches):
        images += images_in(batch)
    return images / (time.perf_counter() - start)


def step_rate(cfg: DictConfig, steps: int) -> float:
    """Images/s the experiment's training step consumes, from batches held in memory."""
    datamodule = instantiate_data(cfg.data)
    datamodule.prepare_data()
    datamodule.setup("fit")
    fill_from_datamodule(cfg, datamodule)
    batches = list(islice(iter(datamodule.train_dataloader()), steps + 1))
    torch.manual_seed(0)
    module = instantiate(OmegaConf.to_container(cfg.task, resolve=True), _recursive_=False)
    loader = DataLoader(batches, batch_size=None)  # already batched
    seconds = timed_epoch(module, loader, steps + 1)
    return sum(images_in(b) for b in batches) / seconds


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=20, help="loader batches per measurement")
    parser.add_argument("--steps", type=int, default=4, help="training steps per measurement")
    parser.add_argument("--only", nargs="*", help="data modules to run (default: all)")
    parser.add_argument("--out", type=Path, default=HERE / "data_loading.md")
    args = parser.parse_args(argv)
    load_before = machine_load()
    register_resolvers()
    quiet_dependency_warnings()

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, overrides in cases(Path(tmp)).items():
            if args.only and name not in args.only:
                continue
            cfg = experiment(overrides)
            loaders = [loader_rate(cfg, workers, args.batches) for workers in (0, 2)]
            consumed = step_rate(cfg, args.steps)
            bottleneck = "yes" if max(loaders) < consumed else "no"
            rows.append(
                f"| {name} | {overrides[0].split('=')[1]} | {cfg.data.batch_size} "
                f"| {loaders[0]:.0f} | {loaders[1]:.0f} | {consumed:.0f} | {bottleneck} |"
            )
    return write_report(
        args.out,
        "Data loading vs training-step consumption",
        f"python -m experiments.bench.data_loading --batches {args.batches} --steps {args.steps}",
        f"Train loaders with their experiment's transforms and batch size; images/s over "
        f"{args.batches} batches after the first (worker start-up excluded). Step rate: "
        f"{args.steps} training steps (after one) on batches held in memory.",
        "| data module | experiment | batch | loader, 0 workers (img/s) "
        "| loader, 2 workers (img/s) | training step (img/s) | loader the bottleneck? |\n"
        "|---|---|---:|---:|---:|---:|---|\n" + "\n".join(rows),
        load_before=load_before,
    )


if __name__ == "__main__":
    print(main())
