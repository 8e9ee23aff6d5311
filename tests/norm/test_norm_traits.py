"""A norm's traits live with its registration: a norm registered from outside normlab, with its
traits, is treated as the built-in ones are, and nothing outside ``normlab.norm`` keeps its own
list of norm names or norm classes."""

from __future__ import annotations

import ast
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torchvision
from omegaconf import OmegaConf
from torch import Tensor, nn

from cli import REPO_ROOT
from normlab.callbacks.statistics import running_statistics_layers
from normlab.models import retinanet_resnet18_fpn
from normlab.norm import (
    NORMS,
    NormTraits,
    build_norm,
    convert_norms,
    is_norm,
    layer_traits,
    norm_channels,
    norm_traits,
    register_norm,
)
from normlab.norm.fold import fold_norms
from normlab.validation import _say_what_sync_batchnorm_syncs, _sync_requests

OUTSIDE = "outside_batch_norm_for_test"


class OutsideBatchNorm(nn.Module):
    """A BatchNorm written from scratch, as a user's package would: no torch norm class behind it,
    so only its registered traits tell normlab what it is."""

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float = 0.1) -> None:
        super().__init__()
        self.num_features, self.eps, self.momentum = num_features, eps, momentum
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))

    def forward(self, x: Tensor) -> Tensor:
        if self.training:
            var, mean = torch.var_mean(x, (0, 2, 3), correction=0)
            with torch.no_grad():
                count = x.numel() // x.shape[1]
                self.running_mean.lerp_(mean, self.momentum)
                self.running_var.lerp_(var * count / (count - 1), self.momentum)
        else:
            mean, var = self.running_mean, self.running_var
        scale = self.weight / torch.sqrt(var + self.eps)
        return x * scale[:, None, None] + (self.bias - mean * scale)[:, None, None]


@pytest.fixture
def outside_norm() -> Iterator[str]:
    traits = NormTraits(batch_statistics=True, running_statistics=True)
    register_norm(OUTSIDE, traits=traits, override=True)(OutsideBatchNorm)
    yield OUTSIDE
    NORMS.pop(OUTSIDE)


def test_the_registry_gives_the_declared_traits_by_name_and_by_layer(outside_norm):
    layer = build_norm(outside_norm, 6)
    assert norm_traits(outside_norm) is layer_traits(layer)
    assert layer_traits(layer).batch_statistics and not layer_traits(layer).syncs
    assert is_norm(layer) and norm_channels(layer) == 6
    assert list(running_statistics_layers(nn.Sequential(layer))) == ["0"]


def test_a_factory_s_layers_have_its_traits_without_naming_their_class():
    traits = NormTraits(batch_statistics=True, channels=None)

    class Unnamed(nn.Module):
        def forward(self, x: Tensor) -> Tensor:
            return x

    @register_norm("outside_factory_for_test", traits=traits)
    def factory(num_features: int) -> nn.Module:
        return Unnamed()

    try:
        layer = build_norm("outside_factory_for_test", 4)
        assert layer_traits(layer) is traits and norm_channels(layer) is None
        assert layer_traits(Unnamed()) is None  # built elsewhere: its class says nothing
    finally:
        NORMS.pop("outside_factory_for_test")


def test_an_outside_batch_statistics_norm_gets_the_sync_notice(outside_norm, caplog):
    cfg = OmegaConf.create(
        {"trainer": {"sync_batchnorm": True}, "norm": {"name": outside_norm}, "model": {}}
    )
    with caplog.at_level(logging.INFO, logger="normlab"):
        _say_what_sync_batchnorm_syncs(cfg)
    (line,) = [r.getMessage() for r in caplog.records]
    assert f"it leaves norm={outside_norm} (per-process batch statistics) as they are" in line
    assert "(bn, syncbn, cuda_bn)" in line
    assert _sync_requests(cfg) == ["trainer.sync_batchnorm=true"]


def test_an_outside_batch_statistics_norm_gets_the_retinanet_head_warning(outside_norm, caplog):
    options = {"min_size": 64, "max_size": 64, "fpn_channels": 32}
    with caplog.at_level(logging.WARNING):
        retinanet_resnet18_fpn(4, **options, head_norm={"name": "gn", "num_groups": 8})
    assert "shared by all FPN levels" not in caplog.text
    with caplog.at_level(logging.WARNING):
        retinanet_resnet18_fpn(4, **options, head_norm=outside_norm)
    assert f"head_norm={outside_norm}: the head is shared by all FPN levels" in caplog.text


