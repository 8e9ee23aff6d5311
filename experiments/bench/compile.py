"""compile=true on CPU: eager vs compiled training step, warm-up and break-even, per family and norm.

    python -m experiments.bench.compile                 # every family × norm → compile.md
    python -m experiments.bench.compile --families densenet --norms bn --tiny   # a smoke run

For each family (the experiment a study trains) × norm, and for the ``--regional-norms`` (bn by
default: regional compilation is about the repeated blocks, not the norm) also with
``compile_regional=true``, one fresh process (Dynamo's state and the regional switches are
process-wide; an empty inductor cache, so the warm-up is a first run's) builds the task twice
from one seed, compiles one copy as ``compile=true`` does, and times:

- warm-up: the first ``--warmup-steps`` compiled training steps minus as many warm compiled steps
  (tracing, inductor and the C++ compiler, recompiles in the first steps included);
- eager and compiled step: seconds per training step (forward, loss, backward, optimizer; the
  task's own ``training_step`` in a bare Lightning loop, no validation), measured alternately;
- break-even: warm-up / (eager − compiled step), the steps after which compiling has paid.

The verdict per family compares the break-even with the experiment's own run length
(``trainer.max_epochs`` × batches per epoch). Validation compiles its eval graphs on top
(not counted here). ``--jobs 2 --threads 1`` measures two processes at once, one thread each:
how the studies run on 2 cores (two one-thread runs at a time), in half the time. Writes
compile.md next to this file (or --out).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
from torch._dynamo.utils import counters

from experiments.lib import benchmark
from experiments.lib.jobs import REPO_ROOT

HERE = Path(__file__).resolve().parent
# (label, overrides): the families of the studies at their study sizes.
FAMILIES = {
    "densenet": (
        "DenseNet-BC-40, digits 16 px, batch 32",
        ["experiment=densenet_digits", "model=densenet_bc_40", "data.image_size=16"],
    ),
    "convnext": ("ConvNeXt-atto, digits 32 px, batch 64", ["experiment=convnext_digits"]),
    "retinanet": (
        "RetinaNet-R18 FPN, digit scenes 128 px, batch 8",
        ["experiment=retinanet_digits"],
    ),
    "pix2pix": (
        "pix2pix U-Net + PatchGAN, digit pairs 64 px, batch 8",
        ["experiment=pix2pix_digits"],
    ),
}
NORMS = ["bn", "gn", "ln", "brn", "frn", "evonorm_s0"]
# Small networks and data for a smoke run (--tiny).
TINY = {
    "densenet": ["model.depth=10", "data.image_size=8", "data.batch_size=4"],
    "convnext": ["data.image_size=16", "data.batch_size=4"],
    "retinanet": ["model.fpn_channels=16", "data.batch_size=2", "data.num_train=8"],
    "pix2pix": ["model.generator.ngf=4", "model.discriminator.ndf=4", "data.num_train=8"],
}
# Arguments of the tiny run in the smoke tests (tests/experiments/test_compile_bench.py).
SMOKE = [
    "--families", "densenet", "--norms", "bn", "--tiny", "--steps", "1", "--repeats", "1",
    "--warmup-steps", "1",
]  # fmt: skip


@dataclass
class Measurement:
    """One family × norm × compile_regional, in seconds."""

    family: str
    norm: str
    regional: bool
    eager_step: float
    compiled_step: float
    warmup: float
    graphs: int
    run_steps: int

    @property
    def ratio(self) -> float:
        return self.compiled_step / self.eager_step

    @property
    def break_even(self) -> float:
        """Training steps after which the compiled run has caught up (inf: never)."""
        saved = self.eager_step - self.compiled_step
        return math.ceil(max(self.warmup, 0.0) / saved) if saved > 0 else math.inf

    @property
    def pays(self) -> bool:
        return self.break_even <= self.run_steps


def measure(family: str, norm: str, regional: bool, args: argparse.Namespace) -> Measurement:
    """Run in a process of its own (see the module docstring)."""
    overrides = [*FAMILIES[family][1], f"norm={norm}", *(TINY[family] if args.tiny else [])]
    with tempfile.TemporaryDirectory() as root:
        cfg, eager, datamodule = benchmark.experiment_task(overrides, Path(root))
        _, compiled, _ = benchmark.experiment_task(overrides, Path(root))
        compiled.compile_networks(cfg.compile_mode, regional)
        loader = datamodule.train_dataloader()
        run_steps = len(loader) * cfg.trainer.max_epochs
        first = benchmark.timed_epoch(compiled, loader, args.warmup_steps)
        eager_timing, compiled_timing = benchmark.compare(
            {
                name: (lambda m=module: benchmark.timed_epoch(m, loader, args.steps) / args.steps)
                for name, module in (("eager", eager), ("compiled", compiled))
            },
            repeats=args.repeats,
            warmup=1,
        )
    return Measurement(
        family,
        norm,
        regional,
        eager_timing.median,
        compiled_timing.median,
        first - args.warmup_steps * compiled_timing.median,
        counters["stats"]["unique_graphs"],
        run_steps,
    )


def _measure_in_fresh_process(
    family: str, norm: str, regional: bool, args: argparse.Namespace
) -> Measurement:
    command = [
        sys.executable, "-m", __spec__.name, "--measure", family, norm, str(regional),
        "--steps", str(args.steps), "--repeats", str(args.repeats),
        "--warmup-steps", str(args.warmup_steps), *(["--tiny"] if args.tiny else []),
    ]  # fmt: skip
    with tempfile.TemporaryDirectory() as cache:
        env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache}
        if args.threads:
            # Inductor's generated C++ takes its OpenMP thread count from here too.
            env["OMP_NUM_THREADS"] = str(args.threads)
        result = subprocess.run(
            command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, check=False
        )
    if result.returncode != 0:
        raise RuntimeError(f"{family} {norm} regional={regional}:\n{result.stderr[-3000:]}")
    return Measurement(**json.loads(result.stdout.strip().splitlines()[-1]))


def _error_line(text: str) -> str:
    """The line of a failed measurement's stderr that names the error (the last that mentions
    one), else its last line."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    named = [line for line in lines if "error" in line.lower()]
    return (named or lines or ["(no output)"])[-1]


