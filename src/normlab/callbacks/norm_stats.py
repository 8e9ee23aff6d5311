"""Monitor the running statistics of every norm layer and how far a batch's statistics are from
them: the gap that switching from batch statistics (training) to running ones (eval) introduces.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from normlab.callbacks.statistics import input_moments, running_statistics_layers
from normlab.ranges import check_int
from normlab.utils.figures import log_histograms


def statistic_gaps(
    batch_mean: Tensor, batch_var: Tensor, running_mean: Tensor, running_var: Tensor, eps: float
) -> tuple[Tensor, Tensor]:
    """Per channel: the batch mean's distance from the running mean in running standard
    deviations, ``(μ_B - μ) / √(σ² + ε)``, and the log ratio of the variances,
    ``ln((σ²_B + ε) / (σ² + ε))``. Both are 0 when the batch matches the running statistics;
    the first is the shift eval mode adds to the layer's normalised output, the second the log of
    the squared scale it multiplies it by."""
    running_mean, running_var = running_mean.double(), running_var.double()
    mean_gap = (batch_mean - running_mean) / torch.sqrt(running_var + eps)
    var_gap = torch.log((batch_var + eps) / (running_var + eps))
    return mean_gap, var_gap


def _rms(values: Tensor) -> float:
    return float(values.pow(2).mean().sqrt())


class NormStatistics(pl.Callback):
    """Log, once per ``every_n_epochs`` epochs, the running statistics of every norm layer that
    has them (BatchNorm-like, FrozenBatchNorm2d, InstanceNorm with running statistics) and their
    gap to the statistics of the epoch's first training batch (see :func:`statistic_gaps`;
    batch statistics are the layer's own: mean and unbiased variance, as its running estimate).

    Forward hooks capture the first training batch of the epoch as the training step runs it,
    comparing each call of a layer with its running statistics just before that call updates
    them. What is logged, at that step:

    - to every logger, one curve per layer *type*: ``norm_stats/<Type>/mean_gap`` and
      ``norm_stats/<Type>/var_gap``, the RMS over channels of the gaps, averaged over the calls
      of each layer and then over the layers of that type;
    - with ``histograms``, to wandb (``wandb.Histogram``) and TensorBoard, per layer:
      ``norm_stats/<layer>/running_mean``, ``running_var``, ``mean_gap`` and ``var_gap`` over
      channels.

    In multi-process runs the batch is rank 0's. Layers without running statistics (GroupNorm,
    LayerNorm, InstanceNorm without them) normalise with batch statistics in eval mode too and
    have no gap to show.
    """

    def __init__(self, every_n_epochs: int = 1, histograms: bool = True) -> None:
        self.every_n_epochs = check_int(
            "callbacks.norm_stats.every_n_epochs", every_n_epochs, minimum=1
        )
        self.histograms = histograms
        self._handles: list[RemovableHandle] = []
        self._calls: dict[str, list[tuple[Tensor, Tensor, Tensor, Tensor, float]]] = {}
        self._layers: dict[str, nn.Module] = {}

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if (
            batch_idx != 0
            or not trainer.is_global_zero
            or not trainer.loggers
            or trainer.current_epoch % self.every_n_epochs
        ):
            return
        self._layers = running_statistics_layers(pl_module, frozen=True)
        self._calls = defaultdict(list)
        for name, layer in self._layers.items():
            self._handles.append(layer.register_forward_pre_hook(self._recorder(name)))

    def _recorder(self, name: str):
        def record(module: nn.Module, args: tuple) -> None:
            moments = input_moments(module, args[0])
            self._calls[name].append(
                (
                    moments.mean,
                    moments.var,
                    module.running_mean.detach().clone(),
                    module.running_var.detach().clone(),
                    float(module.eps),
                )
            )

        return record

    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        if not self._handles:
            return
        self._remove_hooks()
        step = trainer.global_step
        by_type: dict[str, list[tuple[float, float]]] = defaultdict(list)
        histograms: dict[str, Tensor] = {}
        for name, calls in self._calls.items():
            gaps = [statistic_gaps(*call) for call in calls]
            mean_gaps = torch.cat([mean_gap for mean_gap, _ in gaps])
            var_gaps = torch.cat([var_gap for _, var_gap in gaps])
            layer_type = type(self._layers[name]).__name__
            by_type[layer_type].append(
                (
                    sum(_rms(m) for m, _ in gaps) / len(gaps),
                    sum(_rms(v) for _, v in gaps) / len(gaps),
                )
            )
            if self.histograms:
                first = calls[0]
                histograms |= {
                    f"norm_stats/{name}/running_mean": first[2],
                    f"norm_stats/{name}/running_var": first[3],
                    f"norm_stats/{name}/mean_gap": mean_gaps,
                    f"norm_stats/{name}/var_gap": var_gaps,
                }
        scalars = {}
        for layer_type, values in by_type.items():
            scalars[f"norm_stats/{layer_type}/mean_gap"] = sum(m for m, _ in values) / len(values)
            scalars[f"norm_stats/{layer_type}/var_gap"] = sum(v for _, v in values) / len(values)
        self._calls, self._layers = {}, {}
        if scalars:
            for logger in trainer.loggers:
                logger.log_metrics(scalars, step=step)
        if histograms:
            log_histograms(trainer.loggers, histograms, step)

    def _remove_hooks(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # A step that raised (or was skipped) between the two batch hooks leaves hooks behind.
        self._remove_hooks()
