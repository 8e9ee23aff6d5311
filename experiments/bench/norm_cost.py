"""Norm cost table: forward+backward of every registry norm on one tensor, relative to bn.

    python -m experiments.bench.norm_cost                         # part of `make bench`

Each norm is built from the registry with its default arguments (``conf/norm/*.yaml`` defaults;
ghost_bn with a virtual batch of a quarter of the batch, so that it splits the batch) and runs
in training mode on a 32×256×28×28 float32 tensor (the size of a ResNet stage-2 feature map at
batch 32): forward, then backward of a fixed upstream gradient. Every norm runs on that tensor
in both memory formats (NCHW-contiguous and channels_last; a norm's cost can differ by 2×
between them), and all of them alternate in every round. One table per format, each relative to
bn in that format, and bn's channels_last time relative to its NCHW time. A last column gives
the bytes each norm keeps for its backward pass relative to bn's (the activation memory a norm
costs a network). The report names the commit and the machine's load while it ran. Writes
norm_cost.md next to this file.

The measurement runs ``--runs`` times (default 10), each in a fresh process: on this shared
2-vCPU VM a ratio moves more between processes than between the rounds of one. Each ratio is
given per run and as the mean with its 95 % interval, and "at most 2× bn" is judged by
normlab's one rule (``normlab.collect.comparison``): yes, no or inconclusive.

``ln`` is timm's LayerNorm2d: it permutes to channels-last, calls F.layer_norm and permutes back.
The table also times the other way to write it, ``ln (reduce dim 1)``: mean and variance over the
channel dimension in place, no permute. ``ln`` keeps whichever is faster in each format; the two
agree to float32 rounding (checked here before timing).

``<norm> compiled`` rows (``--compiled``; by default the small-batch norms): the same layer under
``torch.compile(fullgraph=True)`` (inductor's fused C++ loops, compiled and warmed up before the
timing), the fastest code for its formula measured on this machine. An eager path that misses
2× bn is judged against it: where the compiled layer misses too, that is the measured floor.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from experiments.lib.benchmark import Timing, compare, machine_load, write_report
from experiments.lib.jobs import REPO_ROOT
from normlab.collect.comparison import (
    Cell,
    Claim,
    Verdict,
    difference,
    direction_words,
    level,
)
from normlab.norm import NORMS, build_norm

HERE = Path(__file__).resolve().parent
# Arguments of the tiny run in `make test` (tests/experiments/test_benchmarks.py).
SMOKE = ["--shape", "2", "8", "4", "4", "--repeats", "1", "--inner", "1", "--runs", "2"]
SMOKE += ["--compiled", "frn"]
# Norms also timed compiled by default: those whose eager path is normlab's own composition.
COMPILED = ["brn", "evonorm_b0", "evonorm_s0", "frn", "ghost_bn", "rms"]
COMPILED_SUFFIX = " compiled"
# The line the tables judge: every norm at most this many times bn's time, or a measured floor.
LIMIT = 2.0


MEMORY_FORMATS = {"NCHW": torch.contiguous_format, "channels_last": torch.channels_last}


REDUCED_LN = "ln (reduce dim 1)"


class ChannelReducedLayerNorm(nn.Module):
    """Channels-first LayerNorm written as a reduction over dim 1 (no permute): the alternative
    ``ln`` implementation the table compares with timm's."""

    def __init__(self, num_features: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        var, mean = torch.var_mean(x, dim=1, correction=0, keepdim=True)
        scale = self.weight[:, None, None] * torch.rsqrt(var + self.eps)
        return (x - mean) * scale + self.bias[:, None, None]


def build(name: str, shape: torch.Size) -> nn.Module:
    if name.endswith(COMPILED_SUFFIX):
        layer = build(name.removesuffix(COMPILED_SUFFIX), shape)
        return torch.compile(layer, fullgraph=True, dynamic=False)
    if name == REDUCED_LN:
        return ChannelReducedLayerNorm(shape[1], eps=build_norm("ln", shape[1]).eps)
    spec = {"name": name}
    if name == "ghost_bn":  # its default (32 samples) would be one chunk, that is bn, at batch 32
        spec["virtual_batch_size"] = max(1, shape[0] // 4)
    return build_norm(spec, shape[1])


def forward_backward(name: str, x: torch.Tensor, grad: torch.Tensor):
    layer = build(name, x.shape).train()
    x = x.detach().requires_grad_(True)

    def call() -> None:
        # frozen_bn and none have no parameters: the input gradient keeps backward honest.
        torch.autograd.grad(layer(x), x, grad)

    if name.endswith(COMPILED_SUFFIX):
        call()  # compiles: not part of the timing
    return call


def saved_bytes(name: str, x: torch.Tensor) -> int:
    """Bytes a forward keeps for its backward: the unique storages autograd saves (the input
    counts once however many times it is saved; a fresh activation counts in full)."""
    layer = build(name, x.shape).train()
    storages: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        layer(x.detach().requires_grad_(True))
    return sum(storages.values())


def one_run(args: argparse.Namespace) -> dict[str, dict[str, list[float]]]:
    """Seconds per call of every candidate, one entry per round, by memory format: one
    process's measurement (all candidates alternate in every round)."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(args.shape, generator=generator)
    grad = torch.randn(args.shape, generator=generator)
    compiled = [f"{name}{COMPILED_SUFFIX}" for name in args.compiled]
    with torch.no_grad():  # the two ln implementations compute the same thing
        reference, reduced = build("ln", x.shape), build(REDUCED_LN, x.shape)
        torch.testing.assert_close(reduced(x), reference(x), atol=1e-5, rtol=1e-5)
    candidates = {
        (name, layout): forward_backward(
            name, x.contiguous(memory_format=fmt), grad.contiguous(memory_format=fmt)
        )
        for layout, fmt in MEMORY_FORMATS.items()
        for name in [*eager_names(), *compiled]
    }
    timings = compare(
        {f"{name} ({layout})": call for (name, layout), call in candidates.items()},
        repeats=args.repeats,
        inner=args.inner,
    )
    rounds: dict[str, dict[str, list[float]]] = {layout: {} for layout in MEMORY_FORMATS}
    for (name, layout), timing in zip(candidates, timings, strict=True):
        rounds[layout][name] = timing.seconds
    return rounds


def eager_names() -> list[str]:
    return ["bn", *sorted(name for name in NORMS if name != "bn"), REDUCED_LN]


def runs_in_fresh_processes(child_argv: list[str], runs: int) -> list[dict]:
    """:func:`one_run` in ``runs`` processes one after another. The spread that matters on a
    shared VM is between processes (where the allocator and the scheduler put each one), not
    between the rounds of one: two single runs minutes apart moved ratios by up to ~70 %."""
    measured = []
    with tempfile.TemporaryDirectory() as scratch:
        for index in range(runs):
            path = Path(scratch) / f"run{index}.json"
            start = time.perf_counter()
            command = [sys.executable, "-m", __spec__.name, *child_argv, "--one-run", str(path)]
            done = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True)
            if done.returncode != 0:
                tail = (done.stderr.strip().splitlines() or ["(no output)"])[-1]
                raise SystemExit(f"norm_cost: run {index + 1} of {runs} failed: {tail}")
            measured.append(json.loads(path.read_text()))
            print(
                f"norm_cost: run {index + 1} of {runs}: {time.perf_counter() - start:.0f} s",
                file=sys.stderr,
                flush=True,
            )
    return measured


def run_ratios(runs: list[dict], layout: str, name: str) -> Cell:
    """One value per run: the median over its rounds of ``name``'s time / bn's in that round."""
    return Cell(
        tuple(
            Timing(name, run[layout][name]).ratio_to(Timing("bn", run[layout]["bn"]))
            for run in runs
        )
    )


def within_limit(ratios: Cell) -> Verdict:
    """The studies' rule on "at most LIMIT× bn": the mean ratio's whole 95 % interval."""
    return Claim.at_most(LIMIT).judge(level(ratios))


VERDICT_WORDS = {
    Verdict.AGREES: "yes",
    Verdict.DISAGREES: "no",
    Verdict.INCONCLUSIVE: "inconclusive",
}


def ratio_text(ratios: Cell) -> str:
    if ratios.n < 2:
        return f"{ratios.mean:.3f} (n = 1, no interval)"
    found = level(ratios)
    return f"{found.mean:.3f} [{found.low:.3f}, {found.high:.3f}]"


def format_table(runs: list[dict], layout: str, saved: dict[str, int]) -> str:
    header = (
        "| candidate | median (ms) | × bn, each run | × bn, mean [95 % CI] "
        f"| ≤ {LIMIT:g}× bn | saved for backward × bn |"
    )
    lines = [header, "|---|---:|---:|---:|---|---:|"]
    for name in runs[0][layout]:
        ratios = run_ratios(runs, layout, name)
        pooled = statistics.median(t for run in runs for t in run[layout][name])
        memory = f"{saved[name] / saved['bn']:.2f}" if name in saved else "—"
        lines.append(
            f"| {name} | {pooled * 1e3:.2f} | {' '.join(f'{r:.2f}' for r in ratios.values)} "
            f"| {ratio_text(ratios)} | {VERDICT_WORDS[within_limit(ratios)]} | {memory} |"
        )
    return "\n".join(lines)


def verdict_lines(runs: list[dict]) -> list[str]:
    """Each registry norm not shown within LIMIT× bn, with its compiled formula beside it: where
    that misses too, it is the measured floor."""
    lines = []
    for layout in MEMORY_FORMATS:
        for name in runs[0][layout]:
            if name.endswith(COMPILED_SUFFIX) or name == REDUCED_LN:
                continue
            ratios = run_ratios(runs, layout, name)
            verdict = within_limit(ratios)
            if verdict is Verdict.AGREES:
                continue
            line = f"- {name} on {layout}: {ratio_text(ratios)}, {VERDICT_WORDS[verdict]}."
            fused = f"{name}{COMPILED_SUFFIX}"
            if fused in runs[0][layout]:
                line += " " + floor_text(ratios, run_ratios(runs, layout, fused))
            lines.append(line)
    if not lines:
        return [f"Every registry norm is within {LIMIT:g}× bn in both memory formats."]
    return [f"Not shown within {LIMIT:g}× bn:", *lines]


def floor_text(eager: Cell, fused: Cell) -> str:
    """The compiled formula beside an eager miss: whether it is within the line (then the miss is
    the eager path's) or over it too (a measured floor), and eager − compiled with its interval."""
    standing = {
        Verdict.AGREES: "within the line: the eager path is what misses",
        Verdict.DISAGREES: "over the line too: a measured floor",
        Verdict.INCONCLUSIVE: "inconclusive against the line",
    }[within_limit(fused)]
    gap = difference(eager, fused)
    words = {"higher": "eager is slower", "lower": "eager is faster"}.get(
        direction_words(gap), "no difference shown"
    )
    return (
        f"Its formula compiled (inductor's fused loops): {ratio_text(fused)}, {standing}; "
        f"eager − compiled {gap.text(3)}: {words}."
    )


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", type=int, nargs=4, default=[32, 256, 28, 28])
    parser.add_argument("--repeats", type=int, default=7, help="rounds in each run")
    parser.add_argument("--inner", type=int, default=3)
    parser.add_argument(
        "--runs", type=int, default=10, help="fresh processes, one after another (≥ 2 for a CI)"
    )
    parser.add_argument(
        "--threads", type=int, help="intra-op threads (default: torch's, one per core)"
    )
    parser.add_argument(
        "--compiled", nargs="*", default=COMPILED, help="norms also timed under torch.compile"
    )
    parser.add_argument("--out", type=Path, default=HERE / "norm_cost.md")
    parser.add_argument("--one-run", type=Path, help=argparse.SUPPRESS)  # a child's JSON
    args = parser.parse_args(argv)
    if args.runs < 1:
        parser.error(f"--runs must be ≥ 1, got {args.runs}")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.one_run:
        args.one_run.write_text(json.dumps(one_run(args)))
        return str(args.one_run)

    load_before = machine_load()
    measured_args = ["--shape", *map(str, args.shape), "--repeats", str(args.repeats)]
    measured_args += ["--inner", str(args.inner)]
    measured_args += ["--threads", str(args.threads)] if args.threads else []
    measured_args += ["--compiled", *args.compiled] if args.compiled != COMPILED else []
    runs = runs_in_fresh_processes(measured_args, args.runs)
    x = torch.randn(args.shape)
    saved = {
        layout: {name: saved_bytes(name, x.contiguous(memory_format=fmt)) for name in eager_names()}
        for layout, fmt in MEMORY_FORMATS.items()
    }
    bn_layouts = Cell(
        tuple(
            Timing("bn", run["channels_last"]["bn"]).ratio_to(Timing("bn", run["NCHW"]["bn"]))
            for run in runs
        )
    )
    shape = "×".join(map(str, args.shape))
    return write_report(
        args.out,
        f"Norm cost: forward+backward on {shape}, relative to bn",
        "python -m experiments.bench.norm_cost "
        + " ".join([*measured_args, "--runs", str(args.runs)])
        + (f" --out {args.out.name}" if args.out.name != "norm_cost.md" else ""),
        f"Training mode, float32, CPU. {args.runs} runs, each a fresh process, one after "
        f"another; in each, {args.repeats} rounds in which every candidate runs once (each "
        f"measurement is the mean of {args.inner} calls). A run's ratio to bn is the median over "
        "its rounds of the candidate's time / bn's time in the same round; the table gives each "
        "run's ratio and their mean with its 95 % t interval. `syncbn` outside a process group "
        "and `cuda_bn` on CPU tensors (backend auto) run PyTorch's BatchNorm; `ghost_bn` splits "
        "the batch into 4 virtual batches.",
        f'Verdict on "at most {LIMIT:g}× bn", normlab\'s one rule (`normlab.collect.comparison`, '
        "stated before the numbers): **yes** only if the whole interval lies at or below "
        f"{LIMIT:g}, **no** only if it lies above, otherwise (and with one run) **inconclusive**. "
        "Ratios move between processes on a shared VM, so one run decides nothing near the line.",
        f"bn on channels_last input / bn on NCHW input: {ratio_text(bn_layouts)}",
        "Median (ms): over every round of every run. The last column: bytes autograd keeps for "
        "the backward pass (unique storages, input included), relative to bn's "
        f'({saved["NCHW"]["bn"] / 2**20:.1f} MiB); "—" for compiled rows, whose graphs keep '
        "what inductor decides, out of the hooks' sight.",
        "\n".join(verdict_lines(runs)),
        *(
            f"## {layout} input\n\n{format_table(runs, layout, saved[layout])}"
            for layout in MEMORY_FORMATS
        ),
        load_before=load_before,
    )


if __name__ == "__main__":
    print(main())