def _steps(value: float) -> str:
    return "never" if math.isinf(value) else f"{value:.0f}"


def table(measurements: list[Measurement]) -> str:
    lines = [
        "| family | norm | compile_regional | graphs | eager step (ms) | compiled step (ms) "
        "| compiled / eager | warm-up (s) | break-even (steps) | run (steps) |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for m in measurements:
        lines.append(
            f"| {m.family} | {m.norm} | {str(m.regional).lower()} | {m.graphs} "
            f"| {m.eager_step * 1e3:.1f} | {m.compiled_step * 1e3:.1f} | {m.ratio:.2f} "
            f"| {m.warmup:.1f} | {_steps(m.break_even)} | {m.run_steps} |"
        )
    return "\n".join(lines)


def verdict(family: str, measurements: list[Measurement]) -> str:
    """One sentence: which of the family's runs compile=true pays for."""
    mine = [m for m in measurements if m.family == family]
    label = f"**{FAMILIES[family][0]}** ({mine[0].run_steps} training steps per run)"

    def names(chosen: list[Measurement]) -> str:
        return ", ".join(f"{m.norm}{' regional' if m.regional else ''}" for m in chosen)

    paying = [m for m in mine if m.pays]
    if not paying:
        return f"{label}: compile=true pays for none of its runs on this machine."
    if len(paying) == len(mine):
        return f"{label}: compile=true pays for every run measured."
    return (
        f"{label}: compile=true pays for {names(paying)}; "
        f"not for {names([m for m in mine if not m.pays])}."
    )


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--families", nargs="*", default=list(FAMILIES), choices=list(FAMILIES))
    parser.add_argument("--norms", nargs="*", default=NORMS)
    parser.add_argument(
        "--regional-norms",
        nargs="*",
        default=["bn"],
        help="norms also measured with compile_regional=true",
    )
    parser.add_argument("--jobs", type=int, default=1, help="measurements run at once")
    parser.add_argument("--threads", type=int, help="intra-op threads per measurement")
    parser.add_argument("--steps", type=int, default=5, help="training steps per measurement")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup-steps", type=int, default=3)
    parser.add_argument("--tiny", action="store_true", help="small networks and data (smoke)")
    parser.add_argument("--measure", nargs=3, metavar=("FAMILY", "NORM", "REGIONAL"))
    parser.add_argument("--out", type=Path, default=HERE / "compile.md")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.measure:
        family, norm, regional = args.measure
        result = measure(family, norm, regional == "True", args)
        print(json.dumps(result.__dict__))
        return ""

    load_before = benchmark.machine_load()
    cases = [
        (family, norm, regional)
        for family in args.families
        for norm in args.norms
        for regional in (False, True)
        if not regional or norm in args.regional_norms
    ]
    failures: list[str] = []

    def attempt(case: tuple[str, str, bool]) -> Measurement | None:
        # One failing case (a compile error) must not throw away the hours the others took.
        try:
            return _measure_in_fresh_process(*case, args)
        except RuntimeError as error:
            failures.append(f"- {' '.join(map(str, case))}: {_error_line(str(error))}")
            return None

    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        measurements = [m for m in pool.map(attempt, cases) if m is not None]
    command = (
        f"python -m experiments.bench.compile --families {' '.join(args.families)} "
        f"--norms {' '.join(args.norms)} --regional-norms {' '.join(args.regional_norms)} "
        f"--steps {args.steps} --repeats {args.repeats} --warmup-steps {args.warmup_steps} "
        f"--jobs {args.jobs}{f' --threads {args.threads}' if args.threads else ''}"
        f"{' --tiny' if args.tiny else ''}"
    )
    return benchmark.write_report(
        args.out,
        "compile=true on CPU: step time, warm-up and break-even",
        command,
        "Each row is one fresh process with an empty inductor cache; "
        f"steps: the task's training step in a bare Lightning loop (no validation); step times "
        f"are medians of {args.repeats} alternating rounds of {args.steps} steps; warm-up: the "
        f"first {args.warmup_steps} compiled steps minus as many warm ones; break-even: "
        "warm-up / (eager − compiled step); run: the experiment's max_epochs × batches per "
        "epoch; graphs: Dynamo's unique graphs. compile_mode=default (inductor). "
        f"{args.jobs} measurement(s) at a time, "
        f"{args.threads or torch.get_num_threads()} intra-op thread(s) each."
        + (" --tiny: small networks and data, not the sizes named below." if args.tiny else ""),
        table(measurements),
        *(
            [
                "Failed (family, norm, compile_regional: last line of its error):\n\n"
                + "\n".join(sorted(failures))
            ]
            if failures
            else []
        ),
        "\n\n".join(
            verdict(family, measurements)
            for family in args.families
            if any(m.family == family for m in measurements)
        ),
        load_before=load_before,
    )


if __name__ == "__main__":
    print(main())
