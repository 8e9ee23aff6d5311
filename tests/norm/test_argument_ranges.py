"""Numeric arguments outside their declared ranges are refused by the library calls themselves,
naming the argument (the config layer's checks, naming the config key, are in
tests/reliability/test_bad_configs.py)."""

from __future__ import annotations

import inspect

import pytest
from omegaconf import OmegaConf

from normlab.errors import ConfigError
from normlab.models import ConvNeXt, DenseNet, UnetGenerator, convnext_atto, retinanet_resnet18_fpn
from normlab.norm import NORMS, build_norm, register_norm
from normlab.norm.registry import argument_ranges
from normlab.ranges import POSITIVE, ArgumentError, ValueRange, declared_ranges
from normlab.validation import name_config_keys


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"name": "bn", "eps": -1.0}, "eps must be a number > 0, got -1.0 (norm 'bn')"),
        ({"name": "ln", "eps": 0}, "eps must be a number > 0, got 0 (norm 'ln')"),
        ({"name": "in", "momentum": 2}, "momentum must be null or a number in [0, 1], got 2"),
        ({"name": "gn", "num_groups": 0}, "num_groups must be null or an integer >= 1, got 0"),
        ({"name": "syncbn", "eps": "abc"}, "eps must be a number > 0, got 'abc'"),
    ],
)
def test_a_norm_argument_out_of_range_is_refused_naming_it(spec, message):
    with pytest.raises(ArgumentError) as error:
        build_norm(spec, 8)
    assert message in str(error.value)


def test_valid_edge_values_are_accepted():
    build_norm({"name": "bn", "momentum": None}, 4)
    build_norm({"name": "bn", "momentum": 0.0}, 4)
    build_norm({"name": "frozen_bn", "eps": 0.0}, 4)  # fixed statistics: eps 0 is torchvision's


def test_every_numeric_argument_of_every_norm_has_a_range():
    """A norm registered without ranges for its numbers would let nonsense through to training."""
    for name, factory in NORMS.items():
        numeric = [
            p.name
            for p in list(inspect.signature(factory).parameters.values())[1:]
            if any(kind in str(p.annotation) for kind in ("int", "float"))
        ]
        missing = sorted(set(numeric) - set(argument_ranges(name)))
        assert not missing, f"norm {name!r} declares no range for {missing}"


def test_a_registered_norm_gets_its_declared_ranges_checked():
    @register_norm("test_scaled", ranges={"scale": POSITIVE}, override=True)
    def scaled(num_features: int, scale: float = 1.0, eps: float = 1e-5) -> object:
        return object()

    try:
        with pytest.raises(ArgumentError, match="scale must be a number > 0, got -2"):
            build_norm({"name": "test_scaled", "scale": -2}, 4)
        with pytest.raises(ArgumentError, match="eps must be a number > 0"):  # conventional
            build_norm({"name": "test_scaled", "eps": -1}, 4)
    finally:
        del NORMS["test_scaled"]


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: convnext_atto(drop_path_rate=1.5), "drop_path_rate must be a number in [0, 1)"),
        (lambda: DenseNet(compression=0.0), "compression must be a number in (0, 1], got 0.0"),
        (lambda: UnetGenerator(ngf=0, num_downs=5), "ngf must be an integer >= 1, got 0"),
        (
            lambda: retinanet_resnet18_fpn(num_classes=3, nms_thresh=1.5),
            "nms_thresh must be a number in [0, 1], got 1.5 (retinanet_resnet18_fpn)",
        ),
    ],
)
def test_a_model_argument_out_of_range_is_refused_before_building(build, message):
    with pytest.raises(ArgumentError) as error:
        build()
    assert message in str(error.value)


def test_constructor_functions_declare_their_class_ranges():
    assert declared_ranges(convnext_atto) is ConvNeXt.argument_ranges
    assert "nms_thresh" in declared_ranges(retinanet_resnet18_fpn)


@pytest.mark.parametrize(
    ("allowed", "text", "good", "bad"),
    [
        (ValueRange(low=0, high=1, high_open=True), "a number in [0, 1)", [0, 0.5], [1, -0.1]),
        (ValueRange(low=1, integer=True), "an integer >= 1", [1, 7], [0, 1.5, True]),
        (ValueRange(low=0, low_open=True, nullable=True), "null or a number > 0", [None], [0]),
    ],
)
def test_value_range_allows_and_describes(allowed, text, good, bad):
    assert str(allowed) == text
    assert all(allowed.allows(v) for v in good)
    assert not any(allowed.allows(v) for v in bad)
    assert not allowed.allows(float("nan"))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        # model.norm is ${norm}: the key the value was set under is norm.
        ({"norm": {"name": "gn", "num_groups": 7}}, "not divisible by norm.num_groups=7"),
        (
            {"model": {"head_norm": {"name": "gn", "num_groups": 7}}},
            "not divisible by model.head_norm.num_groups=7",
        ),
    ],
)
def test_the_config_layer_names_the_key_a_library_error_came_from(overrides, message):
    cfg = OmegaConf.merge(
        {"norm": {"name": "bn"}, "model": {"norm": "${norm}", "head_norm": None}}, overrides
    )

    @name_config_keys
    def build(cfg):
        build_norm({"name": "gn", "num_groups": 7}, 24)

    with pytest.raises(ConfigError) as error:
        build(cfg)
    assert str(error.value) == f"gn: 24 channels are {message}"


def test_a_library_error_keeps_the_argument_name_when_no_key_set_it():
    @name_config_keys
    def build(cfg):
        build_norm({"name": "gn", "num_groups": 7}, 24)

    with pytest.raises(ArgumentError, match=r"divisible by num_groups=7$"):
        build(OmegaConf.create({"norm": {"name": "bn"}}))
