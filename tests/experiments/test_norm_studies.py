"""The Fashion-MNIST norm studies' grids and reports, on made-up finished runs: every job the
study trains is tabulated, and each finding's verdict follows the numbers."""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import pytest
from hydra import compose, initialize_config_dir

from experiments.accumulation_vs_batch import run as accumulation_vs_batch
from experiments.lib import study as study_lib
from experiments.lib.study import FASHION_MNIST, DataRecipe, StudyJob
from experiments.norm_vs_batch_size import run as norm_vs_batch_size
from experiments.small_batch_norms import run as small_batch_norms
from normlab.utils.hydra_run import CONFIG_DIR

SEEDS = [42, 1, 2]


def fake_runs(root: Path, jobs: list[StudyJob], error: Callable[[StudyJob], float]) -> None:
    """A finished run per job whose test accuracy is ``1 - error(job) / 100``."""
    for job in jobs:
        run_dir = root / job.name
        (run_dir / "csv").mkdir(parents=True)
        accuracy = 1 - error(job) / 100
        (run_dir / "csv" / "metrics.csv").write_text(
            f"epoch,step,val/acc,test/acc\n0,9,0.5,\n1,19,0.6,\n1,20,,{accuracy}\n"
        )
        (run_dir / "git_sha.txt").write_text("a" * 40 + "\n")
        record = {"seconds": 60.0, "cpu_seconds": 60.0}
        (run_dir / "study_job.json").write_text(json.dumps(record))


def override(job: StudyJob, key: str) -> str:
    return next(o.split("=", 1)[1] for o in job.overrides if o.startswith(key + "="))


def seed_noise(job: StudyJob) -> float:
    return {"42": 0.0, "1": 0.1, "2": -0.1}[override(job, "seed")]


def report(module: ModuleType, recipe: DataRecipe, root: Path, monkeypatch) -> str:
    monkeypatch.setattr(module, "HERE", root)  # plots land there, not in experiments/
    return module.report(recipe, root, SEEDS)


def test_the_study_recipe_is_the_documented_one():
    with initialize_config_dir(str(CONFIG_DIR), version_base=None):
        cfg = compose("config", ["experiment=fashion_norm_study"])
    assert cfg.model.depth == 40 and cfg.model.growth_rate == 12
    assert (cfg.data.image_size, cfg.data.train_subset, cfg.data.augment) == (16, 10000, False)
    assert cfg.trainer.max_epochs == 1
    assert (cfg.task.optimizer.lr, cfg.task.optimizer.nesterov) == (FASHION_MNIST.base_lr, True)
    assert FASHION_MNIST.lr(2) == pytest.approx(0.1 / 16)


def test_norm_vs_batch_size_finds_bn_worse_at_batch_2_and_gn_flat(tmp_path, monkeypatch):
    jobs = norm_vs_batch_size.jobs(FASHION_MNIST, SEEDS)
    # bn and gn at 2, 4, 8, 32; ln and in at 2 and 32; no cuda_bn (on a CPU it is bn).
    assert len(jobs) == (4 + 4 + 2 + 2) * 3
    assert "task.optimizer.lr=0.00625" in jobs[0].overrides  # batch 2: 0.1 · 2/32

    def error(job: StudyJob) -> float:
        norm, batch = override(job, "norm"), int(override(job, "data.batch_size"))
        rise = 8.0 if norm == "bn" and batch == 2 else 0.0
        return 10.0 + rise + seed_noise(job) + (70.0 if norm == "ln" and batch == 32 else 0)

    fake_runs(tmp_path, jobs, error)
    text = report(norm_vs_batch_size, FASHION_MNIST, tmp_path, monkeypatch)
    assert "| bn | 18.0 ± 0.1 | 10.0 ± 0.1 | 10.0 ± 0.1 | 10.0 ± 0.1 |" in text
    assert "| ln | 10.0 ± 0.1 | — | — | 80.0 ± 0.1 |" in text
    assert "| bn | 23.6 → 34.7 % (+11.1) | 10.0 → 18.0 % (+8.0) |" in text
    assert re.search(r"bn 2 − bn 32 = \+8\.0 points.*worse than at 32.*\*\*agrees\*\*", text)
    assert re.search(r"- gn stays flat.*\*\*agrees\*\*", text)
    assert re.search(
        r"- ln stays flat across batches: some seeds did not train at batch 32.*disagrees", text
    )
    assert "cuda_bn" not in text
    assert (tmp_path / "error_vs_batch.png").is_file()


