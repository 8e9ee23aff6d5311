"""`make help` is the map of what a user can do: every documented target is there, described."""

from __future__ import annotations

import subprocess

from cli import REPO_ROOT

STUDIES = [
    "norm_vs_batch_size",
    "syncbn_small_batch",
    "convnext_bn_vs_ln",
    "retinanet_norms",
    "pix2pix_bn_vs_in",
    "accumulation_vs_batch",
    "bf16_vs_fp32",
]
TARGETS = [
    "install",
    "train",
    "test",
    "test-slow",
    "test-ddp",
    "test-gpu",
    "test-aot",
    "data-fashion-mnist",
    "lint",
    "format",
    "sweep-norms",
    "sweep-optuna",
    "sweep-slurm",
    "slurm-local",
    "slurm-down",
    "test-slurm",
    "bench",
    "clean",
    "clean-logs",
    *(f"study-{study.replace('_', '-')}" for study in STUDIES),
]


def test_help_lists_every_target_with_a_description():
    result = subprocess.run(
        ["make", "help"], cwd=REPO_ROOT, capture_output=True, text=True, check=True
    )
    described = {}
    for line in result.stdout.splitlines():
        target, _, description = line.partition(" ")
        described[target] = description.strip()
    missing = [target for target in TARGETS if not described.get(target)]
    assert not missing, f"make help lacks {missing}"


def test_every_study_target_has_its_script():
    for study in STUDIES:
        assert (REPO_ROOT / "experiments" / study / "run.py").is_file(), study