def test_convert_norms_reads_an_outside_norm_both_ways(outside_norm):
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=3).eval()
    bn_count = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 2)
    x = torch.randn(2, 3, 32, 32)
    expected = model(x)

    convert_norms(model, outside_norm)  # BN's statistics and affine carried over
    assert sum(isinstance(m, OutsideBatchNorm) for m in model.modules()) == bn_count
    torch.testing.assert_close(model(x), expected, rtol=1e-4, atol=1e-5)

    convert_norms(model, "gn")  # and read back by its channel attribute
    groups = [m for m in model.modules() if isinstance(m, nn.GroupNorm)]
    assert len(groups) == bn_count and groups[0].num_channels == 64
    assert not any(isinstance(m, OutsideBatchNorm) for m in model.modules())


def test_converting_to_a_norm_that_can_fuse_an_activation_adds_none():
    """cuda_bn fuses an activation it is handed, but is no norm-and-activation in one (its traits
    do not absorb one): converting a BN before a residual add must not give it a ReLU."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).eval()
    x = torch.randn(2, 3, 8, 8)
    expected = model(x)
    assert (expected < 0).any()
    convert_norms(model, "cuda_bn")
    assert not norm_traits("cuda_bn").absorbs_activation and model[1].activation is None
    torch.testing.assert_close(model(x), expected)


def test_folding_leaves_an_outside_norm_that_declares_no_affine_eval_map(outside_norm):
    model = nn.Sequential(nn.Conv2d(3, 4, 3), build_norm(outside_norm, 4)).eval()
    _, report = fold_norms(model, torch.randn(2, 3, 8, 8))
    (unfolded,) = report.unfolded
    assert not report.folded and "affine map at inference" in unfolded.reason


# -- no norm facts outside normlab.norm ----------------------------------------------------------

SRC = REPO_ROOT / "src" / "normlab"
# Where a model, a task or a config check is written; they ask normlab.norm about norms.
OUTSIDE_NORM_PACKAGE = sorted(
    [*(SRC / "models").rglob("*.py"), *(SRC / "tasks").rglob("*.py"), SRC / "validation.py"]
)


def _norm_class_names() -> set[str]:
    """Every class a registered norm builds, and its norm base classes."""
    names = set()
    for name in NORMS:
        for cls in type(build_norm(name, 8)).__mro__:
            if issubclass(cls, nn.Module) and cls not in (nn.Module, nn.Identity):
                names.add(cls.__name__)
    return names


def _names_in(node: ast.AST) -> Iterator[str]:
    for child in ast.walk(node):
        if isinstance(child, ast.Name):
            yield child.id
        elif isinstance(child, ast.Attribute):
            yield child.attr


def _norm_facts(path: Path, norm_names: set[str], class_names: set[str]) -> list[str]:
    """Registered names compared with or listed, and isinstance/issubclass of norm classes."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        where = f"{path.parent.name}/{path.name}:{getattr(node, 'lineno', '?')}"
        if isinstance(node, (ast.Compare, ast.List, ast.Tuple, ast.Set, ast.Dict)):
            constants = [
                c.value
                for c in ast.walk(node)
                if isinstance(c, ast.Constant) and isinstance(c.value, str)
            ]
            found += [f"{where}: {value!r}" for value in constants if value in norm_names]
        elif isinstance(node, ast.Call) and getattr(node.func, "id", None) in (
            "isinstance",
            "issubclass",
        ):
            classes = set(_names_in(node.args[1])) & class_names if len(node.args) > 1 else set()
            found += [f"{where}: isinstance of {name}" for name in sorted(classes)]
    return found


def test_no_norm_names_or_classes_outside_the_norm_package():
    norm_names, class_names = set(NORMS), _norm_class_names()
    assert {"bn", "gn", "none"} <= norm_names and {"BatchNorm2d", "GroupNorm"} <= class_names
    found = [f for path in OUTSIDE_NORM_PACKAGE for f in _norm_facts(path, norm_names, class_names)]
    assert not found, "norm facts kept outside normlab.norm (use its traits):\n" + "\n".join(found)


def test_the_norm_facts_check_sees_a_name_list_and_an_isinstance(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text(
        "BATCH = {'bn', 'brn'}\n"
        "def f(m, spec):\n"
        "    return isinstance(m, (nn.GroupNorm, Conv2d)) or spec == 'syncbn'\n"
    )
    found = _norm_facts(probe, set(NORMS), _norm_class_names())
    assert len(found) == 4, found
