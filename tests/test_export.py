"""Folding norms into convolutions (parity with the unfolded eval model, what is and is not
folded, and why) and ``python -m normlab.export`` on a checkpoint of a short training run."""

from __future__ import annotations

import importlib.util
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra.core.global_hydra import GlobalHydra
from torch import nn

from normlab import models
from normlab.errors import ConfigError
from normlab.export import FORMATS, export
from normlab.norm import is_norm
from normlab.norm.fold import fold_norms
from normlab.ops.batchnorm import CudaBatchNorm
from normlab.tasks import ClassificationModule, DetectionModule, Pix2PixModule
from normlab.train import train
from tiny_runs import compose_run, tiny_checkpoint, with_ema_weights

CUDA_BN = {"name": "cuda_bn", "backend": "reference"}


def _randomised(model: nn.Module) -> nn.Module:
    """Non-trivial running statistics and affine parameters in every norm, then eval mode."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for module in model.modules():
            if getattr(module, "running_var", None) is None:
                continue
            size = module.running_var.shape
            module.running_mean.copy_(torch.randn(size, generator=generator) * 0.5)
            module.running_var.copy_(torch.rand(size, generator=generator) * 1.5 + 0.5)
            if getattr(module, "weight", None) is not None:
                module.weight.copy_(1 + 0.3 * torch.randn(size, generator=generator))
                module.bias.copy_(0.3 * torch.randn(size, generator=generator))
    return model.eval()


def _flatten(out) -> torch.Tensor:
    """All output tensors (a tensor, a tuple/list, or a dict of them) as one flat tensor."""
    if isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, (list, tuple)):
        return torch.cat([t.flatten() for t in out])
    return out.flatten()


def _outputs(model: nn.Module, inputs) -> torch.Tensor:
    with torch.no_grad():
        return _flatten(model(*inputs) if isinstance(inputs, tuple) else model(inputs))


def _fold_and_compare(model: nn.Module, inputs, tolerance: float = 1e-5):
    """Fold ``_randomised(model)`` and check its outputs against the unfolded eval model."""
    model = _randomised(model)
    folded, report = fold_norms(model, inputs)
    expected, got = _outputs(model, inputs), _outputs(folded, inputs)
    relative = float((got - expected).abs().max() / expected.abs().max())
    assert relative <= tolerance, relative
    assert report.max_relative_difference <= tolerance
    assert not folded.training
    return folded, report


def _batch_norms(model: nn.Module) -> list[str]:
    return [
        name for name, m in model.named_modules() if getattr(m, "running_var", None) is not None
    ]


def test_densenet_folds_each_bottleneck_norm_into_its_1x1_conv():
    model = _randomised(models.densenet_bc_100())
    original = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    folded, report = fold_norms(model, torch.randn(2, 3, 32, 32))
    # conv1 (1×1 bottleneck) → norm2 in each of the 48 dense layers. Every other norm reads a
    # concatenation and feeds a ReLU.
    assert len(report.folded) == 48
    assert {(f.norm.rsplit(".", 1)[1], f.conv.rsplit(".", 1)[1]) for f in report.folded} == {
        ("norm2", "conv1")
    }
    assert len(report.unfolded) == 48 + 2 + 1  # norm1s, transitions, norm5
    for unfolded in report.unfolded:
        assert "its input comes from cat, not a convolution" in unfolded.reason
        assert "an activation between the norm and the next convolution" in unfolded.reason
    # Each fold: -2C norm parameters, +C conv bias (C = 4·12 = 48).
    assert report.parameters_after == report.parameters_before - 48 * 48
    assert len(_batch_norms(folded)) == 51
    # The model passed in is untouched, and the folded one computes what it does.
    assert all(torch.equal(original[k], v) for k, v in model.state_dict().items())
    assert model.training is False and folded.training is False
    _fold_and_compare(model, torch.randn(2, 3, 32, 32))


def test_densenet_with_fused_relu_keeps_the_activation():
    folded, report = _fold_and_compare(
        models.densenet_bc_100(norm=CUDA_BN), torch.randn(2, 3, 32, 32)
    )
    assert len(report.folded) == 48 and {f.activation for f in report.folded} == {"ReLU"}
    assert isinstance(folded.features.denseblock1.denselayer1.norm2, nn.ReLU)
    assert all("fused ReLU" in u.reason for u in report.unfolded)


def test_convnext_folds_forwards_into_downsampling_convs():
    model = models.convnext_atto(norm="bn", patch_size=2, num_classes=10)
    _, report = _fold_and_compare(model, torch.randn(2, 3, 32, 32))
    directions = Counter(f.direction for f in report.folded)
    # stem and 12 blocks: conv → norm; 3 downsampling layers: norm → 2×2 conv without padding.
    assert directions == {"into_preceding_conv": 13, "into_following_conv": 3}
    assert [u.norm for u in report.unfolded] == ["head.norm"]  # pooled features → flatten


@pytest.mark.parametrize("norm", ["bn", "frozen_bn", "syncbn", CUDA_BN])
def test_retinanet_backbone_folds_every_norm(norm):
    detector = models.retinanet_resnet18_fpn(num_classes=3, norm=norm, fpn_channels=32)
    folded, report = _fold_and_compare(detector.backbone, torch.randn(1, 3, 64, 64))
    assert len(report.folded) == 20 and not report.unfolded  # stem, 16 in blocks, 3 downsample
    assert not any(is_norm(m) for m in folded.modules())


def test_whole_retinanet_with_shared_bn_heads():
    # The head's convolutions and norms run once per FPN level: every call pairs up.
    detector = models.retinanet_resnet18_fpn(
        num_classes=3, norm="bn", head_norm="bn", fpn_channels=32, min_size=64, max_size=64
    )
    detector = _randomised(detector)
    folded, report = fold_norms(detector, [torch.rand(3, 64, 64)])
    assert len(report.folded) == 20 + 8 and not report.unfolded
    images = detector.transform([torch.rand(3, 64, 64)])[0].tensors
    dense, dense_folded = models.DenseRetinaNet(detector), models.DenseRetinaNet(folded)
    expected, got = _outputs(dense, images), _outputs(dense_folded, images)
    assert float((got - expected).abs().max() / expected.abs().max()) <= 1e-5


@pytest.mark.parametrize("norm", ["bn", CUDA_BN])
def test_unet_folds_into_convs_and_transposed_convs(norm):
    model = models.UnetGenerator(1, 1, num_downs=5, ngf=8, norm=norm)
    folded, report = _fold_and_compare(model, torch.randn(2, 1, 32, 32))
    # Down: conv → norm in 3 intermediate levels; up: convT → norm in those and the innermost.
    kinds = Counter(type(folded.get_submodule(f.conv)).__name__ for f in report.folded)
    assert kinds == {"Conv2d": 3, "ConvTranspose2d": 4} and not report.unfolded
    assert not any(is_norm(m) for m in folded.modules())


class _Residual(nn.Module):
    """conv → bn, but the conv's output is also added to the result."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return self.bn(y) + y


