"""cuda_bn's kernels compiled ahead of time for sm_80 and sm_90, over the whole matrix: registers,
spills and shared memory per kernel specialisation. No GPU needed.

    make test-aot          # or: TRITON_INTERPRET=0 python -m experiments.bench.cuda_bn_aot

Matrix (normlab.ops.batchnorm.aot.full_configs): the issue's shapes, NCHW and channels_last, fp32
and fp16/bf16 input (fp32 or half parameters), every activation, affine or not; training forward,
backward and eval forward; and bf16 layers synchronised over 2, 8 and 32 processes. Each distinct
specialisation is compiled once per target and listed with the first layer that needed it.
Writes cuda_bn_aot.md next to this file; exits 1 if anything spilled.
"""

from __future__ import annotations

import sys
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

from experiments.lib.benchmark import machine_load, write_report
from normlab.callbacks.progress import time_left
from normlab.ops.batchnorm.aot import TARGETS, compile_all, full_configs

HERE = Path(__file__).resolve().parent
COMMAND = "make test-aot"
DESCRIPTION = (
    "Launches recorded from the real host code under each target's tile plan (4 programs per SM, "
    "2,048-element tiles), specialised as Triton's launcher specialises them, compiled with "
    "Triton's bundled ptxas: registers, spill stores + loads and stack frame from `ptxas -v`, "
    "shared memory from Triton's metadata. No GPU involved; run times are not measured here."
)


def progress_printer(started: float, every_s: float = 60.0) -> Callable[[int, int], None]:
    """``compile_all``'s ``on_layer``: a ``[k/N]`` line with the time left, at most once every
    ``every_s`` seconds (and at the end): the whole matrix takes about an hour."""
    last = started

    def report(done: int, total: int) -> None:
        nonlocal last
        now = time.perf_counter()
        if now - last >= every_s or done == total:
            last = now
            left = time_left(done, total, now - started)
            print(f"[{done}/{total}] layer configurations x targets compiled, {left}", flush=True)

    return report


def main() -> int:
    started, load_before = time.perf_counter(), machine_load()
    configs = full_configs()
    rows = [c for c, _ in compile_all(configs, on_layer=progress_printer(started))]
    minutes = (time.perf_counter() - started) / 60
    spilling = [c for c in rows if c.spills or c.stack]
    most: dict[tuple[str, int], int] = defaultdict(int)
    shared: dict[tuple[str, int], int] = defaultdict(int)
    for c in rows:
        most[c.kernel, c.arch] = max(most[c.kernel, c.arch], c.registers)
        shared[c.kernel, c.arch] = max(shared[c.kernel, c.arch], c.shared)
    summary = [
        "| kernel | target | specialisations | most registers/thread | most shared (bytes) |",
        "|---|---|---:|---:|---:|",
    ]
    for kernel, arch in sorted(most):
        count = sum(c.kernel == kernel and c.arch == arch for c in rows)
        summary.append(
            f"| {kernel} | sm_{arch} | {count} | {most[kernel, arch]} | {shared[kernel, arch]} |"
        )
    table = [
        "| kernel | first config | target | constexprs | registers | spills (bytes) | stack | "
        "shared (bytes) |",
        "|---|---|---|---|---:|---:|---:|---:|",
    ]
    for c in rows:
        table.append(
            f"| {c.kernel} | {c.config} | sm_{c.arch} | {c.constexprs} | {c.registers} | "
            f"{c.spills} | {c.stack} | {c.shared} |"
        )
    targets = ", ".join(f"sm_{arch} (plan of {sms} SMs)" for arch, sms in TARGETS.items())
    verdict = (
        f"**{len(rows)} specialisations compiled, {len(spilling)} spilling** "
        f"({len(configs)} layer configurations; targets {targets}; {minutes:.1f} min)."
    )
    print(
        write_report(
            HERE / "cuda_bn_aot.md",
            "cuda_bn kernels compiled ahead of time for sm_80 and sm_90",
            COMMAND,
            DESCRIPTION,
            verdict,
            "\n".join(summary),
            "\n".join(table),
            load_before=load_before,
        )[:3000]
    )
    return 1 if spilling else 0


if __name__ == "__main__":
    sys.exit(main())
