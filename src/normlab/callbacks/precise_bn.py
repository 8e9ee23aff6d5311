"""Precise BN: replace the momentum estimate of the running statistics by true averages.

During training, BatchNorm's running mean and variance are exponential moving averages over
batches computed with weights that kept changing; with a large momentum they mostly describe the
last few batches. Precise BN (Wu & Johnson, "Rethinking 'Batch' in BatchNorm", 2021; fvcore's
``update_bn_stats``) freezes the weights and recomputes them as plain averages over N batches.

Definition (what :func:`recompute_norm_statistics` writes, per layer and channel): with
``μ_t`` and ``s²_t`` the mean and the *unbiased* variance of the layer's input in call ``t``
(BatchNorm-like layers: over the N·H·W values of the channel; InstanceNorm with running
statistics: the mean over instances of each instance's mean and unbiased variance, as torch's
running update),

    running_mean = (1/T) Σ_t μ_t,     running_var = (1/T) Σ_t s²_t,

over the T calls of the layer in the N batches (one call per batch, except in layers a network
calls more than once per batch, e.g. a discriminator on real and on fake pairs). This is what
``momentum=None`` (a cumulative average) would give, and Ioffe & Szegedy's inference statistics
E[μ_B] and m/(m-1)·E[σ²_B]; each call weighs the same, whatever its batch size.

Across processes (DDP), call ``t``'s statistics are those of the union of all processes' inputs
to the layer in that call: local (count, mean, M2) are gathered and merged exactly (Chan et al.),
so a layer that normalises per process (``bn``) gets the statistics of everything it saw in that
step, and a synchronised one (``syncbn``, ``cuda_bn`` with ``sync``) the same numbers it
normalised with. With a synchronised norm, a k-process run therefore gives what one process
gives on the k-times batch; uneven and empty per-process batches weigh by their size.

Modes: the norms run in training mode (each layer sees its input as normalised in training, with
batch statistics), every other module in eval mode (no dropout or drop path), so the statistics
describe the activations the network produces at inference. detectron2 runs the whole model in
training mode instead; with dropout before a norm, that estimates the statistics of dropped-out
activations, which eval mode never sees (Li et al., 2019, "variance shift").
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
import torch.distributed as dist
from lightning.pytorch.trainer.states import TrainerFn
from torch import Tensor, nn
from torch.utils.data import DataLoader, IterableDataset

from normlab.callbacks.statistics import (
    Moments,
    input_moments,
    per_sample_statistics,
    running_statistics_layers,
)
from normlab.errors import ConfigError
from normlab.ops.sync_collectives import sync_group
from normlab.ranges import check_int
from normlab.tasks.base import Task

log = logging.getLogger(__name__)


@dataclass
class PreciseStatistics:
    """What :func:`recompute_norm_statistics` did: batches run, layers updated, layers not called
    (their statistics are left as they were)."""

    num_batches: int
    updated: list[str] = field(default_factory=list)
    not_called: list[str] = field(default_factory=list)


def _all_have_a_batch(have: bool, group: Any, device: torch.device) -> bool:
    if group is None:
        return have
    flag = torch.tensor([int(have)], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=group)
    return bool(flag.item())


def _pack(calls: list[Moments]) -> Tensor:
    """calls × 3 × C: count (broadcast), mean, unbiased variance."""
    return torch.stack(
        [torch.stack([torch.full_like(m.mean, m.count), m.mean, m.var]) for m in calls]
    )


def _merge(parts: Tensor, per_sample: bool) -> tuple[Tensor, Tensor]:
    """The mean and unbiased variance of the union of R processes' inputs (``parts``: R×3×C)."""
    count, mean, var = parts[:, 0], parts[:, 1], parts[:, 2]
    total = count.sum(0)
    union_mean = (count * mean).sum(0) / total
    if per_sample:  # InstanceNorm: an average over instances, weighted by instance count
        return union_mean, (count * var).sum(0) / total
    m2 = (var * (count - 1).clamp_min(0)).sum(0) + (count * (mean - union_mean) ** 2).sum(0)
    return union_mean, m2 / (total - 1)


