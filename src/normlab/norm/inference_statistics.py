"""Evaluating a network with each batch's own norm statistics instead of its population ones.

Wu & Johnson (2021, "Rethinking 'Batch' in BatchNorm", §4) measure the train–test inconsistency
of small normalization batches by evaluating a trained network with mini-batch statistics and
with population statistics. :func:`batch_statistics` gives the first: inside it, every norm that
in eval mode may normalise with statistics stored in training
(:func:`~normlab.norm.traits.normalises_with_stored_statistics`, read from its traits) runs its
training-mode forward on each batch, so "batch statistics" means what the norm normalised with in
training:

- ``bn``, ``cuda_bn``: the batch's mean and variance; ``syncbn`` those of its process group's
  batches (in one process: ``bn``);
- ``ghost_bn``: those of each virtual batch of ``virtual_batch_size`` images;
- ``brn``: the batch's, corrected by its r and d towards the running statistics, at the limits
  training reached;
- ``evonorm_b0``: the batch variance; ``in`` with running statistics: each image's own.

Every other module stays as it was (dropout, drop path: eval mode), and so does every norm that
computes the same in both modes (``gn``, ``ln``, ``frn``, ``evonorm_s0``, ``rms``: per-sample
statistics; ``frozen_bn``: statistics nothing updates).

Nothing stored changes: a switched layer is called with copies of its buffers (running
statistics, ``num_batches_tracked``) and gets its own back after each call, so every batch is normalised from the state training
ended with (which ``brn`` reads) and the population statistics are intact afterwards, also
under a weight-averaging callback that swaps them in and out around validation.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from torch import Tensor, nn

from normlab.errors import ConfigError
from normlab.norm.traits import normalises_with_stored_statistics, training_input_problem

# How an evaluation normalises: with the statistics stored in training, or each batch's own.
NORM_STATISTICS = ("population", "batch")


def _put_back(module: nn.Module, buffers: dict[str, Tensor]) -> None:
    for name, value in buffers.items():
        setattr(module, name, value)


@contextmanager
def batch_statistics(model: nn.Module) -> Iterator[dict[str, nn.Module]]:
    """Evaluate ``model`` with batch statistics inside (see the module doc); yields the layers
    switched, by name (none: batch and population statistics evaluate alike). Their modes are
    restored on exit."""
    layers = {
        name: module
        for name, module in model.named_modules()
        if normalises_with_stored_statistics(module)
    }
    names = {module: name for name, module in layers.items()}
    saved: dict[nn.Module, dict[str, Tensor]] = {}

    def save(module: nn.Module, args: tuple[Any, ...]) -> None:
        shape = tuple(args[0].shape) if args and isinstance(args[0], Tensor) else ()
        problem = training_input_problem(module, shape) if len(shape) == 4 else None
        if problem is not None:
            raise ConfigError(
                f"evaluating with batch statistics: norm layer {names[module]} gets a batch of "
                f"shape {list(shape)}, and {problem}; evaluate with batches of more than one "
                "image (data.eval_batch_size, or data.batch_size where the data has none)"
            )
        # The call updates copies: the buffers themselves are never written to, so they stay
        # bit-identical and whatever autograd saved of them stays valid.
        saved[module] = dict(module.named_buffers(recurse=False))
        _put_back(module, {name: buffer.clone() for name, buffer in saved[module].items()})

    def restore(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        _put_back(module, saved.pop(module))

    modes = {module: module.training for module in layers.values()}
    handles = []
    try:
        for module in layers.values():
            handles += [
                module.register_forward_pre_hook(save),
                module.register_forward_hook(restore),
            ]
            module.train()
        yield layers
    finally:
        for handle in handles:
            handle.remove()
        # A call that raised left its layer with the copies.
        for module, buffers in saved.items():
            _put_back(module, buffers)
        for module, training in modes.items():
            module.train(training)
