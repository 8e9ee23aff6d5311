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
from experiments.bf16_vs_fp32 import run as bf16_vs_fp32
from experiments.lib import command_line
from experiments.lib.jobs import StudyJob, job_identity
from experiments.lib.recipes import FASHION_MNIST, SMALL_DENSENET_DIGITS, DataRecipe
from experiments.lib.results import RunTable, write_runs_csv
from experiments.norm_vs_batch_size import run as norm_vs_batch_size
from experiments.population_statistics import run as population_statistics
from experiments.small_batch_norms import run as small_batch_norms
from experiments.syncbn_small_batch import run as syncbn_small_batch
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


def report(module: ModuleType, recipe: DataRecipe, root: Path, jobs: list[StudyJob]) -> str:
    """The study's report from the runs.csv its finished runs under ``root`` make; plots land
    in ``root`` too, not in experiments/."""
    write_runs_csv(root / "runs.csv", root, jobs)
    return module.report(recipe, RunTable.read(root / "runs.csv"), root)


def test_the_study_recipe_is_the_documented_one():
    with initialize_config_dir(str(CONFIG_DIR), version_base=None):
        cfg = compose("config", ["experiment=fashion_norm_study"])
    assert cfg.model.depth == 40 and cfg.model.growth_rate == 12
    assert (cfg.data.image_size, cfg.data.train_subset, cfg.data.augment) == (16, 10000, False)
    assert cfg.trainer.max_epochs == 1
    assert (cfg.task.optimizer.lr, cfg.task.optimizer.nesterov) == (0.1, True)
    assert FASHION_MNIST.lr(2) == pytest.approx(0.1 / 16)


def test_norm_vs_batch_size_finds_bn_worse_at_batch_2_and_gn_flat(tmp_path):
    jobs = norm_vs_batch_size.jobs(FASHION_MNIST, SEEDS)
    # bn and gn at 2, 4, 8, 32; ln and in at 2 and 32; ghost_bn virtual 2 and 8 inside 32; no
    # cuda_bn (on a CPU it is bn).
    assert len(jobs) == (4 + 4 + 2 + 2 + 1 + 1) * 3
    assert "task.optimizer.lr=0.00625" in jobs[0].overrides  # batch 2: 0.1 · 2/32
    ghost = next(job for job in jobs if job.name == "ghost_bn_v2_b32_seed42")
    assert {"norm=ghost_bn", "norm.virtual_batch_size=2", "data.batch_size=32"} <= set(
        ghost.overrides
    )

    def error(job: StudyJob) -> float:
        norm, batch = override(job, "norm"), int(override(job, "data.batch_size"))
        rise = 8.0 if norm == "bn" and batch == 2 else 0.0
        rise += 5.0 if norm == "gn" and batch == 8 else 0.0  # gn not flat at 8
        rise += 5.0 if "norm.virtual_batch_size=2" in job.overrides else 0.0
        return 10.0 + rise + seed_noise(job) + (70.0 if norm == "ln" and batch == 32 else 0)

    fake_runs(tmp_path, jobs, error)
    text = report(norm_vs_batch_size, FASHION_MNIST, tmp_path, jobs)
    assert "| bn | 18.0 ± 0.1 | 10.0 ± 0.1 | 10.0 ± 0.1 | 10.0 ± 0.1 |" in text
    assert "| ln | 10.0 ± 0.1 | — | — | 80.0 ± 0.1 |" in text
    assert "| ghost_bn v2 | — | — | — | 15.0 ± 0.1 |" in text
    assert "| bn | 23.6 → 34.7 % (+11.1) | 10.0 → 18.0 % (+8.0) |" in text
    # Std 0.1 in every cell, n = 3: Welch's df = 4, the interval ±2.776 · sqrt(2 · 0.01 / 3).
    assert "bn 2 − bn 32 = +8.0 [95 % CI +7.8, +8.2] — **agrees**" in text
    assert "gn 2 − gn 32 = +0.0 [95 % CI -0.2, +0.2] — **agrees**" in text
    assert "gn 8 − gn 32 = +5.0 [95 % CI +4.8, +5.2] — **disagrees**" in text  # margin ±2
    assert "ghost_bn v2 32 − bn 32 = +5.0 [95 % CI +4.8, +5.2] — **agrees**" in text
    assert "ln stays flat" not in text and "ln 2 − ln 32" not in text  # no paper claims it
    assert "cuda_bn" not in text
    assert "Per-run values: `runs.csv`" in text
    assert (tmp_path / "error_vs_batch.png").is_file()