def _gather_calls(
    calls: list[list[Moments]], group: Any, device: torch.device
) -> list[Tensor | None]:
    """Per layer: R×calls×3×C, every process's statistics of each call of the layer in this
    batch (R=1 without DDP); None for a layer not called."""
    packed = [_pack(c).to(device) if c else None for c in calls]
    if group is None:
        return [p[None] if p is not None else None for p in packed]
    world = dist.get_world_size(group)
    counts = torch.tensor([len(c) for c in calls], device=device)
    gathered = [torch.empty_like(counts) for _ in range(world)]
    dist.all_gather(gathered, counts, group=group)
    if any(not torch.equal(g, counts) for g in gathered):
        raise RuntimeError(
            "precise BN: the processes called their norm layers different numbers of times in "
            "one batch, so their statistics cannot be paired"
        )
    if all(p is None for p in packed):
        return packed
    flat = torch.cat([p.flatten() for p in packed if p is not None])
    everything = [torch.empty_like(flat) for _ in range(world)]
    dist.all_gather(everything, flat, group=group)
    stacked = torch.stack(everything)  # R × total
    result, offset = [], 0
    for p in packed:
        if p is None:
            result.append(None)
            continue
        size = p.numel()
        result.append(stacked[:, offset : offset + size].reshape(world, *p.shape))
        offset += size
    return result


@torch.no_grad()
def recompute_norm_statistics(
    model: nn.Module,
    batches: Iterable[Any],
    forward: Callable[[Any], object],
    num_batches: int,
) -> PreciseStatistics:
    """Set the running statistics of every norm layer of ``model`` to their average over
    ``num_batches`` batches (fewer if ``batches`` ends first); see the module docstring.

    ``forward(batch)`` runs the network(s) of ``model`` on one batch. Nothing else changes:
    parameters (no gradients are computed), ``momentum``, ``num_batches_tracked`` and every
    module's train/eval mode are as before. Under ``torch.distributed`` every process must call
    this with the same ``num_batches``; statistics are merged across processes.
    """
    named = running_statistics_layers(model)
    if not named:
        return PreciseStatistics(0)
    names, layers = list(named), list(named.values())
    saved_modes = {module: module.training for module in model.modules()}
    saved_buffers = [
        {k: b.clone() for k, b in layer.named_buffers(recurse=False) if b is not None}
        for layer in layers
    ]
    device = layers[0].running_mean.device
    group = sync_group()
    step_calls: list[list[Moments]] = [[] for _ in layers]
    sums: list[Tensor | None] = [None] * len(layers)
    num_calls = [0] * len(layers)

    def hook(index: int) -> Callable:
        def record(module: nn.Module, args: tuple) -> None:
            step_calls[index].append(input_moments(module, args[0]))

        return record

    handles = [layer.register_forward_pre_hook(hook(i)) for i, layer in enumerate(layers)]
    model.eval()
    for layer in layers:
        layer.train()
    used = 0
    try:
        iterator = iter(batches)
        while used < num_batches:
            batch = next(iterator, None)
            if not _all_have_a_batch(batch is not None, group, device):
                break
            forward(batch)
            used += 1
            for i, parts in enumerate(_gather_calls(step_calls, group, device)):
                if parts is None:
                    continue
                for call in range(parts.shape[1]):
                    mean, var = _merge(parts[:, call], per_sample_statistics(layers[i]))
                    stats = torch.stack([mean, var])
                    sums[i] = stats if sums[i] is None else sums[i] + stats
                    num_calls[i] += 1
                step_calls[i].clear()
    finally:
        for handle in handles:
            handle.remove()
        for module, training in saved_modes.items():
            module.train(training)
        for layer, buffers in zip(layers, saved_buffers, strict=True):
            for key, value in buffers.items():
                getattr(layer, key).copy_(value)

    result = PreciseStatistics(used)
    for name, layer, total, calls in zip(names, layers, sums, num_calls, strict=True):
        if not calls:
            result.not_called.append(name)
            continue
        layer.running_mean.copy_((total[0] / calls).to(layer.running_mean.dtype))
        layer.running_var.copy_((total[1] / calls).to(layer.running_var.dtype))
        result.updated.append(name)
    return result


@contextmanager
def preserved_rng_state() -> Iterator[None]:
    """Put the random generators back afterwards: drawing batches (shuffling, augmentation) for
    the statistics must not change the rest of the training run."""
    python, numpy_state = random.getstate(), np.random.get_state()
    cuda_devices = range(torch.cuda.device_count()) if torch.cuda.is_initialized() else []
    with torch.random.fork_rng(devices=cuda_devices):
        try:
            yield
        finally:
            random.setstate(python)
            np.random.set_state(numpy_state)


