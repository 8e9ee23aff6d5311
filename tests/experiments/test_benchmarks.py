"""Every benchmark script runs once at a tiny size, so none of them can rot unnoticed."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from cli import run_module
from experiments.lib.benchmark import Timing, compare, markdown_table, round_order
from experiments.lib.jobs import REPO_ROOT


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


def test_rounds_of_many_candidates_change_each_candidates_neighbours():
    names = [f"c{i}" for i in range(12)]
    orders = [round_order(names, index) for index in range(7)]
    assert all(sorted(order) == sorted(names) for order in orders)
    assert orders == [round_order(names, index) for index in range(7)]  # seeded: reproducible
    for name in names[1:]:  # whoever ran just before each candidate, over the rounds
        before = {order[order.index(name) - 1] for order in orders if order[0] != name}
        assert len(before) >= 3, (name, before)


# Slow: a minute of CPU (every benchmark, every norm in both memory formats) that checks the scripts
# run, not a result; `make test-slow` runs it, and the benchmarks' own make targets run them all.
@pytest.mark.slow
def test_every_benchmark_runs_at_a_tiny_size(tmp_path):
    """`run.py --smoke`: each benchmark once, in one process (Triton's interpreter for bn_gpu)."""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    result = run_module("experiments.bench.run", "--smoke", "--out-dir", str(tmp_path), env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    reports = {path.stem: path.read_text() for path in tmp_path.glob("*.md")}
    expected = {
        "framework_overhead": "Lightning / bare = ",
        "cuda_bn_cpu": "cuda_bn / bn = ",
        "densenet_memory": "| memory_efficient=True |",
        "retinanet_inference": "normlab / torchvision throughput = ",
        "data_loading": "| digit_pairs | pix2pix_digits |",
        "norm_cost": "| cuda_bn |",
        "bn_gpu": "| 2×3×5×7 | channels_last | bf16 | forward+backward |",
        "training_throughput": "| pix2pix_digits |",
        "precision": "| pix2pix_digits |",
        "compile": "| densenet | bn | true |",
    }
    assert reports.keys() == expected.keys()
    for name, marker in expected.items():
        assert marker in reports[name], (name, reports[name])
        assert (
            "Machine: " in reports[name]
            and "Command: `python -m experiments.bench." in reports[name]
            and "Code: commit " in reports[name]
            and "Machine load (1-minute load average" in reports[name]
        )
    # 1 shape × 2 layouts × 2 dtypes × 3 passes × (plain, with ReLU)
    assert reports["bn_gpu"].count("| 2×3×5×7 |") == 24
    old_norms = ("bn", "syncbn", "cuda_bn", "ln", "gn", "in", "frozen_bn", "none")
    small_batch_norms = ("brn", "ghost_bn", "frn", "evonorm_b0", "evonorm_s0", "rms")
    for norm in (*old_norms, *small_batch_norms):  # one row per memory format
        assert reports["norm_cost"].count(f"\n| {norm} | ") == 2, norm
    assert "## NCHW input" in reports["norm_cost"]
    assert "## channels_last input" in reports["norm_cost"]


def test_precision_bench_times_both_precisions_at_a_tiny_size(tmp_path):
    """pix2pix at a tiny size (the other families take 2-4× as long): a step at 32-true and at
    bf16-mixed, in a table that names the commit, the torch build and the CPU's bf16 support."""
    from experiments.bench import precision

    report = precision.main([*precision.SMOKE, "--out", str(tmp_path / "precision.md")])
    assert (tmp_path / "precision.md").read_text() == report + "\n"
    for line in ("Code: commit ", "torch ", "oneDNN bf16 supported: "):
        assert line in report, line
    (row,) = [line for line in report.splitlines() if line.startswith("| pix2pix_digits |")]
    _, batch, fp32_ms, bf16_ms, ratio, verdict, _ = (cell.strip() for cell in row.split("|")[1:])
    assert batch == "2" and float(fp32_ms) > 0 and float(bf16_ms) > 0 and float(ratio) > 0
    assert verdict == precision.verdict(float(ratio))


def test_precision_verdict_calls_ratios_within_the_noise_no_difference():
    from experiments.bench.precision import verdict

    assert verdict(0.5) == "bf16-mixed is faster (2.00× the steps per second)"
    assert verdict(1.04) == verdict(0.96) == "no difference beyond the noise (±5%)"
    assert verdict(1.25) == "bf16-mixed is slower (1.25× the time per step)"


def test_kernels_import_without_a_gpu_or_the_interpreter():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = "from normlab.ops.batchnorm import kernels; assert not kernels.INTERPRETED"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr[-3000:]


BENCH = REPO_ROOT / "experiments" / "bench"
NUMBER = re.compile(r"\d[\d,]*(?:\.\d+)?")


def committed_tables() -> dict[str, str]:
    return {path.name: path.read_text() for path in BENCH.glob("*.md") if path.name != "README.md"}


def test_every_committed_table_names_its_commit_torch_build_and_machine():
    tables = committed_tables()
    assert len(tables) >= 7
    for name, text in tables.items():
        head = text[:2000]
        assert re.search(r"Code: commit [0-9a-f]{7,40}\b", head), name
        assert re.search(r"torch \d+\.\d+\.\d+\S*", head), name
        assert re.search(r"Machine: \d+ CPU cores", head), name


def _quoting_blocks(readme: str) -> list[tuple[str, list[str]]]:
    """README's table rows (their 'measured' cell) and bullets that link a table here, each with
    the tables it links."""
    blocks: list[str] = []
    for line in readme.splitlines():
        if line.startswith(("|", "- ")) or not line.strip() or not blocks:
            blocks.append(line)
        else:  # a bullet's continuation line
            blocks[-1] += " " + line.strip()
    quoting = []
    for block in blocks:
        cited = re.findall(r"\]\(([\w]+\.md)\)", block)
        if not cited:
            continue
        text = block.split("|")[4] if block.startswith("|") else block
        quoting.append((re.sub(r"\[[^]]*\]\([^)]*\)", "", text), cited))
    return quoting


def test_bench_readme_quotes_only_numbers_that_its_tables_print():
    tables = committed_tables()
    quoting = _quoting_blocks((BENCH / "README.md").read_text())
    assert len(quoting) >= 6
    for text, cited in quoting:
        printed = " ".join(tables[name] for name in cited)
        for number in NUMBER.findall(text):
            assert number in printed or number.replace(",", "") in printed, (number, cited, text)
