"""``python -m normlab.collect``: run dirs, multirun dirs and offline wandb runs tabulated with the
one statistical rule; failed and unfinished runs listed; bad input one line."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import pytest
import wandb
import yaml

from cli import offline_env, run_module, run_train
from normlab.collect.__main__ import main
from normlab.collect.wandb_runs import read_offline_run

BN = [0.90, 0.92, 0.94]
GN = [0.85, 0.87, 0.89]
# Both cells have std 0.02 and n = 3: Welch's df = 4, the interval
# −0.05 ± 2.776445 · sqrt(2 · 0.02² / 3) = −0.05 ± 0.0453392.
GN_VS_BN = "-0.0500 [95 % CI -0.0953, -0.0047]"


def fake_job(job_dir: Path, norm: str, seed: int, accuracy: float | None, status: str | None):
    """A run dir as normlab.train leaves it: config, metrics, and a multirun job's outcome."""
    (job_dir / ".hydra").mkdir(parents=True)
    config = {"norm": {"name": norm}, "data": {"batch_size": 8}, "seed": seed, "test": True}
    (job_dir / ".hydra" / "config.yaml").write_text(yaml.safe_dump(config))
    if accuracy is not None:
        (job_dir / "config_resolved.yaml").write_text(yaml.safe_dump(config))
        (job_dir / "csv").mkdir()
        (job_dir / "csv" / "metrics.csv").write_text(
            f"epoch,step,val/acc,test/acc,test/loss\n0,4,0.5,,\n0,5,,{accuracy},0.3\n"
        )
    if status is not None:
        error = "configuration error: norm.num_groups=7" if status == "failed" else None
        outcome = {"job": 0, "status": status, "error": error}
        (job_dir / "job_outcome.json").write_text(json.dumps(outcome))


@pytest.fixture
def sweep(tmp_path: Path) -> Path:
    """An Optuna-style multirun (trial_<n> job dirs): 3 seeds of bn and gn, one failed job and
    one still running."""
    root = tmp_path / "multirun"
    root.mkdir()
    (root / "multirun.yaml").write_text("hydra: {}\n")
    jobs = [("bn", s, a) for s, a in enumerate(BN)] + [("gn", s, a) for s, a in enumerate(GN)]
    for number, (norm, seed, accuracy) in enumerate(jobs):
        fake_job(root / f"trial_{number}", norm, seed, accuracy, "completed")
    fake_job(root / "trial_6", "gn", 9, None, "failed")
    fake_job(root / "trial_7", "gn", 10, None, None)
    # What the Slurm launcher (submitit) keeps beside the job dirs: logs, no runs.
    (root / ".submitit" / "1234_0").mkdir(parents=True)
    (root / ".submitit" / "1234_0" / "1234_0_log.out").write_text("Job completed successfully\n")
    return root


def test_a_multirun_becomes_a_table_with_intervals_and_lists_what_is_missing(
    sweep, tmp_path, capsys
):
    main(
        [
            str(sweep),
            "--by",
            "norm.name",
            "--baseline",
            "norm.name=bn",
            "--csv",
            str(tmp_path / "t.csv"),
        ]
    )
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "| norm.name | n | test/acc mean ± std | − bn [95 % CI] | vs bn |"
    assert lines[2] == "| bn | 3 | 0.9200 ± 0.0200 | — | — |"
    assert lines[3] == f"| gn | 3 | 0.8700 ± 0.0200 | {GN_VS_BN} | lower |"
    assert lines[5] == "Not in the table (2 of 8 runs):"
    assert lines[6] == f"- failed: {sweep / 'trial_6'}: configuration error: norm.num_groups=7"
    assert lines[7] == f"- unfinished: {sweep / 'trial_7'}"
    rows = (tmp_path / "t.csv").read_text().splitlines()
    assert rows[0] == "norm.name,n,test/acc mean,test/acc std,difference,ci_low,ci_high,verdict"
    low, high = (float(v) for v in rows[2].split(",")[5:7])
    assert (low, high) == pytest.approx((-0.05 - 0.0453392, -0.05 + 0.0453392), abs=1e-6)


