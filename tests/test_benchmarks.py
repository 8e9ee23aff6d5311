"""Every benchmark script runs once at a tiny size, so none of them can rot unnoticed."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from normlab.utils.benchmark import Timing, compare, markdown_table

BENCH = Path(__file__).resolve().parents[1] / "experiments" / "bench"


def _run(script: str, *args: str, interpret: bool) -> str:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    result = subprocess.run(
        [sys.executable, str(BENCH / script), *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_compare_alternates_and_reports_ratios_to_the_baseline():
    calls: list[str] = []
    timings = compare(
        {"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, repeats=3, warmup=1
    )
    assert calls == ["a", "b", "a", "b", "b", "a", "a", "b"]  # warm-up, then rotating rounds
    assert [t.name for t in timings] == ["a", "b"] and all(len(t.seconds) == 3 for t in timings)
    table = markdown_table([Timing("a", [1.0, 2.0, 4.0]), Timing("b", [2.0, 2.0, 2.0])])
    assert "| a | 1000.00 | 2000.00 | 4000.00 | 1.000 |" in table
    assert "| b | 2000.00 | 2000.00 | 2000.00 | 1.000 |" in table  # median of 2, 1, 0.5
    with pytest.raises(ValueError, match="repeats and inner must be ≥ 1"):
        compare({"a": lambda: None}, repeats=0)


def test_cuda_bn_cpu_benchmark_without_the_interpreter(tmp_path):
    """Also proves that normlab's kernels import on a machine without a GPU or the interpreter."""
    out = tmp_path / "cpu.md"
    _run("cuda_bn_cpu.py", "--repeats", "1", "--inner", "1", "--batch-size", "4",
         "--out", str(out), interpret=False)  # fmt: skip
    report = out.read_text()
    assert "| cuda_bn |" in report and "cuda_bn / bn = " in report


def test_bn_gpu_benchmark_smoke_run_on_cpu(tmp_path):
    out = tmp_path / "gpu.md"
    _run("bn_gpu.py", "--device", "cpu", "--tiny", "--repeats", "1", "--inner", "1",
         "--warmup", "0", "--out", str(out), interpret=True)  # fmt: skip
    report = out.read_text()
    # 1 shape × 2 layouts × 2 dtypes × 3 passes × (plain, with ReLU)
    assert report.count("| 2×3×5×7 |") == 24
    assert "cuda_bn(relu)" in report and "Native backend chosen by torch" in report
