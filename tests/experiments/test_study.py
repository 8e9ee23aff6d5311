"""The study runner behind experiments/: runs what is missing, resumes, fails loudly, tabulates."""

from __future__ import annotations

import json
import threading
import time

import pytest
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf

from experiments.lib.jobs import (
    Configuration,
    StudyJob,
    configuration_jobs,
    job_finished,
    job_identity,
    run_evaluations,
    run_study,
    saved_overrides,
    slug,
)
from experiments.lib.results import (
    RunTable,
    results_table,
    study_code_line,
    study_time_line,
    write_runs_csv,
)

QUICK = ("model=densenet_bc_40", "data.image_size=16", "debug=fdr")


def table_of(root, jobs) -> RunTable:
    """The study's runs.csv, written from the run dirs under ``root`` and read back."""
    write_runs_csv(root / "runs.csv", root, jobs)
    return RunTable.read(root / "runs.csv")


@pytest.mark.slow
def test_runs_missing_jobs_once_and_resumes(tmp_path):
    jobs = [
        StudyJob("bn", "densenet_digits", (*QUICK, "norm=bn")),
        StudyJob("gn", "densenet_digits", (*QUICK, "norm=gn")),
    ]
    (tmp_path / "gn").mkdir()  # a run dir without the finished marker: an interrupted job
    run_study(jobs, tmp_path, cores=2)
    assert job_finished(tmp_path / "bn") and job_finished(tmp_path / "gn")
    assert (tmp_path / "gn" / "config_resolved.yaml").is_file()

    # Every job ran in this call. (debug=fdr logs no metrics: their rows hold time and code.)
    assert "the whole study took" in study_time_line(table_of(tmp_path, jobs))

    marker = (tmp_path / "bn" / "study_job.json").stat().st_mtime_ns
    run_study(jobs, tmp_path, cores=2)  # nothing left to do: nothing is rerun
    assert (tmp_path / "bn" / "study_job.json").stat().st_mtime_ns == marker
    assert "the whole study took" in study_time_line(table_of(tmp_path, jobs))


@pytest.mark.slow
def test_a_failing_job_names_its_log(tmp_path):
    with pytest.raises(RuntimeError, match=r"nope.*exit 2.*stdout\.log"):
        run_study(
            [StudyJob("nope", "densenet_digits", (*QUICK, "norm.num_groups=7", "norm=gn"))],
            tmp_path,
        )
    assert not job_finished(tmp_path / "nope")
    assert "configuration error" in (tmp_path / "nope" / "stdout.log").read_text()


# A stand-in for a study's evaluate.py: records its run dir's name and thread count, or fails.
EVALUATION_MODULE = """
import json, os, sys
from pathlib import Path
run_dir = Path(sys.argv[1])
if run_dir.name.startswith("broken"):
    sys.exit("cannot measure " + run_dir.name)
metrics = {"name": run_dir.name, "threads": os.environ["OMP_NUM_THREADS"]}
(run_dir / "study_metrics.json").write_text(json.dumps(metrics))
"""


def test_run_evaluations_measures_what_is_missing_and_names_the_log_of_a_failure(
    tmp_path, monkeypatch
):
    (tmp_path / "fake_evaluation.py").write_text(EVALUATION_MODULE)
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    root = tmp_path / "runs"
    jobs = [StudyJob(name, "densenet_digits", ()) for name in ("a", "b", "done")]
    for job in jobs:
        (root / job.name).mkdir(parents=True)
    (root / "done" / "study_metrics.json").write_text('{"kept": 1}')
    run_evaluations(jobs, root, "fake_evaluation", cores=2)
    for name in ("a", "b"):
        measured = json.loads((root / name / "study_metrics.json").read_text())
        assert measured == {"name": name, "threads": "1"}
    assert json.loads((root / "done" / "study_metrics.json").read_text()) == {"kept": 1}

    (root / "broken").mkdir()
    broken = StudyJob("broken", "densenet_digits", ())
    with pytest.raises(
        RuntimeError, match=r"evaluating broken failed \(exit 1\).*study_evaluation\.log"
    ):
        run_evaluations([*jobs, broken], root, "fake_evaluation")
    assert "cannot measure broken" in (root / "broken" / "study_evaluation.log").read_text()
    assert not (root / "broken" / "study_metrics.json").exists()


