"""Log the norm of the gradients each optimizer step applies: the curve that shows a norm layer
choice destabilising training (spikes) or starving it (collapse) before the loss does."""

from __future__ import annotations

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import grad_norm
from torch import nn
from torch.optim import Optimizer

from normlab.tasks.base import Task


class GradientNorm(pl.Callback):
    """Before every optimizer step, log the global 2-norm of the gradients of that optimizer's
    parameters, before any clipping: ``train/grad_norm``, or ``train/grad_norm/<name>`` with
    several optimizers (named by the module's ``optimizer_names`` if it has them, e.g. pix2pix's
    generator and discriminator, else by position).

    ``per_parameter=True`` adds each parameter's gradient norm (``train/grad_norm/<parameter>``,
    under the optimizer's name with several), from Lightning's ``grad_norm`` utility, on the
    network the optimizer steps.

    The global norm is not ``grad_norm``'s total: that one copies every parameter's norm to the
    host one by one (a device sync per parameter on a GPU, every step) and computes them in the
    gradients' dtype (bf16 runs lose the digits a spike shows in); here the norms stay on the
    device, in float32, and only the parameters of the stepping optimizer count (pix2pix's
    discriminator keeps its gradients while the generator steps).
    """

    def __init__(self, per_parameter: bool = False) -> None:
        self.per_parameter = per_parameter

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
        key, network = self._key_and_network(trainer, pl_module, optimizer)
        pl_module.log(key, total, on_step=True, on_epoch=False)
        if self.per_parameter:
            norms = grad_norm(network, 2, group_separator="|")
            norms.pop("grad_2.0_norm_total", None)
            per_parameter = {f"{key}/{name.split('|', 1)[1]}": v for name, v in norms.items()}
            pl_module.log_dict(per_parameter, on_step=True, on_epoch=False)

    @staticmethod
    def _key_and_network(
        trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Optimizer
    ) -> tuple[str, nn.Module]:
        optimizers = trainer.optimizers
        if len(optimizers) <= 1:
            return "train/grad_norm", pl_module
        index = next(i for i, candidate in enumerate(optimizers) if candidate is optimizer)
        names = pl_module.optimizer_names if isinstance(pl_module, Task) else ()
        if not names:
            return f"train/grad_norm/{index}", pl_module
        return f"train/grad_norm/{names[index]}", getattr(pl_module, names[index], pl_module)