@pytest.mark.parametrize(
    ("model", "folded_into", "reason"),
    [
        # grouped transposed conv → bn; bn → grouped 1×1 conv; conv → instance norm with
        # running statistics (an affine map in eval mode too)
        (nn.Sequential(nn.ConvTranspose2d(4, 6, 3, groups=2), nn.BatchNorm2d(6)), "0", None),
        (nn.Sequential(nn.BatchNorm2d(4), nn.Conv2d(4, 6, 1, groups=2)), "1", None),
        (
            nn.Sequential(nn.Conv2d(4, 6, 3), nn.InstanceNorm2d(6, track_running_stats=True)),
            "0",
            None,
        ),
        # never: the conv's output is also used elsewhere, or changed in place in between; the
        # following conv pads; the norm has no running statistics
        (_Residual(), None, "the output of conv is also used by Tensor.add"),
        (
            nn.Sequential(nn.Conv2d(4, 4, 3), nn.ReLU(inplace=True), nn.BatchNorm2d(4)),
            None,
            "also used by relu (an activation between",
        ),
        (nn.Sequential(nn.BatchNorm2d(4), nn.Conv2d(4, 4, 3, padding=1)), None, "pads its input"),
        (nn.Sequential(nn.Conv2d(4, 4, 3), nn.GroupNorm(2, 4)), None, "its own statistics"),
        (nn.Sequential(nn.Conv2d(4, 4, 3), nn.InstanceNorm2d(4)), None, "without running"),
    ],
    ids=[
        "convT-grouped",
        "bn-grouped-conv",
        "in-running",
        "residual",
        "inplace",
        "padding",
        "gn",
        "in",
    ],
)
def test_fold_rules(model, folded_into, reason):
    _, report = _fold_and_compare(model, torch.randn(2, 4, 7, 7))
    if folded_into is None:
        assert not report.folded and len(report.unfolded) == 1
        assert reason in report.unfolded[0].reason
    else:
        assert [f.conv for f in report.folded] == [folded_into] and not report.unfolded


