"""Checks a task runs from ``check_run``, once its network and the data module are built: they
refuse a run that would otherwise fail inside the first training step, with one
:class:`~normlab.errors.ConfigError` naming the config keys to change."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from itertools import chain
from typing import Any

import torch
from torch import nn
from torch.func import functional_call

from normlab.errors import ConfigError
from normlab.norm import is_norm, norm_channels, training_input_problem

log = logging.getLogger(__name__)


def check_num_classes(num_classes: int, datamodule: object, *, what: str = "classes") -> None:
    """Labels run over the data's ``num_classes``: a model with fewer outputs would index past
    them in the loss (a device-side assert or an index error deep inside training)."""
    data_classes = getattr(datamodule, "num_classes", None)
    if data_classes is None or num_classes >= data_classes:
        return
    names = getattr(datamodule, "class_names", None) or []
    shown = ", ".join(map(str, names[:5])) + (", ..." if len(names) > 5 else "")
    raise ConfigError(
        f"model.num_classes={num_classes} is smaller than the {data_classes} {what} of the data"
        + (f" ({shown})" if shown else "")
        + f"; set model.num_classes >= {data_classes}, or leave it unset to take it from the data"
    )


class _NormInputProblem(Exception):
    """Raised from a forward pre-hook to stop the probe at the first norm that cannot work."""


def _norm_input_problem(network: nn.Module, input_shape: Sequence[int]) -> str | None:
    """Run ``network`` on the meta device with a hook on every 2-D norm layer: the first layer
    that cannot train on what it gets from an input of ``input_shape``, as one sentence, or
    None."""

    def pre_hook(module: nn.Module, args: tuple[Any, ...]) -> None:
        if args and isinstance(args[0], torch.Tensor):
            shape = tuple(args[0].shape)
            if (reason := training_input_problem(module, shape)) is not None:
                raise _NormInputProblem(names[module], type(module).__name__, shape, reason)

    names = {
        module: name
        for name, module in network.named_modules()
        if is_norm(module) and norm_channels(module) is not None
    }
    hooks = [module.register_forward_pre_hook(pre_hook) for module in names]
    meta_state = {
        name: torch.empty_like(tensor, device="meta")
        for name, tensor in chain(network.named_parameters(), network.named_buffers())
    }
    modes = {module: module.training for module in network.modules()}
    network.eval()  # no running-statistics updates and no dropout draws; the hooks check shapes
    try:
        with torch.no_grad():
            functional_call(network, meta_state, (torch.empty(*input_shape, device="meta"),))
    except _NormInputProblem as problem:
        layer, kind, shape, reason = problem.args
        return (
            f"norm layer {layer} ({kind}) gets input of shape {tuple(shape)}, which it cannot "
            f"normalise in training: {reason}"
        )
    except Exception as error:  # best effort: a model may need real values to run
        log.debug("norm input check skipped (%s: %s)", type(error).__name__, error)
    finally:
        for hook in hooks:
            hook.remove()
        for module, training in modes.items():
            module.training = training
    return None


def check_norm_inputs(
    network: nn.Module, input_shape: Sequence[int], *, where: str, datamodule: object = None
) -> None:
    """Raise ConfigError if a norm layer of ``network`` cannot train on the tensor it gets from
    an input batch of ``input_shape`` (``where`` names the config keys that set that shape).

    The network runs once on the meta device (shapes only: no memory, no arithmetic, well under a
    second for RetinaNet-R50 at 800 px), with a hook on every 2-D norm layer. This catches what
    otherwise stops the first training step with a traceback after the data is loaded: instance
    norm on 1×1 maps (small images, a pooled head), BatchNorm on one image of 1×1, a 2-D norm
    given features without H and W. A forward the probe cannot run (a model that needs real
    values) is skipped: this check must never refuse a run that would work.

    ``datamodule``: if a batch of one image cannot be trained on (BatchNorm after global
    pooling), the data module is told (``drop_a_last_batch_of_one``), so that an epoch whose
    last batch would hold a single image leaves it out instead of failing at its end.
    """
    problem = _norm_input_problem(network, input_shape)
    if problem is not None:
        raise ConfigError(
            f"{where}: {problem}. Use larger images or another norm for that layer (norm=..., "
            "or model.head_norm=... for a head)"
        )
    drop = getattr(datamodule, "drop_a_last_batch_of_one", None)
    if drop is not None and input_shape[0] > 1:
        problem = _norm_input_problem(network, (1, *input_shape[1:]))
        if problem is not None:
            drop(problem.replace(", which it cannot", " for one image, which it cannot"))
