"""experiments/bench/compile.py: its break-even arithmetic and verdicts, and a tiny run end to end."""

from __future__ import annotations

import math

import pytest

from experiments.bench import compile as compile_bench
from experiments.bench.compile import Measurement, table, verdict


def _measurement(norm: str, regional: bool, eager: float, compiled: float, warmup: float):
    return Measurement("densenet", norm, regional, eager, compiled, warmup, 3, run_steps=100)


def test_break_even_is_the_warm_up_over_the_time_saved_per_step():
    pays = _measurement("bn", False, eager=0.10, compiled=0.04, warmup=3.0)
    assert pays.break_even == 50 and pays.pays
    late = _measurement("gn", False, eager=0.10, compiled=0.09, warmup=3.0)
    assert late.break_even == 300 and not late.pays
    slower = _measurement("ln", True, eager=0.10, compiled=0.12, warmup=1.0)
    assert math.isinf(slower.break_even) and not slower.pays
    rows = table([pays, late, slower]).splitlines()
    assert rows[2] == "| densenet | bn | false | 3 | 100.0 | 40.0 | 0.40 | 3.0 | 50 | 100 |"
    assert rows[4].endswith("| 1.0 | never | 100 |")
    sentence = verdict("densenet", [pays, late, slower])
    assert "(100 training steps per run)" in sentence
    assert sentence.endswith("pays for bn; not for gn, ln regional.")
    assert verdict("densenet", [late]).endswith("pays for none of its runs on this machine.")


@pytest.mark.slow
def test_a_tiny_compile_bench_writes_its_table(tmp_path):
    """One family, one norm, both compile_regional values, each in a fresh process (inductor's
    warm-up: tens of seconds on 2 cores)."""
    out = tmp_path / "compile.md"
    report = compile_bench.main([*compile_bench.SMOKE, "--out", str(out)])
    assert out.read_text() == report + "\n"
    assert "Code: commit " in report and "Machine: " in report
    rows = [line for line in report.splitlines() if line.startswith("| densenet | bn |")]
    assert [row.split(" | ")[2] for row in rows] == ["false", "true"]
    for row in rows:
        graphs = int(row.split(" | ")[3])
        assert graphs >= 1
    assert "**DenseNet-BC-40, digits 16 px, batch 32**" in report


def test_a_failed_measurement_is_reported_by_the_line_that_names_its_error():
    stderr = "Traceback (most recent call last):\n  File x\nRuntimeError: inductor broke\n  hint\n"
    assert compile_bench._error_line(stderr) == "RuntimeError: inductor broke"
    assert compile_bench._error_line("just this\n\n") == "just this"
    assert compile_bench._error_line("") == "(no output)"
