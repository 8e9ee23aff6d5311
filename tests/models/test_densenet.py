"""DenseNet: torchvision parity, published sizes, memory-efficient equivalence, every norm."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from normlab.models.densenet import (
    DenseNet,
    densenet121,
    densenet161,
    densenet169,
    densenet201,
    densenet_bc,
    densenet_bc_100,
)
from normlab.norm import NORMS, get_norm_layer


def num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def randomize_norms(model: nn.Module) -> None:
    """Non-trivial affine parameters and running statistics, so a mis-wired norm shows."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, _BatchNorm):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0.0, 0.1)
                m.running_mean.normal_(0.0, 0.1)
                m.running_var.uniform_(0.5, 1.5)


@pytest.mark.parametrize(
    ("ours", "theirs", "expected_params"),
    [
        (densenet121, torchvision.models.densenet121, 7_978_856),
        (densenet161, torchvision.models.densenet161, 28_681_000),
        (densenet169, torchvision.models.densenet169, 14_149_480),
        (densenet201, torchvision.models.densenet201, 20_013_928),
    ],
    ids=["121", "161", "169", "201"],
)
def test_imagenet_parity_with_torchvision(ours, theirs, expected_params) -> None:
    torch.manual_seed(0)
    reference = theirs(weights=None).eval()
    randomize_norms(reference)
    model = ours(norm="bn").eval()
    model.load_state_dict(reference.state_dict(), strict=True)
    assert num_params(model) == num_params(reference) == expected_params

    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        expected, actual = reference(x), model(x)
    assert actual.shape == (1, 1000)
    assert (actual - expected).abs().max().item() <= 1e-5


def test_densenet_bc_100_size_and_forward() -> None:
    model = densenet_bc_100(num_classes=10)
    assert num_params(model) == 769_162
    assert not hasattr(model.features, "norm0")  # the CIFAR stem is a bare 3x3 conv
    assert model.features.conv0.out_channels == 24
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_densenet_bc_depth_sets_layers_per_block() -> None:
    model = densenet_bc(40, in_channels=1)
    assert num_params(model) == 176_122 - 2 * 9 * 24  # a 1-channel stem: 2 × 9 × 24 fewer
    assert [len(block) for block in (model.features.denseblock1, model.features.denseblock3)] == [
        6,
        6,
    ]
    assert model(torch.randn(2, 1, 16, 16)).shape == (2, 10)
    with pytest.raises(ValueError, match="6n \\+ 4"):
        densenet_bc(42)


def _small_densenet(memory_efficient: bool, drop_rate: float = 0.0) -> DenseNet:
    return DenseNet(
        growth_rate=8,
        block_config=(3, 3),
        num_init_features=16,
        drop_rate=drop_rate,
        num_classes=5,
        stem="cifar",
        memory_efficient=memory_efficient,
    )


def _count_norm1_calls(model: nn.Module) -> list[int]:
    calls = [0]
    for name, m in model.named_modules():
        if name.endswith("norm1"):
            m.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


@pytest.mark.parametrize("drop_rate", [0.0, 0.2])
def test_memory_efficient_matches_plain(drop_rate: float) -> None:
    torch.manual_seed(0)
    plain = _small_densenet(False, drop_rate).train()
    efficient = _small_densenet(True, drop_rate).train()
    efficient.load_state_dict(plain.state_dict(), strict=True)
    plain_calls, efficient_calls = _count_norm1_calls(plain), _count_norm1_calls(efficient)

    x = torch.randn(4, 3, 16, 16)
    results = []
    for model in (plain, efficient):
        torch.manual_seed(1)  # same dropout masks
        inp = x.clone().requires_grad_()
        out = model(inp)
        out.square().sum().backward()
        results.append((out.detach(), inp.grad))
    # The bottleneck really was recomputed (6 dense layers).
    assert plain_calls[0] == 6 and efficient_calls[0] == 12

    (out_p, grad_p), (out_e, grad_e) = results
    torch.testing.assert_close(out_e, out_p, rtol=0, atol=1e-6)
    torch.testing.assert_close(grad_e, grad_p, rtol=0, atol=1e-6)
    for (name, p), q in zip(plain.named_parameters(), efficient.parameters(), strict=True):
        torch.testing.assert_close(q.grad, p.grad, rtol=0, atol=1e-6, msg=name)
    for (name, b), c in zip(plain.named_buffers(), efficient.buffers(), strict=True):
        torch.testing.assert_close(c, b, rtol=0, atol=0, msg=name)