def test_accumulation_vs_batch_gives_bn_its_micro_batch(tmp_path):
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
        if "norm=syncbn" in job.overrides:  # seeds far apart: nothing can be decided
            return 10.0 + {"42": 0.0, "1": 3.0, "2": -3.0}[override(job, "seed")]
        return 10.0 + seed_noise(job) + (5.0 if accumulated and "norm=bn" in job.overrides else 0)

    fake_runs(tmp_path, jobs, error)
    text = report(accumulation_vs_batch, FASHION_MNIST, tmp_path, jobs)
    assert "| bn 2×16 (accumulated) | 2 | 15.0 | 15.1 | 14.9 | **15.0 ± 0.1** | 1.0 |" in text
    assert "bn 2×16 (accumulated) − bn 32 = +5.0 [95 % CI +4.8, +5.2] — **agrees**" in text
    assert "gn 2×16 (accumulated) − gn 32 = +0.0 [95 % CI -0.2, +0.2] — **agrees**" in text
    # std 3 against 0.1: Welch's df ≈ 2.004, so about ±4.30 · sqrt(9/3 + 0.01/3) = ±7.4.
    assert "syncbn 2×16 − bn 32 = +0.0 [95 % CI -7.4, +7.4] — **inconclusive**" in text
    assert (tmp_path / "test_error.png").is_file()


@pytest.mark.parametrize(
    ("brn_extra_at_2", "brn_claim"),
    [
        (2.0, "brn at 2 − bn at 2 = -6.0 [95 % CI -6.2, -5.8] — **agrees** (the gain is 75 % of"),
        (11.0, "brn at 2 − bn at 2 = +3.0 [95 % CI +2.8, +3.2] — **disagrees**"),
    ],
    # The ids from when the expected claims were regular expressions: the collected test list
    # stays the same.
    ids=[
        r"2.0-brn at 2 is 6\.0 points better.*75 % of the loss — \*\*agrees",
        r"11.0-brn at 2 is 3\.0 points worse than bn at 2 \(noise .*\) — \*\*disagrees",
    ],
)
def test_small_batch_norms_checks_each_papers_claim(tmp_path, brn_extra_at_2, brn_claim):
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
            extra = 6.0  # worse than bn at 32, and better at batch 2 than at 32
        return 10.0 + extra + seed_noise(job)

    fake_runs(tmp_path, jobs, error)
    text = report(small_batch_norms, FASHION_MNIST, tmp_path, jobs)
    assert "| bn | 18.0 ± 0.1 | 10.0 ± 0.1 | +8.0 | 1.00 | 1.00 |" in text
    assert "| ghost_bn (virtual 4) | — | 10.0 ± 0.1 | — | — | 1.00 |" in text
    assert re.search(r"gn: .*\*\*agrees\*\*; gn\+ws: .*\*\*agrees\*\*", text)
    assert brn_claim in text
    # Better at batch 2 is "not worse at small batch", as the FRN paper claims it.
    assert "frn: batch 2 − batch 32 = -6.0 [95 % CI -6.2, -5.8] — **agrees**; evonorm_s0" in text
    assert "frn at 32 − bn at 32 = +6.0 [95 % CI +5.8, +6.2] — **disagrees**" in text
    assert "ghost_bn (virtual 4) at 32 − bn at 32 = +0.0 [95 % CI -0.2, +0.2] — **agrees**" in text
    assert (tmp_path / "error_by_norm.png").is_file()


def test_a_study_of_one_seed_decides_nothing(tmp_path):
    jobs = small_batch_norms.jobs(FASHION_MNIST, [42])
    fake_runs(tmp_path, jobs, lambda job: 30.0 if "norm=bn" in job.overrides else 10.0)
    text = report(small_batch_norms, FASHION_MNIST, tmp_path, jobs)
    findings = [line for line in text.splitlines() if line.startswith("- **")]
    assert len(findings) == 5
    assert all("(no CI: n = 1) — **inconclusive**" in line for line in findings)
    assert "**agrees**" not in text and "**disagrees**" not in text