class _HiddenReference(nn.Module):
    """Calls its norm through a plain attribute, which folding cannot see or replace."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        object.__setattr__(self, "norm_alias", self.bn)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm_alias(self.conv(x))


def test_a_folded_model_that_computes_something_else_is_refused():
    with pytest.raises(RuntimeError, match="so use the unfolded model"):
        fold_norms(_randomised(_HiddenReference()), torch.randn(2, 4, 7, 7))


def test_tasks_inference_networks_fold_and_trace(tmp_path):
    from normlab.export import _export_torchscript

    adam = {"_target_": "torch.optim.Adam", "_partial_": True}
    classifier = ClassificationModule(
        {"_target_": "normlab.models.densenet_bc_100", "in_channels": 1}, adam, num_classes=10
    )
    detector = DetectionModule(
        {
            "_target_": "normlab.models.retinanet_resnet18_fpn",
            "num_classes": 3,
            "fpn_channels": 32,
            "min_size": 64,
            "max_size": 64,
        },
        adam,
        num_classes=3,
    )
    unet = {"_target_": "normlab.models.UnetGenerator", "in_channels": 1, "out_channels": 1}
    patch = {"_target_": "normlab.models.PatchDiscriminator", "ndf": 8, "n_layers": 2}
    translator = Pix2PixModule(
        {"generator": {**unet, "num_downs": 5, "ngf": 8}, "discriminator": patch}, adam
    )
    batches = [
        (torch.randn(2, 1, 32, 32), torch.tensor([0, 1])),
        ([torch.rand(3, 64, 64), torch.rand(3, 48, 64)], [{}, {}]),
        {"A": torch.rand(2, 1, 32, 32), "B": torch.rand(2, 1, 32, 32)},
    ]
    for index, (task, batch) in enumerate(
        zip((classifier, detector, translator), batches, strict=True)
    ):
        network, inputs = task.eval().inference_network(batch)
        folded, report = _fold_and_compare(network, inputs)
        assert report.folded
        exported = _export_torchscript(folded, inputs, tmp_path / f"{index}.pt")
        expected, got = _outputs(network, inputs), _flatten(exported)
        assert float((got - expected).abs().max() / expected.abs().max()) <= 1e-5


# -- the entry point ---------------------------------------------------------------------------


@pytest.fixture
def checkpoint(compose_config, fast) -> Path:
    cfg = compose_config(
        *fast,
        "data.image_size=16",
        "trainer.max_epochs=1",
        "trainer.limit_train_batches=2",
        "trainer.limit_val_batches=1",
        "test=false",
    )
    train(cfg)
    return Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt"


def test_export_writes_a_torchscript_file_matching_the_checkpoint(
    compose_config, checkpoint, tmp_path, monkeypatch
):
    cfg = compose_config(f"ckpt_path={checkpoint}", config_name="export", run="export")
    report = export(cfg)

    out = checkpoint.parent.parent / "export" / "last"
    assert Path(report["exported_file"]) == (out / "model.pt").resolve()
    assert json.loads((out / "report.json").read_text()) == report
    markdown = (out / "report.md").read_text()
    assert "norms folded: 48; left in place: 51" in markdown and "norm2" in markdown
    assert report["folding"]["parameters_after"] < report["folding"]["parameters_before"]
    assert report["max_abs_difference_exported"] < 1e-4

    module = ClassificationModule.load_from_checkpoint(checkpoint, map_location="cpu").eval()
    scripted = torch.jit.load(str(out / "model.pt"))
    images = torch.randn(5, 1, 16, 16)
    with torch.no_grad():
        expected, got = module(images), scripted(images)
    assert float((got - expected).abs().max() / expected.abs().max()) <= 1e-5

    # Without folding, into a chosen directory; a format that does not exist.
    cfg = compose_config(
        f"ckpt_path={checkpoint}",
        "fold_norms=false",
        f"output_dir={tmp_path / 'plain'}",
        config_name="export",
        run="export",
    )
    report = export(cfg)
    assert report["folding"] is None and report["max_abs_difference_exported"] == 0.0
    assert (tmp_path / "plain" / "model.pt").is_file()
    cfg = compose_config(f"ckpt_path={checkpoint}", "format=tflite", config_name="export")
    with pytest.raises(ConfigError, match="format='tflite' is not one of: torchscript, onnx"):
        export(cfg)

    # Where the optional ONNX packages are missing (the test environment has them: the dev
    # extra includes the export extra), format=onnx says what to install.
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *args: None if name in ("onnx", "onnxscript") else find_spec(name, *args),
    )
    cfg = compose_config(f"ckpt_path={checkpoint}", "format=onnx", config_name="export")
    with pytest.raises(ConfigError, match=r"format=onnx needs onnx and onnxscript.*pip install"):
        export(cfg)


def test_export_onnx(compose_config, checkpoint, tmp_path):
    cfg = compose_config(
        f"ckpt_path={checkpoint}", "format=onnx", f"output_dir={tmp_path}", config_name="export"
    )
    report = export(cfg)
    assert (tmp_path / "model.onnx").is_file() and report["folding"]["folded"]
    # onnxruntime ran the file: its outputs are those of the checkpoint's eval model.
    assert report["max_abs_difference_exported"] is not None
    assert report["max_abs_difference_exported"] < 1e-4
    assert report["batch_size"] == "any"
    _onnx_one_and_all(tmp_path / "model.onnx", report["example_input_shapes"][0])


def test_cuda_bn_is_foldable_as_batchnorm():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), CudaBatchNorm(4, backend="reference"))
    _, report = _fold_and_compare(model, torch.randn(2, 3, 6, 6))
    assert [f.norm_type for f in report.folded] == ["CudaBatchNorm"]


# -- pix2pix and RetinaNet checkpoints; ONNX files take any batch size -----------------------------


@pytest.fixture(scope="module")
def task_checkpoints(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("export_tasks")
    return {task: tiny_checkpoint(task, root / task) for task in ("pix2pix", "detection")}


def _export_to(checkpoint: Path, directory: Path, export_format: str) -> dict:
    cfg = compose_run(
        [f"ckpt_path={checkpoint}", f"format={export_format}", f"output_dir={directory}"],
        "export",
        directory.parent / f"export_{export_format}",
    )
    try:
        return export(cfg)
    finally:
        GlobalHydra.instance().clear()


def _onnx_one_and_all(path: Path, shape: list[int]) -> None:
    """The file runs on one image and on the export's batch, and gives each image the same
    outputs either way (the networks are exported in eval mode: per-image)."""
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    images = np.random.default_rng(0).random(shape, dtype=np.float32)
    whole = session.run(None, {name: images})
    single = session.run(None, {name: images[:1]})
    for batch_output, one_output in zip(whole, single, strict=True):
        assert one_output.shape == (1, *batch_output.shape[1:])
        np.testing.assert_allclose(one_output[0], batch_output[0], rtol=1e-4, atol=1e-5)


def test_export_pix2pix_in_both_formats(task_checkpoints, tmp_path):
    checkpoint = task_checkpoints["pix2pix"]
    for export_format in FORMATS:
        report = _export_to(checkpoint, tmp_path / export_format, export_format)
        assert report["model"] == {
            "generator": "normlab.models.pix2pix.UnetGenerator",
            "discriminator": "normlab.models.pix2pix.PatchDiscriminator",
        }
        assert report["network"] == "UnetGenerator" and report["max_abs_difference_exported"] < 1e-4
        markdown = (tmp_path / export_format / "report.md").read_text()
        assert "generator `normlab.models.pix2pix.UnetGenerator`" in markdown
    assert report["batch_size"] == "any"
    _onnx_one_and_all(Path(report["exported_file"]), report["example_input_shapes"][0])


def test_retinanet_onnx_takes_one_image(task_checkpoints, tmp_path):
    report = _export_to(task_checkpoints["detection"], tmp_path, "onnx")
    assert report["network"] == "DenseRetinaNet" and report["batch_size"] == "any"
    _onnx_one_and_all(Path(report["exported_file"]), report["example_input_shapes"][0])


# -- the EMA or the raw weights ------------------------------------------------------------------


@pytest.fixture(scope="module")
def ema_checkpoints(tmp_path_factory) -> dict[str, Path]:
    plain = tiny_checkpoint("classification", tmp_path_factory.mktemp("export_ema") / "run")
    return {"plain": plain, "ema": with_ema_weights(plain, plain.parent / "ema.ckpt")}


@pytest.mark.parametrize(("weights", "loaded_from"), [(None, "ema"), ("raw", "plain")])
def test_export_folds_and_writes_the_weights_chosen(
    ema_checkpoints, tmp_path, weights, loaded_from
):
    """Default: the EMA weights (the checkpoint's state_dict); weights=raw: the trained ones,
    those of the same run's checkpoint without EMA."""
    overrides = [] if weights is None else [f"weights={weights}"]
    cfg = compose_run(
        [f"ckpt_path={ema_checkpoints['ema']}", f"output_dir={tmp_path}", *overrides],
        "export",
        tmp_path / "export",
    )
    try:
        report = export(cfg)
    finally:
        GlobalHydra.instance().clear()
    assert report["weights"] == (weights or "ema") and len(report["folding"]["folded"]) == 18
    assert f"weights: {report['weights']}" in (tmp_path / "report.md").read_text()
    scripted = torch.jit.load(str(tmp_path / "model.pt"))
    images = torch.randn(5, 1, 16, 16)
    outputs = {}
    for name, path in ema_checkpoints.items():
        module = ClassificationModule.load_from_checkpoint(path, map_location="cpu").eval()
        with torch.no_grad():
            outputs[name] = module(images)
    with torch.no_grad():
        got = scripted(images)
    expected, other = outputs[loaded_from], outputs["plain" if loaded_from == "ema" else "ema"]
    assert float((got - expected).abs().max() / expected.abs().max()) <= 1e-5
    assert float((got - other).abs().max() / other.abs().max()) > 1e-3
