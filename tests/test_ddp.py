"""Multi-process training through the real command line: two gloo processes on CPU.

Marked ``ddp`` (run by ``make test-ddp``): each case starts two Python processes that import
torch and Lightning, which takes tens of seconds on a 2-core machine.
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest
import torch

from cli import offline_env, python_path_with, run_train

pytestmark = pytest.mark.ddp

# Few, small, deterministic steps: no augmentation, no validation, SGD, no schedule, in float64.
# In float32 this 100-layer network amplifies rounding noise: after 4 SGD steps the first
# convolution's weights of a 2-process GroupNorm run (no synchronisation at all) differ from the
# 1-process run by 9e-6 (1.7 % of their update), and channels_last alone moves its first update by
# 1 % (measured). In float64 the 2-process syncbn run matches to 3e-15, so any synchronisation
# error would stand out.
SHORT = [
    "experiment=densenet_digits",
    "task.channels_last=false",
    "trainer.precision=64-true",
    "data.image_size=16",
    "data.augment=false",
    "trainer.max_steps=4",
    "trainer.limit_val_batches=0",
    "test=false",
    "optimized_metric=null",
    "task/optimizer=sgd",
    "~task/scheduler",
    "logger=csv",
    "callbacks.model_checkpoint.monitor=null",
    "callbacks.model_summary=null",
    "callbacks.progress_bar=null",
    "trainer.enable_progress_bar=false",
]

HELPERS = '''
import json
from pathlib import Path

import lightning.pytorch as pl
import torch

from normlab.callbacks.checkpointing import RunInfo


class RecordConfig(pl.Callback):
    """Each rank writes the config it runs with (from the RunInfo callback) into the run dir."""

    def __init__(self, directory: str) -> None:
        self.directory = directory

    def on_train_start(self, trainer, pl_module):
        info = next(c for c in trainer.callbacks if isinstance(c, RunInfo)).info
        path = Path(self.directory) / f"config_rank{trainer.global_rank}.json"
        path.write_text(json.dumps(info["config"], sort_keys=True))


class RecordAveraged(pl.Callback):
    """Each rank saves the raw and the averaged model (callbacks=ema) it ends training with."""

    def __init__(self, directory: str) -> None:
        self.directory = directory

    def on_train_end(self, trainer, pl_module):
        state = {"raw": pl_module.state_dict(), "ema": pl_module.averaged.state_dict()}
        torch.save(state, Path(self.directory) / f"models_rank{trainer.global_rank}.pt")


class CrashAt(pl.Callback):
    def __init__(self, step: int, rank: int) -> None:
        self.step, self.rank = step, rank

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_rank == self.rank and trainer.global_step >= self.step:
            raise RuntimeError(f"deliberate failure on rank {self.rank}")
'''


def run_cli(*args: str, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """A run in ``cwd``, which also holds the callbacks of HELPERS (see ``helpers``)."""
    env = offline_env(PYTHONPATH=python_path_with(cwd))
    return run_train(*args, cwd=cwd, env=env, timeout=timeout)


@pytest.fixture
def helpers(tmp_path: Path) -> Path:
    (tmp_path / "ddp_test_helpers.py").write_text(HELPERS)
    return tmp_path


def _weights(run_dir: Path) -> dict[str, torch.Tensor]:
    state = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu")["state_dict"]
    return {k: v for k, v in state.items() if v.is_floating_point()}


def _assert_same_float64_weights(one: Path, two: Path) -> dict[str, torch.Tensor]:
    """Every float tensor of run ``two`` equals run ``one``'s to 1e-10, in float64; returns
    ``one``'s."""
    expected, got = _weights(one), _weights(two)
    assert expected.keys() == got.keys()
    for key, value in expected.items():
        assert got[key].dtype == torch.float64, key
        torch.testing.assert_close(got[key], value, rtol=0, atol=1e-10, msg=key)
    return expected


@pytest.mark.parametrize(
    "synchronised",
    [
        ["norm=syncbn"],
        ["norm=bn", "trainer.sync_batchnorm=true"],
        ["norm=cuda_bn", "norm.sync=true"],
        ["norm=cuda_bn", "trainer.sync_batchnorm=true"],
    ],
    ids=["norm=syncbn", "sync_batchnorm=true", "cuda_bn-sync", "cuda_bn-sync_batchnorm"],
)
def test_two_process_syncbn_equals_one_process_bn_on_the_doubled_batch(helpers, synchronised):
    one = run_cli(*SHORT, "norm=bn", "data.batch_size=16", "hydra.run.dir=one", cwd=helpers)
    assert one.returncode == 0, one.stderr[-3000:]
    two = run_cli(
        *SHORT,
        "trainer=ddp_cpu",
        *synchronised,
        "data.global_batch_size=16",
        "imports=[ddp_test_helpers]",
        "+callbacks.record={_target_:ddp_test_helpers.RecordConfig,directory:two}",
        "hydra.run.dir=two",
        cwd=helpers,
    )
    assert two.returncode == 0, two.stderr[-3000:]

    expected = _assert_same_float64_weights(helpers / "one", helpers / "two")
    moved = 0
    for key, value in expected.items():
        moved += key.endswith("running_mean") and bool(value.abs().sum() > 0)
    assert moved > 10  # the runs did train (running statistics moved from zero)
    state = torch.load(helpers / "two" / "checkpoints" / "last.ckpt", map_location="cpu")
    assert state["global_step"] == 4

    # One run dir, written by rank 0 only, and the same resolved config on both ranks.
    assert sorted(p.name for p in helpers.iterdir() if p.is_dir() and p.name != "__pycache__") == [
        "one",
        "two",
    ]
    configs = [json.loads((helpers / "two" / f"config_rank{r}.json").read_text()) for r in (0, 1)]
    assert configs[0] == configs[1]
    assert configs[0]["data"]["batch_size"] == 8  # 16 over two processes
    assert (helpers / "two" / "config_resolved.yaml").is_file()


