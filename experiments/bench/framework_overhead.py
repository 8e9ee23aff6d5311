"""Framework overhead: a training step in our Lightning module vs a bare PyTorch loop.

    python -m experiments.bench.framework_overhead                 # part of `make bench`
    python -m experiments.bench.framework_overhead --device cuda --precision bf16-mixed

The `make train` experiment (densenet_digits: DenseNet-BC-100, digits at 28 px, batch 32,
channels_last, AdamW + one-cycle) built from the Hydra config; both candidates run the same
number of steps over the same DataLoader with the same optimizer and schedule. The Lightning
candidate is timed from the start to the end of its training epoch (its per-fit setup is paid
once in a real run); it includes everything our module does per step (metrics, logging calls).
Goal: ≤ 1.05×. Writes framework_overhead.md next to this file.
"""

from __future__ import annotations

import argparse
import contextlib
import time
from itertools import islice
from pathlib import Path

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from experiments.lib.benchmark import (
    compare,
    machine_load,
    markdown_table,
    timed_epoch,
    write_report,
)
from normlab.runs import instantiate_data
from normlab.tasks.optim import build_optimizer, build_scheduler
from normlab.utils.dependency_warnings import quiet_dependency_warnings
from normlab.utils.hydra_run import CONFIG_DIR, register_resolvers

HERE = Path(__file__).resolve().parent
# Arguments of the tiny run in `make test` (tests/experiments/test_benchmarks.py).
SMOKE = ["--steps", "2", "--repeats", "1", "--batch-size", "4", "--image-size", "8"]
GOAL = 1.05


def experiment_config(*overrides: str) -> DictConfig:
    register_resolvers()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose(
            "config",
            overrides=[
                "experiment=densenet_digits",
                "model.num_classes=10",
                "model.in_channels=1",
                *overrides,
            ],
        )


def build_module(cfg: DictConfig) -> pl.LightningModule:
    torch.manual_seed(0)
    return instantiate(OmegaConf.to_container(cfg.task, resolve=True), _recursive_=False)


def lightning_candidate(cfg, loader, steps: int, device: str, precision: str):
    module = build_module(cfg)

    def run() -> float:
        return timed_epoch(module, loader, steps, device, precision) / steps

    return run


def bare_candidate(cfg, loader, steps: int, device: str, precision: str):
    model = build_module(cfg).model.to(device)
    memory_format = torch.channels_last if cfg.task.channels_last else torch.contiguous_format
    task = OmegaConf.to_container(cfg.task, resolve=True)
    autocast = (
        torch.autocast(device, dtype=torch.bfloat16)
        if precision == "bf16-mixed"
        else contextlib.nullcontext()
    )

    def run() -> float:
        # A fresh optimizer and schedule per round, as each Lightning fit() creates them.
        optimizer = build_optimizer(task["optimizer"], model, task["decay_norm_and_bias"])
        scheduler = build_scheduler(task.get("scheduler"), optimizer, steps)
        model.train()
        start = time.perf_counter()
        for images, labels in islice(loader, steps):
            images = images.to(device).contiguous(memory_format=memory_format)
            with autocast:
                loss = F.cross_entropy(model(images), labels.to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if scheduler is not None:
                scheduler.step()
        if device == "cuda":
            torch.cuda.synchronize()
        return (time.perf_counter() - start) / steps

    return run


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10, help="training steps per measurement")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--image-size", type=int, default=28)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--precision", default="32-true", choices=["32-true", "bf16-mixed"])
    parser.add_argument("--out", type=Path, default=HERE / "framework_overhead.md")
    args = parser.parse_args(argv)
    load_before = machine_load()
    quiet_dependency_warnings()

    cfg = experiment_config(
        f"data.batch_size={args.batch_size}", f"data.image_size={args.image_size}"
    )
    datamodule = instantiate_data(cfg.data)
    datamodule.setup("fit")
    loader = datamodule.train_dataloader()
    if len(loader) < args.steps:
        parser.error(f"--steps {args.steps} exceeds the {len(loader)} batches of an epoch")
    options = (cfg, loader, args.steps, args.device, args.precision)
    timings = compare(
        {"bare loop": bare_candidate(*options), "Lightning": lightning_candidate(*options)},
        repeats=args.repeats,
        warmup=1,
    )
    ratio = timings[1].ratio_to(timings[0])
    return write_report(
        args.out,
        "Framework overhead: our Lightning module vs a bare PyTorch loop",
        f"python -m experiments.bench.framework_overhead --steps {args.steps} --repeats "
        f"{args.repeats} --batch-size {args.batch_size} --image-size {args.image_size} "
        f"--device {args.device} --precision {args.precision}",
        f"densenet_digits' model, data and optimizer; seconds per training step, each "
        f"measurement averaging {args.steps} steps, {args.repeats} alternating rounds after one "
        "warm-up round.",
        markdown_table(timings),
        f"Lightning / bare = {ratio:.3f}: {'meets' if ratio <= GOAL else 'misses'} the goal "
        f"≤ {GOAL}. This is the median over rounds of the two times measured back to back in "
        "one round, the statistic every table here judges by; the ratio of the two medians "
        f"above ({timings[1].median / timings[0].median:.3f}) pairs times from different rounds, "
        "so the machine's drift between rounds enters it.",
        load_before=load_before,
    )


if __name__ == "__main__":
    print(main())