def test_bf16_vs_fp32_trains_small_batch_norms_fp32_runs_and_judges_each_cell(tmp_path):
    jobs = bf16_vs_fp32.jobs(FASHION_MNIST, SEEDS)
    assert len(jobs) == 4 * 2 * 2 * 3
    bf16 = [job for job in jobs if "trainer.precision=bf16-mixed" in job.overrides]
    fp32 = [job for job in jobs if job not in bf16]
    assert len(bf16) == len(fp32) == 24
    # Each fp32 run is one of small_batch_norms' (so it is copied, not trained, at one commit).
    twins = {tuple(job_identity(job)) for job in small_batch_norms.jobs(FASHION_MNIST, SEEDS)}
    assert all(tuple(job_identity(job)) in twins for job in fp32)
    assert not any(tuple(job_identity(job)) in twins for job in bf16)

    def error(job: StudyJob) -> float:
        norm, batch = override(job, "norm"), int(override(job, "data.batch_size"))
        if job in bf16 and norm == "frn" and batch == 2:
            return 15.0 + seed_noise(job)  # bf16 costs frn 5 points at batch 2
        if job in bf16 and norm == "gn" and batch == 32:  # 1 point, and seeds far apart
            return 11.0 + {"42": 0.0, "1": 3.0, "2": -3.0}[override(job, "seed")]
        return 10.0 + seed_noise(job)

    fake_runs(tmp_path, jobs, error)
    text = report(bf16_vs_fp32, FASHION_MNIST, tmp_path, jobs)
    assert "| bn | 2 | 10.0 ± 0.1 | 10.0 ± 0.1 | +0.0 [95 % CI -0.2, +0.2] | no | 1.00 |" in text
    assert (
        "| frn | 2 | 10.0 ± 0.1 | 15.0 ± 0.1 | +5.0 [95 % CI +4.8, +5.2] | yes (higher) |" in text
    )
    assert "| gn | 32 | 10.0 ± 0.1 | 11.0 ± 3.0 | +1.0 [95 % CI -6.4, +8.4] | no |" in text
    assert "bn at 2: +0.0 [95 % CI -0.2, +0.2] — **agrees**" in text
    assert "frn at 2: +5.0 [95 % CI +4.8, +5.2] — **disagrees**" in text
    assert "gn at 32: +1.0 [95 % CI -6.4, +8.4] — **inconclusive**" in text
    assert text.count("— **agrees**") == 6
    assert (tmp_path / "error_by_precision.png").is_file()


@pytest.mark.parametrize(
    "study",
    [
        small_batch_norms,
        norm_vs_batch_size,
        accumulation_vs_batch,
        bf16_vs_fp32,
        syncbn_small_batch,
        population_statistics,
    ],
)
def test_collect_before_the_runs_finish_stops_with_one_line(
    study: ModuleType, tmp_path, monkeypatch
):
    monkeypatch.setattr(command_line, "study_root", lambda name: tmp_path / name)
    monkeypatch.setattr(command_line, "study_dir", lambda name: tmp_path / "experiments" / name)
    monkeypatch.setattr(sys, "argv", ["run.py", "--collect"])
    with pytest.raises(SystemExit) as stop:
        study.main()
    message = str(stop.value)
    assert "\n" not in message
    assert re.fullmatch(
        rf"--collect: (\d+) of \1 runs have not finished under {re.escape(str(tmp_path))}/\w+ "
        rf"\(first: \w+\) and {re.escape(str(tmp_path))}/experiments/\w+/runs\.csv does not "
        r"list them all; run the study without --collect to train them",
        message,
    )


def test_collect_renders_the_report_from_runs_csv_alone(tmp_path, monkeypatch):
    """A committed runs.csv is enough: no run dir is needed to re-render results.md."""
    jobs = accumulation_vs_batch.jobs(FASHION_MNIST, SEEDS)
    fake_runs(tmp_path / "runs", jobs, lambda job: 12.0 + seed_noise(job))
    here = tmp_path / "experiments" / "accumulation_vs_batch"
    here.mkdir(parents=True)
    write_runs_csv(here / "runs.csv", tmp_path / "runs", jobs)
    monkeypatch.setattr(command_line, "study_root", lambda name: tmp_path / "no runs" / name)
    monkeypatch.setattr(command_line, "study_dir", lambda name: tmp_path / "experiments" / name)
    monkeypatch.setattr(sys, "argv", ["run.py", "--collect"])
    accumulation_vs_batch.main()
    text = (here / "results.md").read_text()
    assert "| gn 32 | 1 | 12.0 | 12.1 | 11.9 | **12.0 ± 0.1** | 1.0 |" in text
    assert (here / "test_error.png").is_file()


# Each study recipe that moved from an override tuple in run.py into conf/experiment/: its yaml,
# and the earlier command line.
MOVED_RECIPES = {
    "densenet_digits_study": "experiment=densenet_digits model=densenet_bc_40 data.image_size=16 "
    "trainer.max_epochs=5 task.optimizer.lr=0.01",
    "convnext_digits_study": "experiment=convnext_digits trainer.max_epochs=5",
    "pix2pix_digits_study": "experiment=pix2pix_digits data.num_train=300 task.n_epochs=2 "
    "task.n_epochs_decay=2 trainer.max_epochs=4 task.test_mode=train",
    "retinanet_digits_study": "experiment=retinanet_digits trainer.max_epochs=6 "
    "data.canvas_size=64 data.digit_size=[10,24] model.anchor_sizes=[8,16,32,64,128] "
    "model.min_size=64 model.max_size=64",
}


