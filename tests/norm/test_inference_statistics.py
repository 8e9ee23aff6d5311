"""``batch_statistics(model)``: the norms with stored statistics normalise each batch as in
training, output for output what a copy of the model in training mode computes, while every
buffer stays bit-identical and every other module (dropout) stays in eval mode."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from normlab.errors import ConfigError
from normlab.norm import batch_statistics, build_norm

# Norms whose eval mode reads statistics stored in training.
SWITCHED = [
    "bn",
    "syncbn",
    {"name": "ghost_bn", "virtual_batch_size": 2},
    {"name": "brn", "warmup_steps": 0, "ramp_steps": 0, "r_max": 1.5, "d_max": 0.5},
    "evonorm_b0",
    {"name": "in", "track_running_stats": True},
    {"name": "cuda_bn", "backend": "reference"},
]
# Norms that compute the same in both modes.
UNSWITCHED = ["gn", "ln", "frn", "evonorm_s0", "rms", "frozen_bn", "none"]


def _network(norm) -> nn.Module:
    """conv → norm → ReLU → dropout → conv → norm → pool → linear, with statistics and affine
    parameters that are not their initial values, in eval mode."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        build_norm(norm, 8),
        nn.ReLU(),
        nn.Dropout(0.5),
        nn.Conv2d(8, 8, 3, padding=1),
        build_norm(norm, 8),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 4),
    )
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if name.endswith("running_mean"):
                tensor.copy_(torch.randn(tensor.shape, generator=generator))
            elif name.endswith("running_var"):
                tensor.copy_(torch.rand(tensor.shape, generator=generator) + 0.5)
            elif name.endswith("num_batches_tracked"):
                tensor.fill_(1000)
    return model.eval()


def _batches() -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(2)
    return [torch.randn(6, 3, 5, 5, generator=generator) * 2 + 1 for _ in range(3)]


def _train_mode_reference(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
    """What the model computes on ``batch`` in training mode, written out: a fresh copy (its
    buffers as they were) in train(), its dropout put back in eval mode by hand."""
    reference = copy.deepcopy(model).train()
    for module in reference.modules():
        if isinstance(module, nn.Dropout):
            module.eval()
    with torch.no_grad():
        return reference(batch)


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: tensor.clone() for name, tensor in model.state_dict().items()}


@pytest.mark.parametrize("norm", SWITCHED, ids=str)
def test_batch_statistics_equal_a_train_mode_evaluation_and_touch_no_buffer(norm):
    model = _network(norm)
    before = _state(model)
    with torch.no_grad():
        population = [model(batch) for batch in _batches()]
    with batch_statistics(model) as layers, torch.no_grad():
        assert list(layers) == ["1", "5"]
        # Twice over: dropout stays off and nothing a batch leaves behind changes the next.
        outputs = [model(batch) for batch in _batches() + _batches()]
        assert all(layer.training for layer in layers.values())
        assert not model.training and not model[3].training
    expected = [_train_mode_reference(model, batch) for batch in _batches()]
    for got, want in zip(outputs, expected + expected, strict=True):
        assert torch.equal(got, want)
    # It is a different evaluation from the population one.
    assert not any(torch.allclose(got, pop) for got, pop in zip(outputs, population, strict=False))
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[name], after[name]) for name in before), [
        name for name in before if not torch.equal(before[name], after[name])
    ]
    assert not any(module.training for module in model.modules())


@pytest.mark.parametrize("norm", UNSWITCHED, ids=str)
def test_norms_without_stored_statistics_are_left_in_eval_mode(norm):
    model = _network(norm)
    batch = _batches()[0]
    with torch.no_grad():
        expected = model(batch)
    with batch_statistics(model) as layers, torch.no_grad():
        assert layers == {}
        assert not any(module.training for module in model.modules())
        assert torch.equal(model(batch), expected)


def test_autograd_and_inference_mode_leave_the_buffers_alone():
    model = _network("bn")
    before = _state(model)
    batch = _batches()[0]
    with batch_statistics(model):
        model(batch).sum().backward()
        with torch.inference_mode():
            model(batch)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_a_batch_of_one_value_per_channel_is_named_and_leaves_the_buffers_alone():
    model = nn.Sequential(nn.Conv2d(3, 4, 5), build_norm("bn", 4)).eval()
    before = _state(model)
    named = pytest.raises(ConfigError, match=r"norm layer 1 gets a batch of shape \[1, 4, 1, 1\]")
    with named, batch_statistics(model), torch.no_grad():
        model(torch.randn(1, 3, 5, 5))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not model[1].training