def test_memory_efficient_updates_running_stats_once() -> None:
    torch.manual_seed(0)
    plain = densenet_bc_100(num_classes=10).train()
    efficient = densenet_bc_100(num_classes=10, memory_efficient=True).train()
    efficient.load_state_dict(plain.state_dict(), strict=True)

    x = torch.randn(2, 3, 32, 32)
    for model in (plain, efficient):
        model(x).logsumexp(1).sum().backward()

    bn_buffers = {"running_mean", "running_var", "num_batches_tracked"}
    checked = 0
    for (name, b), c in zip(plain.named_buffers(), efficient.buffers(), strict=True):
        assert name.rsplit(".", 1)[-1] in bn_buffers
        torch.testing.assert_close(c, b, rtol=0, atol=0, msg=name)
        if name.endswith("num_batches_tracked"):
            assert c.item() == 1, name
            checked += 1
    assert checked == 99  # 96 dense-layer norms, 2 transitions, norm5
    for (name, p), q in zip(plain.named_parameters(), efficient.parameters(), strict=True):
        torch.testing.assert_close(q.grad, p.grad, rtol=0, atol=1e-6, msg=name)


def test_memory_efficient_survives_retained_graph_and_eval() -> None:
    torch.manual_seed(0)
    model = _small_densenet(True).train()
    out = model(torch.randn(2, 3, 16, 16)).sum()
    out.backward(retain_graph=True)
    out.backward()  # recomputes a second time; the restore context must be reusable
    assert all(b.item() == 1 for n, b in model.named_buffers() if n.endswith("num_batches_tracked"))

    model.eval()  # e.g. fine-tuning with frozen statistics: still checkpointed, still correct
    x = torch.randn(2, 3, 16, 16, requires_grad=True)
    model(x).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


@pytest.mark.parametrize("norm", sorted(NORMS))
def test_every_registered_norm(norm: str) -> None:
    torch.manual_seed(0)
    model = densenet_bc_100(norm=norm, num_classes=10, in_channels=1).train()
    out = model(torch.randn(2, 1, 32, 32))
    assert out.shape == (2, 10)
    out.sum().backward()
    assert model.features.conv0.weight.grad is not None

    # Every norm position holds the registry's layer (96 dense-layer norms + 2 transitions + norm5).
    norm_type = type(get_norm_layer(norm)(8))
    assert sum(type(m) is norm_type for m in model.modules()) == 99
    if not issubclass(norm_type, _BatchNorm):  # bn, syncbn, brn, ghost_bn are BN subclasses
        assert not any(isinstance(m, _BatchNorm) for m in model.modules())


def test_mapping_spec_reaches_every_layer_and_init() -> None:
    model = densenet_bc_100(norm={"name": "gn", "num_groups": 2})
    groups = [m for m in model.modules() if isinstance(m, nn.GroupNorm)]
    assert len(groups) == 99 and all(m.num_groups == 2 for m in groups)
    assert all(torch.all(m.weight == 1) and torch.all(m.bias == 0) for m in groups)
    assert torch.all(model.classifier.bias == 0)


def test_in_channels_one_imagenet() -> None:
    model = densenet121(in_channels=1, num_classes=7).eval()
    assert model.features.conv0.weight.shape == (64, 1, 7, 7)
    with torch.no_grad():
        assert model(torch.randn(1, 1, 32, 32)).shape == (1, 7)


def test_bad_stem_rejected() -> None:
    with pytest.raises(ValueError, match="stem"):
        DenseNet(stem="resnet")  # type: ignore[arg-type]
