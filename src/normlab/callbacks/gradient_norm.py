"""Log the norm of the gradients each optimizer step applies: the curve that shows a norm layer
choice destabilising training (spikes) or starving it (collapse) before the loss does."""

from __future__ import annotations

import lightning.pytorch as pl
import torch
from torch.optim import Optimizer

from normlab.tasks.base import Task


class GradientNorm(pl.Callback):
    """Before every optimizer step, log the global 2-norm of the gradients of that optimizer's
    parameters, before any clipping: ``train/grad_norm``, or ``train/grad_norm/<name>`` with
    several optimizers (named by the module's ``optimizer_names`` if it has them, e.g. pix2pix's
    generator and discriminator, else by position)."""

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Optimizer
    ) -> None:
        gradients = [
            p.grad.detach()
            for group in optimizer.param_groups
            for p in group["params"]
            if p.grad is not None
        ]
        if not gradients:
            return
        total = torch.linalg.vector_norm(
            torch.stack([torch.linalg.vector_norm(g.float()) for g in gradients])
        )
        pl_module.log(self._key(trainer, pl_module, optimizer), total, on_step=True, on_epoch=False)

    @staticmethod
    def _key(trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Optimizer) -> str:
        optimizers = trainer.optimizers
        if len(optimizers) <= 1:
            return "train/grad_norm"
        index = next(i for i, candidate in enumerate(optimizers) if candidate is optimizer)
        names = pl_module.optimizer_names if isinstance(pl_module, Task) else ()
        return f"train/grad_norm/{names[index] if names else index}"
