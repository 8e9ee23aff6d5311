"""A run's output holds what the user needs, not the dependencies' notices: no advertisements
from Lightning, no hint to use srun on a machine that merely has Slurm's tools, no wandb warning
about a setting nobody set (nor its banners, unless asked for), no Lightning lines that say
nothing here, no log line per graph rewrite from the ONNX exporter; and the model summary counts
real FLOPs."""

from __future__ import annotations

import logging
import os
import re
import warnings

import pytest
import torch
from torch import nn

from cli import run_train

NOISE = (
    "💡 Tip",  # Lightning's litlogger and litmodels advertisements
    "The `srun` command is available",  # Lightning, whenever srun is on the PATH
    "The anonymous setting has no effect",  # wandb, for the option Lightning always passes
    # Lightning's lines that say nothing here: our RichModelSummary replaces its default one, the
    # accelerators it looked for, that it reads the loader's length.
    "Trainer already configured with model summary callbacks",
    "GPU available:",
    "TPU available:",
    "Loading `train_dataloader` to estimate",
    "v_num",  # the logger's version (wandb's run id) among the progress metrics
)


def test_a_short_run_with_wandb_prints_none_of_the_dependency_notices(tmp_path):
    # A stand-in for Slurm's client tools: Lightning only looks for an `srun` on the PATH.
    tools = tmp_path / "bin"
    tools.mkdir()
    (tools / "srun").write_text("#!/bin/sh\nexit 0\n")
    (tools / "srun").chmod(0o755)
    env = {**os.environ, "PATH": f"{tools}:{os.environ['PATH']}", "WANDB_MODE": "offline"}
    # wandb's own output back on (the entry point silences it by default): its warnings are what
    # is checked.
    env["WANDB_SILENT"] = "false"
    result = run_train(
        "model=densenet_bc_40",
        "data.image_size=16",
        "data.batch_size=8",
        "trainer.max_epochs=1",
        "trainer.limit_train_batches=1",
        "trainer.limit_val_batches=1",
        "test=false",
        "logger=wandb",
        f"hydra.run.dir={tmp_path / 'run'}",
        env=env,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, result.stderr[-3000:]
    assert "wandb" in output  # wandb did speak (its offline-sync hint), only not the noise
    for notice in NOISE:
        assert notice not in output, notice
    # The model summary counts the model's FLOPs on one example input.
    flops = re.search(r"Total FLOPs: ([\d.]+) ?([KMGT]?)", output)
    assert flops and float(flops[1]) > 0, output[-3000:]


def test_wandb_is_silent_unless_the_environment_says_otherwise(monkeypatch):
    from normlab.utils.dependency_warnings import quiet_dependency_warnings

    monkeypatch.delenv("WANDB_SILENT", raising=False)
    quiet_dependency_warnings()
    assert os.environ["WANDB_SILENT"] == "true"
    monkeypatch.setenv("WANDB_SILENT", "false")
    quiet_dependency_warnings()
    assert os.environ["WANDB_SILENT"] == "false"


def test_onnx_export_logs_none_of_the_graph_passes(caplog, tmp_path):
    import normlab.export  # noqa: F401  (imported as `python -m normlab.export` imports it)

    caplog.set_level(logging.INFO)
    network = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU()).eval()
    torch.onnx.export(
        network, (torch.randn(1, 3, 8, 8),), str(tmp_path / "m.onnx"), external_data=False
    )
    assert (tmp_path / "m.onnx").stat().st_size > 0
    passes = [
        r.getMessage() for r in caplog.records if r.name.startswith(("onnxscript", "onnx_ir"))
    ]
    assert passes == []


def test_the_model_summary_does_not_call_its_exact_bf16_mixed_size_inexact():
    import lightning.pytorch as pl
    from lightning.pytorch.utilities.model_summary import ModelSummary

    from normlab.utils.dependency_warnings import quiet_dependency_warnings

    class Tiny(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.layer = nn.Linear(1000, 250)

    module = Tiny()
    module.trainer = pl.Trainer(precision="bf16-mixed", logger=False, enable_progress_bar=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet_dependency_warnings()
        summary = ModelSummary(module)
    assert [str(w.message) for w in caught if "model summary" in str(w.message)] == []
    # Mixed precision keeps the parameters in float32: 4 bytes each, as the summary counts them.
    assert summary.model_size == pytest.approx(250_250 * 4e-6)
