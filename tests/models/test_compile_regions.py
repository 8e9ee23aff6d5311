"""Regional compilation (``compile_regional=true``): which blocks of each family are compiled,
that compiling them in place leaves the state dict's keys and the outputs as they were, and that
blocks of one kind share graphs instead of compiling one each."""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch
from torch import nn
from torch._dynamo.utils import counters

from normlab.models import (
    DenseRetinaNet,
    PatchDiscriminator,
    UnetGenerator,
    convnext_atto,
    densenet_bc,
    retinanet_resnet18_fpn,
)
from normlab.models.compile_regions import compile_repeated_blocks, repeated_blocks


def _densenet() -> nn.Module:
    return densenet_bc(depth=40, growth_rate=12, num_classes=10, in_channels=1, norm="bn")


def _convnext() -> nn.Module:
    return convnext_atto(num_classes=10, in_channels=1, norm="ln")


def _retinanet() -> nn.Module:
    detector = retinanet_resnet18_fpn(
        4, norm="bn", head_norm="gn", fpn_channels=16, min_size=64, max_size=64
    )
    return DenseRetinaNet(detector)


def _unet() -> nn.Module:
    return UnetGenerator(1, 1, num_downs=5, ngf=4, norm="in", use_dropout=False)


# family: (network, input, blocks regional compilation must find)
FAMILIES: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...], int]] = {
    # 3 blocks of 6 dense layers, 2 transitions.
    "densenet_bc_40": (_densenet, (2, 1, 16, 16), 18 + 2),
    # Depths 2, 2, 6, 2.
    "convnext_atto": (_convnext, (2, 1, 32, 32), 12),
    # 8 ResNet-18 blocks, the FPN's 3 lateral and 3 output convs (on C3-C5; P6/P7 are plain
    # convs), and 4 + 4 conv-norm-ReLU units in the two head towers.
    "retinanet_r18": (_retinanet, (2, 3, 64, 64), 8 + 3 + 3 + 8),
    # 5 levels, a down and an up path each.
    "unet": (_unet, (2, 1, 32, 32), 10),
}


# Dynamo's graphs for the training steps: one per shape of a block's parameters and input,
# shared by the blocks with those shapes (ConvNeXt's within a stage, ResNet's after a stage's
# first, the head towers' units on one FPN level). DenseNet's layers each see another width and
# the U-Net's levels another shape: one each, all compiled (none left eager by Dynamo's default
# recompile limit of 8).
SHARED_GRAPHS = {"densenet_bc_40": 20, "convnext_atto": 5, "retinanet_r18": 17, "unet": 10}


@pytest.fixture
def dynamo_config():
    """compile_repeated_blocks raises Dynamo's process-wide recompile limit: put it back after
    (``config.patch`` restores the value it found)."""
    torch._dynamo.reset()
    counters.clear()
    with torch._dynamo.config.patch(recompile_limit=torch._dynamo.config.recompile_limit):
        yield
    torch._dynamo.reset()


def _network(family: str) -> nn.Module:
    build, _, _ = FAMILIES[family]
    torch.manual_seed(0)
    return build().train()


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_each_family_has_its_repeated_blocks_found_none_inside_another(family) -> None:
    network = _network(family)
    blocks = repeated_blocks(network)
    assert len(blocks) == FAMILIES[family][2]
    inner = {id(m) for block in blocks for m in block.modules() if m is not block}
    assert not any(id(block) in inner for block in blocks)


def test_a_network_that_repeats_nothing_is_compiled_whole(dynamo_config) -> None:
    discriminator = PatchDiscriminator(2, ndf=4, n_layers=2, norm="bn")
    assert repeated_blocks(discriminator) == []
    assert compile_repeated_blocks(discriminator, backend="eager") == [discriminator]
    assert discriminator._compiled_call_impl is not None


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_regional_compile_keeps_keys_and_outputs_and_blocks_share_graphs(
    family, dynamo_config
) -> None:
    """Dynamo alone (backend=eager): the graphs it captures, not inductor's code, decide reuse."""
    eager = _network(family)
    compiled = copy.deepcopy(eager)
    keys = list(compiled.state_dict())
    blocks = compile_repeated_blocks(compiled, backend="eager")
    x = torch.randn(FAMILIES[family][1], generator=torch.Generator().manual_seed(1))
    for _ in range(2):  # the second step must run on the graphs of the first
        want, got = eager(x), compiled(x)
        torch.testing.assert_close(got, want)
        if isinstance(want, tuple):
            want, got = (
                torch.cat([w.flatten() for w in want]),
                torch.cat([g.flatten() for g in got]),
            )
        want.square().sum().backward()
        got.square().sum().backward()
        torch.compiler.set_stance("fail_on_recompile")
    torch.compiler.set_stance("default")
    assert list(compiled.state_dict()) == keys
    torch.testing.assert_close(compiled.state_dict(), eager.state_dict())
    for (name, p), q in zip(eager.named_parameters(), compiled.parameters(), strict=True):
        torch.testing.assert_close(q.grad, p.grad, msg=lambda m, n=name: f"{n}: {m}")
    graphs = counters["stats"]["unique_graphs"]
    assert graphs == SHARED_GRAPHS[family] <= len(blocks)


@pytest.mark.slow
@pytest.mark.parametrize("family", ["densenet_bc_40", "convnext_atto"])
def test_regional_inductor_matches_eager_within_float32_rounding(family, dynamo_config) -> None:
    eager = _network(family)
    compiled = copy.deepcopy(eager)
    compile_repeated_blocks(compiled)
    x = torch.randn(FAMILIES[family][1], generator=torch.Generator().manual_seed(1))
    want, got = eager(x), compiled(x)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    want.square().sum().backward()
    got.square().sum().backward()
    for (name, p), q in zip(eager.named_parameters(), compiled.parameters(), strict=True):
        torch.testing.assert_close(
            q.grad, p.grad, rtol=1e-4, atol=1e-5, msg=lambda m, n=name: n + m
        )
    torch.testing.assert_close(compiled.state_dict(), eager.state_dict(), rtol=1e-5, atol=1e-6)