def test_accumulation_vs_batch_gives_bn_its_micro_batch(tmp_path, monkeypatch):
    jobs = accumulation_vs_batch.jobs(FASHION_MNIST, SEEDS)
    assert {job.name.rsplit("_seed", 1)[0] for job in jobs} == {
        "bn_2x16_accumulated",
        "bn_32",
        "syncbn_2x16",
        "gn_2x16_accumulated",
        "gn_32",
    }
    assert next(j for j in jobs if j.name.startswith("syncbn")).processes == 2

    def error(job: StudyJob) -> float:
        accumulated = "trainer.accumulate_grad_batches=16" in job.overrides
        return 10.0 + seed_noise(job) + (5.0 if accumulated and "norm=bn" in job.overrides else 0)

    fake_runs(tmp_path, jobs, error)
    text = report(accumulation_vs_batch, FASHION_MNIST, tmp_path, monkeypatch)
    assert "| bn 2×16 (accumulated) | 2 | 85.0 | 84.9 | 85.1 | **85.0** | 1.0 |" in text
    assert re.search(r"bn 32 − bn 2×16 \(accumulated\) = \+5\.0 points.*\*\*agrees", text)
    assert re.search(r"GN is indifferent.*= \+0\.0 points.*\*\*agrees", text)
    assert (tmp_path / "test_acc.png").is_file()


@pytest.mark.parametrize(
    ("brn_extra_at_2", "brn_claim"),
    [
        (2.0, r"brn at 2 is 6\.0 points better.*75 % of the loss — \*\*agrees"),
        (11.0, r"brn at 2 is 3\.0 points worse than bn at 2 \(noise .*\) — \*\*disagrees"),
    ],
)
def test_small_batch_norms_checks_each_papers_claim(
    tmp_path, monkeypatch, brn_extra_at_2, brn_claim
):
    jobs = small_batch_norms.jobs(FASHION_MNIST, SEEDS)
    assert len(jobs) == (8 * 2 + 1) * 3
    brn = next(j for j in jobs if j.name == "brn_b2_seed42")
    # 10,000 images at 2 per step for 1 epoch: 5,000 steps; warm-up 5 %, ramp 25 %.
    assert {"norm.warmup_steps=250", "norm.ramp_steps=1250"} <= set(brn.overrides)
    ghost = next(j for j in jobs if j.name == "ghost_bn_b32_seed42")
    assert {"norm.virtual_batch_size=4", "data.batch_size=32"} <= set(ghost.overrides)

    def error(job: StudyJob) -> float:
        norm, batch = override(job, "norm"), int(override(job, "data.batch_size"))
        extra = {"bn": 8.0, "brn": brn_extra_at_2}.get(norm, 0.0) if batch == 2 else 0.0
        if norm == "frn" and batch == 32:
            extra = 6.0  # worse than bn at 32 and not flat
        return 10.0 + extra + seed_noise(job)

    fake_runs(tmp_path, jobs, error)
    text = report(small_batch_norms, FASHION_MNIST, tmp_path, monkeypatch)
    assert "| bn | 18.0 ± 0.1 | 10.0 ± 0.1 | +8.0 | 1.00 | 1.00 |" in text
    assert "| ghost_bn (virtual 4) | — | 10.0 ± 0.1 | — | — | 1.00 |" in text
    assert re.search(r"gn: .*\*\*agrees\*\*; gn\+ws: .*\*\*agrees\*\*", text)
    assert re.search(brn_claim, text)
    assert re.search(r"frn: batch 2 − batch 32 = -6\.0 points.*\*\*disagrees\*\*; evonorm_s0", text)
    assert re.search(r"frn at 32 vs bn at 32: \+6\.0 points.*\*\*disagrees", text)
    assert (tmp_path / "error_by_norm.png").is_file()


@pytest.mark.parametrize("study", [small_batch_norms, norm_vs_batch_size, accumulation_vs_batch])
def test_collect_before_the_runs_finish_stops_with_one_line(
    study: ModuleType, tmp_path, monkeypatch
):
    monkeypatch.setattr(study_lib, "study_root", lambda name: tmp_path / name)
    monkeypatch.setattr(sys, "argv", ["run.py", "--collect"])
    with pytest.raises(SystemExit) as stop:
        study.main()
    message = str(stop.value)
    assert "\n" not in message
    assert re.fullmatch(
        rf"--collect: (\d+) of \1 runs have not finished under {re.escape(str(tmp_path))}/\w+ "
        r"\(first: \w+\); run the study without --collect to train them",
        message,
    )