def independent_loader(loader: DataLoader) -> DataLoader:
    """``loader`` itself, or, if it keeps its worker processes between epochs, a copy that does
    not: a second ``iter()`` of a persistent loader resets the iterator training is using."""
    if not (loader.persistent_workers and loader.num_workers > 0):
        return loader
    batching: dict[str, Any] = (
        {"batch_size": loader.batch_size, "drop_last": loader.drop_last}
        if isinstance(loader.dataset, IterableDataset)
        else {"batch_sampler": loader.batch_sampler}
    )
    return DataLoader(
        loader.dataset,
        num_workers=loader.num_workers,
        collate_fn=loader.collate_fn,
        pin_memory=loader.pin_memory,
        timeout=loader.timeout,
        worker_init_fn=loader.worker_init_fn,
        multiprocessing_context=loader.multiprocessing_context,
        generator=loader.generator,
        prefetch_factor=loader.prefetch_factor,
        **batching,
    )


def recompute_on_training_batches(
    trainer: pl.Trainer,
    runner: pl.LightningModule,
    model: nn.Module,
    num_batches: int,
    key: str,
) -> PreciseStatistics:
    """:func:`recompute_norm_statistics` of the norms in ``model`` over ``num_batches`` batches
    of the trainer's training loader (at most its length, or ``trainer.limit_train_batches``),
    each prepared as Lightning's training loop prepares one and run through ``runner``'s
    :meth:`~normlab.tasks.Task.forward_for_norm_statistics` under the training precision (the
    trained task itself, or a copy of it holding other weights). The random generators are
    restored afterwards. ``key`` names the option asking for it in errors."""
    if not isinstance(runner, Task):
        raise ConfigError(
            f"{key}: {type(runner).__name__} is not a normlab.tasks.Task, "
            "so it has no forward_for_norm_statistics(batch) to run its networks on a batch"
        )
    loader = trainer.train_dataloader
    if not isinstance(loader, DataLoader):
        raise ConfigError(f"{key} needs one training DataLoader, got {type(loader).__name__}")
    limit = trainer.num_training_batches
    num_batches = num_batches if limit == float("inf") else min(num_batches, limit)
    pl_module = trainer.lightning_module

    def forward(batch: Any) -> None:
        # What Lightning's training loop does to a batch before training_step sees it.
        batch = trainer.precision_plugin.convert_input(batch)
        batch = pl_module._on_before_batch_transfer(batch, dataloader_idx=0)
        batch = trainer.strategy.batch_to_device(batch, dataloader_idx=0)
        with trainer.precision_plugin.train_step_context():
            runner.forward_for_norm_statistics(batch)

    with preserved_rng_state():
        return recompute_norm_statistics(
            model, independent_loader(loader), forward, int(num_batches)
        )


class PreciseBN(pl.Callback):
    """Recompute every norm's running statistics as exact averages (see the module docstring)
    over ``num_batches`` training batches before each validation during ``fit``, in epochs
    ``every_n_epochs``, ``2·every_n_epochs``, … (counted from 1), and at the end of such an
    epoch when it had no validation, so that the checkpoints saved then hold them too.

    The task runs its networks on a batch through :meth:`Task.forward_for_norm_statistics`
    (classification and detection run their model, pix2pix its generator and its discriminator
    on real and on generated pairs). The batches come from the training loader
    (with its augmentation; at most its length, or ``trainer.limit_train_batches``), under the
    training precision; the random generators are restored afterwards, so a run with the
    callback trains exactly as one without. The number of batches used is logged as
    ``precise_bn/num_batches``.
    """

    def __init__(self, num_batches: int = 200, every_n_epochs: int = 1) -> None:
        self.num_batches = check_int("callbacks.precise_bn.num_batches", num_batches, minimum=1)
        self.every_n_epochs = check_int(
            "callbacks.precise_bn.every_n_epochs", every_n_epochs, minimum=1
        )
        self._done_at: tuple[int, int] | None = None

    def _due(self, trainer: pl.Trainer) -> bool:
        return (
            trainer.state.fn == TrainerFn.FITTING
            and not trainer.sanity_checking
            and (trainer.current_epoch + 1) % self.every_n_epochs == 0
            and self._done_at != (trainer.current_epoch, trainer.global_step)
        )

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._due(trainer):
            self.recompute(trainer, pl_module)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._due(trainer):
            self.recompute(trainer, pl_module)

    def recompute(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> PreciseStatistics:
        """Recompute now, from the trainer's training loader."""
        result = recompute_on_training_batches(
            trainer, pl_module, pl_module, self.num_batches, "callbacks.precise_bn"
        )
        self._done_at = (trainer.current_epoch, trainer.global_step)
        if trainer.is_global_zero:
            log.info(
                "precise BN: %d norm layers from %d batches",
                len(result.updated),
                result.num_batches,
            )
            if result.not_called:
                log.warning("precise BN: not called, left as they were: %s", result.not_called)
        for logger in trainer.loggers:
            logger.log_metrics(
                {"precise_bn/num_batches": float(result.num_batches)}, step=trainer.global_step
            )
        return result