@pytest.mark.parametrize("experiment", MOVED_RECIPES)
def test_the_digits_versions_train_what_their_committed_results_came_from(experiment):
    """The recipes moved from override tuples into conf/experiment/*.yaml: each composes to the
    config the earlier command line gave (results_digits.md and the others stay producible)."""
    with initialize_config_dir(str(CONFIG_DIR), version_base=None):
        now = compose("config", [f"experiment={experiment}", "norm=gn", "seed=1"])
        then = compose("config", [*MOVED_RECIPES[experiment].split(), "norm=gn", "seed=1"])
    now.experiment_name = then.experiment_name  # names the run dir only
    assert now == then
    assert SMALL_DENSENET_DIGITS.lr(2) == pytest.approx(0.01 * 2 / 32)


def test_population_statistics_measures_each_trained_run_and_judges_wu_and_johnson(tmp_path):
    jobs = population_statistics.jobs(FASHION_MNIST, SEEDS)
    # bn at 4 batches, bn with 2 more momenta at 2 and 32, gn and frn at 2 and 32; 3 seeds.
    assert len(jobs) == (4 + 4 + 4) * 3
    assert all("callbacks=ema" in job.overrides for job in jobs)
    slow = next(j for j in jobs if j.name == "bn_b2_m0.001_seed42")
    assert {"norm.momentum=0.001", "data.batch_size=2", "task.optimizer.lr=0.00625"} <= set(
        slow.overrides
    )

    def test_error(job: StudyJob) -> float:
        batch = int(override(job, "data.batch_size"))
        return 10.0 + (2.0 if batch == 2 else 0.0) + seed_noise(job)

    fake_runs(tmp_path, jobs, test_error)
    for job in jobs:
        run_dir = tmp_path / job.name
        error, batch = test_error(job), int(override(job, "data.batch_size"))
        metrics = run_dir / "csv" / "metrics.csv"
        # The averaged weights: 0.5 points better than the raw ones.
        metrics.write_text(
            metrics.read_text().replace("test/acc\n", "test/acc,test/acc_ema\n").rstrip("\n")
            + f",{1 - (error - 0.5) / 100}\n"
        )
        measured = {"population": error}
        if override(job, "norm") == "bn":
            # Mini-batch statistics beat the population ones by 3 points at batch 2, 0.5 at 32.
            gap = {2: 3.0, 8: 1.0, 32: 0.5, 128: 0.5}[batch]
            measured |= {
                "batch_test": error - gap,
                "batch_train": error - gap - 1.0,
                "precise_100": error + 4.0,
                "precise_1000": error - 0.2,
                "precise_10000": error - 0.2,
                "ema_copy": error,
                "ema_recompute": error - 0.5,
            }
        (run_dir / "study_metrics.json").write_text(json.dumps(measured))
    text = report(population_statistics, FASHION_MNIST, tmp_path, jobs)
    assert "| PreciseBN (10,000 images) | 11.8 ± 0.1 | 9.8 ± 0.1 |" in text
    assert "| population − mini-batch, test | +3.0 ± 0.0 | +1.0 ± 0.0 | +0.5 ± 0.0 |" in text
    assert (
        "at 2: PreciseBN 10,000 − EMA 0.1 = -0.2 [95 % CI -0.4, +0.0] — **agrees**, "
        "PreciseBN 10,000 − EMA 0.01 = -0.2"
    ) in text
    assert "at 32: PreciseBN 1,000 − 10,000 = +0.0 [95 % CI -0.2, +0.2] — **agrees**" in text
    assert (
        "gap at 2 − gap at 32 = +2.5" in text
        and "— **inconclusive**" not in text.split("gap at 2 − gap at 32")[1].split("\n")[0]
    )
    assert "| bn | 2 | 12.0 ± 0.1 | 11.5 ± 0.1 | 12.0 ± 0.1 | 11.5 ± 0.1 | -0.5" in text
    assert "| gn | 32 | 10.0 ± 0.1 | 9.5 ± 0.1 | — | — | -0.5" in text
    for figure in ("population_statistics.png", "inconsistency.png", "weight_ema.png"):
        assert (tmp_path / figure).is_file()