def test_an_equivalence_margin_and_single_run_dirs(sweep, capsys, tmp_path):
    main([str(sweep), "--by", "norm.name", "--baseline", "norm.name=bn", "--margin", "0.2"])
    assert f"| gn | 3 | 0.8700 ± 0.0200 | {GN_VS_BN} | agrees |" in capsys.readouterr().out
    main([str(sweep), "--by", "norm.name", "--baseline", "norm.name=bn", "--margin", "0.01"])
    assert f"| gn | 3 | 0.8700 ± 0.0200 | {GN_VS_BN} | inconclusive |" in capsys.readouterr().out
    main([str(sweep), "--by", "norm.name", "--baseline", "norm.name=bn", "--margin", "0.004"])
    assert f"| gn | 3 | 0.8700 ± 0.0200 | {GN_VS_BN} | disagrees |" in capsys.readouterr().out
    # Two single run dirs (no job outcome): a run that tested is complete; n = 1 decides nothing.
    fake_job(tmp_path / "run_a", "bn", 1, 0.9, None)
    fake_job(tmp_path / "run_b", "gn", 1, 0.8, None)
    main(
        [
            str(tmp_path / "run_a"),
            str(tmp_path / "run_b"),
            "--by",
            "norm.name,data.batch_size",
            "--baseline",
            "norm.name=bn",
            "--plot",
            str(tmp_path / "plot.png"),
        ]
    )
    out = capsys.readouterr().out
    assert "| gn | 8 | 1 | 0.8000 | -0.1000 (no CI: n = 1) | inconclusive (n < 2) |" in out
    assert (tmp_path / "plot.png").stat().st_size > 0


@pytest.mark.parametrize(
    ("arguments", "line"),
    [
        (["{sweep}/nope", "--by", "norm.name"], "{sweep}/nope: no such file or directory"),
        (["{empty}", "--by", "norm.name"], "{empty}: no runs there (looked for Hydra run dirs"),
        (
            ["{sweep}", "--by", "norm.nam"],
            "--by norm.nam: no run has this config key; did you mean norm.name?",
        ),
        (
            ["{sweep}", "--by", "norm.name", "--metric", "val/map"],
            "--metric val/map: no run logged it; the runs logged: test/acc, test/loss, val/acc",
        ),
        (
            ["{sweep}", "--by", "norm.name", "--baseline", "seed=1"],
            "--baseline 'seed=1': expected KEY=VALUE with KEY one of --by's keys",
        ),
        (
            ["{sweep}", "--by", "norm.name", "--baseline", "norm.name=ln"],
            "--baseline norm.name=ln: no completed run has it; norm.name is one of bn, gn",
        ),
    ],
)
def test_bad_input_is_one_line(sweep, tmp_path, capsys, arguments, line):
    (tmp_path / "empty").mkdir()
    places = {"sweep": sweep, "empty": tmp_path / "empty"}
    with pytest.raises(SystemExit) as stop:
        main([a.format(**places) for a in arguments])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert err.startswith("normlab: configuration error: " + line.format(**places))


def test_offline_wandb_runs(tmp_path, capsys):
    for norm, accuracy in (("bn", 0.9), ("bn", 0.94), ("gn", 0.8)):
        run = wandb.init(
            project="normlab-test",
            dir=tmp_path,
            mode="offline",
            config={"norm": {"name": norm}, "seed": 1},
        )
        run.log({"test/acc": accuracy})
        run.finish()
        # wandb may still be writing the log after finish() returns: until its exit record is
        # there, the run counts as unfinished.
        assert read_offline_run(Path(run.dir).parent, wait=60).complete
    main([str(tmp_path / "wandb"), "--by", "norm.name"])
    out = capsys.readouterr().out
    assert "| bn | 2 | 0.9200 ± 0.0283 |" in out
    assert "| gn | 1 | 0.8000 |" in out
    # A run whose log stops short (still running, or killed) is listed, not counted.
    log = sorted((tmp_path / "wandb").rglob("run-*.wandb"))[-1]
    log.write_bytes(log.read_bytes()[: len(log.read_bytes()) // 2])
    main([str(tmp_path / "wandb"), "--by", "norm.name"])
    out = capsys.readouterr().out
    assert f"- unfinished: {log.parent}" in out
    assert "Not in the table (1 of 3 runs):" in out


# A 2 × 2 × 2 grid of the smallest complete runs: two training batches, one validation and two
# test batches each.
TINY_GRID = shlex.split(
    "experiment=densenet_digits model=densenet_bc_40 data.image_size=16 logger=csv "
    "trainer.max_epochs=1 trainer.limit_train_batches=2 trainer.limit_val_batches=1 "
    "trainer.limit_test_batches=2 norm=bn,gn data.batch_size=8,16 seed=1,2"
)


@pytest.mark.slow
def test_a_real_two_by_two_by_two_multirun(tmp_path):
    sweep_dir = tmp_path / "sweep"
    result = run_train("-m", *TINY_GRID, f"hydra.sweep.dir={sweep_dir}", env=offline_env())
    assert result.returncode == 0, result.stderr[-2000:]
    table = run_module(
        "normlab.collect",
        str(sweep_dir),
        "--by",
        "norm.name,data.batch_size",
        "--baseline",
        "norm.name=bn",
        "--metric",
        "test/loss",
    )
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    assert len(lines) == 6 and "Not in the table" not in table.stdout
    assert [line.split(" | ")[:3] for line in lines[2:]] == [
        ["| bn", "8", "2"],
        ["| bn", "16", "2"],
        ["| gn", "8", "2"],
        ["| gn", "16", "2"],
    ]
    assert all("[95 % CI " in line for line in lines[4:])
