"""The command line as a user types it: clear one-line errors (sweeps: test_sweeps.py)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from cli import offline_env, run_train


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return run_train(*args, cwd=cwd, env=offline_env(HYDRA_FULL_ERROR="0"))


def test_unknown_norm_fails_at_once_listing_the_choices(tmp_path):
    result = run_cli("norm=nope", cwd=tmp_path)
    assert result.returncode == 2
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith(
        "normlab: configuration error: norm='nope': no such config in conf/norm/"
    )
    options = line.partition("options: ")[2].split(", ")
    assert {"bn", "syncbn", "ln", "gn", "in", "frozen_bn", "none", "cuda_bn"} <= set(options)
    assert not (tmp_path / "logs").exists()


@pytest.mark.slow
def test_group_count_not_dividing_channels_is_one_clear_line(tmp_path):
    result = run_cli("norm=gn", "norm.num_groups=7", cwd=tmp_path)
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if "configuration error" in line]
    assert errors == [
        "normlab: configuration error: gn: 24 channels are not divisible by norm.num_groups=7"
    ]
    assert "Traceback" not in result.stderr
    # It failed before any data was read or any epoch ran.
    assert "Epoch" not in result.stdout


@pytest.mark.slow
def test_required_value_left_unset_is_named(tmp_path):
    result = run_cli("data=imagefolder", cwd=tmp_path)
    assert result.returncode == 2
    assert "normlab: configuration error: data.root must be set" in result.stderr
    assert "Traceback" not in result.stderr


def test_detection_options_are_checked_before_any_data_is_written(tmp_path):
    result = run_cli("experiment=retinanet_digits", "model.box_loss=iou", cwd=tmp_path)
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if "configuration error" in line]
    assert errors == [
        "normlab: configuration error: model.box_loss='iou' is not one of l1, smooth_l1, giou"
    ]
    assert not (tmp_path / "data").exists()

    result = run_cli(
        "experiment=retinanet_digits",
        "norm=ln",
        "model.weights_backbone=IMAGENET1K_V1",
        cwd=tmp_path,
    )
    assert result.returncode == 2
    assert "norm='ln' cannot take the BatchNorm weights" in result.stderr


def test_manual_optimization_refuses_gradient_clipping_in_one_line(tmp_path):
    result = run_cli("experiment=pix2pix_digits", "trainer.gradient_clip_val=1.0", cwd=tmp_path)
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if "configuration error" in line]
    assert len(errors) == 1 and "trainer.gradient_clip_val=1.0" in errors[0]
    assert "Traceback" not in result.stderr
