"""Shared fixtures: compose the real Hydra config in-process and run it in a temporary dir.

tests/ mirrors src/normlab/ (tests/norm/, tests/models/, ...); the entry points' tests and the
project-wide ones sit at the top. No folder is a package: pytest puts this file's folder on
sys.path, so every test imports the shared helpers here by bare name (cli, data_files), and
test file names stay unique across folders; offline wandb runs are read back with
normlab.collect.wandb_runs."""

from __future__ import annotations

import os

# cuda_bn's Triton kernels run on CPU tensors in Triton's interpreter; it must be chosen before
# the kernels are defined, i.e. before normlab is imported. `make test-gpu` sets it to 0.
os.environ.setdefault("TRITON_INTERPRET", "1")

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict

from normlab.utils.dependency_warnings import quiet_dependency_warnings
from normlab.utils.hydra_run import CONFIG_DIR, register_resolvers

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
register_resolvers()
quiet_dependency_warnings()
# Test tensors are tiny: intra-op threads only add overhead, and when anything else runs on the
# two cores, oversubscribed thread pools make single tests ten times slower.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def hydra_config_restored():
    """Each test leaves Hydra's HydraConfig singleton as it found it. Composing a run's config sets
    it, as a run does (compose_config, tiny_runs.compose_run); left in place, a later test in the
    same worker would run "inside" that job: an Optuna search's, say, whose sweep dir no longer
    resolves once the config lost its hydra node (tests/test_sweep_jobs.py failed so)."""
    previous = HydraConfig.instance().cfg
    yield
    HydraConfig.instance().cfg = previous


@pytest.fixture
def compose_config(tmp_path: Path) -> Callable[..., DictConfig]:
    """``compose_config(*overrides, config_name="config", run="run")``: the config a CLI run
    would get, writing to ``tmp_path / run``."""

    def _compose(*overrides: str, config_name: str = "config", run: str = "run") -> DictConfig:
        GlobalHydra.instance().clear()
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
            cfg = compose(config_name, overrides=list(overrides), return_hydra_config=True)
        output_dir = tmp_path / run
        with open_dict(cfg):
            cfg.hydra.runtime.output_dir = str(output_dir)
            cfg.hydra.runtime.cwd = str(tmp_path)
            cfg.paths.output_dir = str(output_dir)
        HydraConfig.instance().set_config(cfg)
        # A real Hydra run hands the task the config without its `hydra` node.
        with open_dict(cfg):
            del cfg["hydra"]
        return cfg

    yield _compose
    GlobalHydra.instance().clear()


@pytest.fixture
def fast() -> list[str]:
    """Overrides for tests of the wiring rather than the model: small batches, quiet output."""
    return [
        "data.batch_size=8",
        "logger=csv",
        "callbacks.model_summary=null",
        "callbacks.progress_bar=null",
    ]