def test_collect_and_tabulate_per_seed_results(tmp_path):
    configurations = {"bn 2×2 (DDP)": Configuration(("norm=bn",)), "gn": Configuration(())}
    jobs = configuration_jobs("densenet_digits", configurations, [1, 2])
    assert [job.name for job in jobs] == [
        "bn_2x2_DDP_seed1",
        "gn_seed1",
        "bn_2x2_DDP_seed2",
        "gn_seed2",
    ]
    assert jobs[2].overrides == ("norm=bn", "seed=2")
    accuracies = {
        "bn_2x2_DDP_seed1": 0.5,
        "gn_seed1": 0.9,
        "bn_2x2_DDP_seed2": 0.7,
        "gn_seed2": 0.9,
    }
    for name, accuracy in accuracies.items():
        finished_job(tmp_path, name, "a" * 40)
        (tmp_path / name / "csv" / "metrics.csv").write_text(
            f"epoch,step,val/acc,test/acc\n0,9,0.1,\n1,19,0.2,\n2,20,,{accuracy}\n"
        )
    table = table_of(tmp_path, jobs)
    assert table.seeds == [1, 2]
    assert table.rows[2]["norm"] == "bn" and table.rows[2]["seed"] == "2"
    values = {name: table.cell(slug(name), "test/acc") for name in configurations}
    assert {name: cell.values for name, cell in values.items()} == {
        "bn 2×2 (DDP)": (0.5, 0.7),
        "gn": (0.9, 0.9),
    }
    assert (values["bn 2×2 (DDP)"].mean, values["bn 2×2 (DDP)"].std) == pytest.approx(
        (0.6, 0.1414213)
    )
    assert table.curves("gn", "val/acc") == [[(1, 0.1), (2, 0.2)]] * 2
    rows = results_table(values, digits=2)
    assert rows[2] == "| bn 2×2 (DDP) | 0.50 | 0.70 | 2 | **0.60 ± 0.14** |"
    assert slug("ln (ConvNeXt's)") == "ln_ConvNeXt_s"


def finished_job(root, name, sha, seconds=60.0):
    (root / name / "csv").mkdir(parents=True)
    (root / name / "csv" / "metrics.csv").write_text("epoch,step,test/acc\n0,9,0.5\n")
    (root / name / "git_sha.txt").write_text(sha + "\n")
    record = {"seconds": seconds, "cpu_seconds": seconds}
    (root / name / "study_job.json").write_text(json.dumps(record))


def test_study_lines_say_which_code_trained_the_runs_and_how_long_they_took(tmp_path):
    jobs = [StudyJob(name, "densenet_digits", ()) for name in ("a", "b", "c")]
    clean, other = "0123456789abcdef" * 2 + "01234567", "fedcba9876543210" * 2 + "76543210"
    for job in jobs:
        finished_job(tmp_path, job.name, clean)
    assert study_code_line(table_of(tmp_path, jobs)) == "Code: commit 0123456"
    assert study_time_line(table_of(tmp_path, jobs)) == (
        "3 runs, 3 run-minutes of wall time, 3 CPU-minutes (≈ 2 min on 2 idle cores)"
    )

    (tmp_path / "b" / "git_sha.txt").write_text(other + "-dirty\n")
    (tmp_path / "c" / "git_sha.txt").unlink()
    assert study_code_line(table_of(tmp_path, jobs)) == (
        "Code: commit 0123456 (1 runs), commit fedcba9 with uncommitted changes (1 runs), "
        "an unknown commit (1 runs)"
    )


def test_only_a_study_trained_in_one_call_reports_its_whole_wall_time(tmp_path, monkeypatch):
    def pretend_to_train(job, run_dir, threads):
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "study_job.json").write_text('{"seconds": 1.0}')
        return 1.0

    monkeypatch.setattr("experiments.lib.jobs._run_job", pretend_to_train)
    jobs = [StudyJob(name, "densenet_digits", ()) for name in ("a", "b")]
    run_study(jobs, tmp_path / "fresh", cores=2)
    assert "the whole study took 0 min of wall time in one go" in study_time_line(
        table_of(tmp_path / "fresh", jobs)
    )

    finished_job(tmp_path / "resumed", "a", "0" * 40)
    (tmp_path / "resumed" / "b").mkdir()
    (tmp_path / "resumed" / "study_timing.json").write_text('{"seconds": 5, "runs": 2}')
    run_study(jobs, tmp_path / "resumed", cores=2)  # runs only b: the study's time is unknown
    assert not (tmp_path / "resumed" / "study_timing.json").exists()