def test_precise_bn_of_two_syncbn_processes_equals_one_process_on_the_doubled_batch(
    tmp_path: Path,
):
    precise = ["callbacks=precise_bn", "callbacks.precise_bn.num_batches=3"]
    one = run_cli(
        *SHORT, *precise, "norm=bn", "data.batch_size=16", "hydra.run.dir=one", cwd=tmp_path
    )
    assert one.returncode == 0, one.stderr[-3000:]
    two = run_cli(
        *SHORT,
        *precise,
        "trainer=ddp_cpu",
        "norm=syncbn",
        "data.global_batch_size=16",
        "hydra.run.dir=two",
        cwd=tmp_path,
    )
    assert two.returncode == 0, two.stderr[-3000:]
    for run in ("one", "two"):  # recomputed at the end of the (only, validation-free) epoch
        log = (tmp_path / run / "train.log").read_text()
        assert log.count("precise BN: 99 norm layers from 3 batches") == 1, run
    _assert_same_float64_weights(tmp_path / "one", tmp_path / "two")


def test_two_process_syncbn_retinanet_equals_one_process_bn_on_the_doubled_batch(tmp_path: Path):
    """The detection path under DDP (per-image loss normalisation, box targets split across
    ranks, FPN and GN heads) computes what one process computes on the whole batch; the
    retinanet_norms study leans on this to call a syncbn/bn gap trajectory noise."""
    detection = [
        "experiment=retinanet_digits",
        "trainer.precision=64-true",
        "trainer.max_steps=3",
        "trainer.limit_val_batches=0",
        "test=false",
        "optimized_metric=null",
        "logger=csv",
        "callbacks.model_checkpoint.monitor=null",
        "callbacks.model_summary=null",
        "callbacks.progress_bar=null",
        "trainer.enable_progress_bar=false",
    ]
    one = run_cli(*detection, "norm=bn", "data.batch_size=8", "hydra.run.dir=one", cwd=tmp_path)
    assert one.returncode == 0, one.stderr[-3000:]
    two = run_cli(
        *detection,
        "trainer=ddp_cpu",
        "norm=syncbn",
        "data.global_batch_size=8",
        "hydra.run.dir=two",
        cwd=tmp_path,
    )
    assert two.returncode == 0, two.stderr[-3000:]
    _assert_same_float64_weights(tmp_path / "one", tmp_path / "two")
    for run in ("one", "two"):
        assert torch.load(tmp_path / run / "checkpoints" / "last.ckpt")["global_step"] == 3


@pytest.mark.parametrize("norm_buffers", ["average", "recompute"])
def test_every_rank_holds_the_same_averaged_model(helpers: Path, norm_buffers: str):
    """With bn, whose running statistics differ between the processes, the averaged model is
    still the same on both: rank 0's averaged statistics, or those PreciseBN merges."""
    two = run_cli(
        *SHORT,
        "trainer=ddp_cpu",
        "norm=bn",
        "data.global_batch_size=16",
        "callbacks=ema",
        f"ema.norm_buffers={norm_buffers}",
        "ema.recompute_images=32",
        "ema.decay=0.5",
        "+callbacks.record={_target_:ddp_test_helpers.RecordAveraged,directory:two}",
        "hydra.run.dir=two",
        cwd=helpers,
    )
    assert two.returncode == 0, two.stderr[-3000:]
    ranks = [torch.load(helpers / "two" / f"models_rank{r}.pt") for r in (0, 1)]
    raw, averaged = [r["raw"] for r in ranks], [r["ema"] for r in ranks]
    assert raw[0].keys() == averaged[0].keys() == averaged[1].keys()
    statistics = [k for k in raw[0] if k.endswith("running_mean")]
    # What the test can tell apart: the processes' own statistics differ, and the average is not
    # the raw model.
    assert any(not torch.equal(raw[0][k], raw[1][k]) for k in statistics)
    assert any(not torch.equal(averaged[0][k], raw[0][k]) for k in averaged[0])
    different = [k for k in averaged[0] if not torch.equal(averaged[0][k], averaged[1][k])]
    assert not different, different[:3]
    log = (helpers / "two" / "train.log").read_text()
    if norm_buffers == "average":
        assert "the averaged model takes rank 0's norm statistics" in log
    else:
        assert "ema: recomputed the averaged model's statistics of 99 norm layers" in log


def test_global_batch_size_must_divide_by_the_processes(tmp_path: Path):
    result = run_cli(*SHORT, "trainer=ddp_cpu", "data.global_batch_size=15", cwd=tmp_path)
    assert result.returncode == 2
    assert (
        "data.global_batch_size=15 does not divide by the 2 processes of this run" in result.stderr
    )


@pytest.mark.parametrize("rank", [1, 0])
def test_a_crashing_rank_ends_the_whole_run_quickly(helpers: Path, rank: int):
    start = time.perf_counter()
    result = run_cli(
        *SHORT,
        "trainer=ddp_cpu",
        "norm=syncbn",
        "trainer.max_steps=50",
        "imports=[ddp_test_helpers]",
        f"+callbacks.crash={{_target_:ddp_test_helpers.CrashAt,step:2,rank:{rank}}}",
        cwd=helpers,
        timeout=120,
    )
    elapsed = time.perf_counter() - start
    assert result.returncode != 0
    assert elapsed < 60, elapsed
    assert "deliberate failure" in result.stderr