def test_jobs_start_in_order_and_never_oversubscribe_the_cores(tmp_path, monkeypatch):
    started, in_use, peak = [], [0], [0]
    lock = threading.Lock()

    def pretend_to_train(job, run_dir, threads):
        with lock:
            started.append(job.name)
            in_use[0] += job.processes
            peak[0] = max(peak[0], in_use[0])
        time.sleep(0.05 * job.processes)
        with lock:
            in_use[0] -= job.processes
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "study_job.json").write_text('{"seconds": 1.0}')
        return 1.0

    monkeypatch.setattr("experiments.lib.jobs._run_job", pretend_to_train)
    # The 2-process jobs come after 1-process ones, which used to let later 1-process jobs take
    # every freed core first while a 2-process job waited.
    sizes = {"a": 1, "b": 2, "c": 1, "d": 1, "e": 2, "f": 1}
    jobs = [StudyJob(name, "densenet_digits", (), processes) for name, processes in sizes.items()]
    run_study(jobs, tmp_path, cores=2)
    assert started == list(sizes)
    assert peak[0] == 2


def test_saved_overrides_come_back_as_the_arguments_that_were_passed(tmp_path):
    """A rerun (experiments/*/run.py) passes a run's saved overrides to training again: quotes,
    spaces, colons and interpolations must survive the round trip through overrides.yaml."""
    passed = [
        "data.root='/a b'",
        '+x="it\'s: y"',
        "a.b=c: d",
        "tags=[a,'b c']",
        "model.name=${oc.env:HOME}",
        "task.optimizer.lr=1e-3",
    ]
    (tmp_path / ".hydra").mkdir()
    # Written as Hydra writes it (hydra.core.utils._save_config: OmegaConf.to_yaml of the list).
    (tmp_path / ".hydra" / "overrides.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(passed)))

    again = saved_overrides(tmp_path)

    assert again == passed
    parser = OverridesParser.create()
    parsed = [(o.key_or_group, o.value()) for o in parser.parse_overrides(again)]
    assert parsed[0] == ("data.root", "/a b")
    assert parsed[1] == ("x", "it's: y")
    assert parsed[2] == ("a.b", "c: d")
    assert parsed == [(o.key_or_group, o.value()) for o in parser.parse_overrides(passed)]


def test_identical_finished_runs_of_other_studies_are_copied_not_trained(
    tmp_path, monkeypatch, capsys
):
    commit = "c" * 40
    monkeypatch.setattr("experiments.lib.jobs.git_sha", lambda directory=None: commit)
    trained = []

    def pretend_to_train(job, run_dir, threads):
        trained.append(job.name)
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "study_job.json").write_text('{"seconds": 60.0}')
        return 60.0

    monkeypatch.setattr("experiments.lib.jobs._run_job", pretend_to_train)
    studies = tmp_path / "studies"
    same = StudyJob("bn_b2_seed1", "fashion_norm_study", ("norm=bn", "data.batch_size=2", "seed=1"))
    # The same run under another name and with its overrides in another order: a twin.
    twin = StudyJob("bn_2", "fashion_norm_study", ("seed=1", "data.batch_size=2", "norm=bn"))
    other_commit = StudyJob("gn_b2_seed1", "fashion_norm_study", ("norm=gn", "seed=1"))
    other_overrides = StudyJob("gn_b32_seed1", "fashion_norm_study", ("norm=gn", "seed=2"))
    for job, sha in ((twin, commit), (other_commit, "d" * 40), (other_overrides, commit)):
        finished_job(studies / "other", job.name, sha)
        record = {"seconds": 120.0, "identity": job_identity(job)}
        (studies / "other" / job.name / "study_job.json").write_text(json.dumps(record))
    (studies / "other" / "bn_2" / "marker.txt").write_text("trained by the other study")
    other_seed = StudyJob("gn_b32_seed1", "fashion_norm_study", ("norm=gn", "seed=1"))
    jobs = [same, StudyJob("gn_b2_seed1", "fashion_norm_study", ("norm=gn", "seed=1")), other_seed]

    run_study(jobs, studies / "mine", cores=2, reuse_from=studies)
    assert trained == ["gn_b2_seed1", "gn_b32_seed1"]  # a twin from another commit is not one
    copied = studies / "mine" / "bn_b2_seed1"
    assert (copied / "marker.txt").read_text() == "trained by the other study"
    assert json.loads((copied / "study_job.json").read_text())["reused_from"] == str(
        studies / "other" / "bn_2"
    )
    assert study_time_line(table_of(studies / "mine", jobs)) == (
        "3 runs, 4 run-minutes of wall time; 1 of the runs (2 run-minutes) are copies of "
        "identical runs of another study; the whole study took 0 min of wall time in one go "
        "(training the others)"
    )

    # Uncommitted code: nothing is reused, since what trained the twin cannot be told apart.
    monkeypatch.setattr("experiments.lib.jobs.git_sha", lambda directory=None: commit + "-dirty")
    trained.clear()
    capsys.readouterr()
    run_study([same], studies / "dirty", cores=2, reuse_from=studies)
    assert trained == ["bn_b2_seed1"]
    assert "Not reusing other studies' runs" in capsys.readouterr().out
