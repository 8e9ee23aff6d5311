"""Run the benchmarks: `make bench` (CPU), `make bench-gpu` (GPU), or a tiny smoke run of all.

    python -m experiments.bench.run                 # CPU benchmarks → experiments/bench/*.md
    python -m experiments.bench.run --gpu           # GPU benchmarks → experiments/bench/*_gpu.md
    python -m experiments.bench.run --smoke --out-dir DIR   # every benchmark once, tiny sizes

Each benchmark runs in its own process (no state carries from one to the next) and writes its
own table; see README.md here for what each measures and its goal.
"""

from __future__ import annotations

import argparse
import importlib
import subprocess
import sys
import time
from pathlib import Path

from experiments.lib.jobs import REPO_ROOT

HERE = Path(__file__).resolve().parent
CPU = [
    "framework_overhead",
    "cuda_bn_cpu",
    "densenet_memory",
    "retinanet_inference",
    "data_loading",
    "norm_cost",
    "precision",
]
GPU_ARGS = ["--device", "cuda", "--precision", "bf16-mixed"]
GPU = {
    "framework_overhead": GPU_ARGS,
    "densenet_memory": GPU_ARGS,
    "retinanet_inference": GPU_ARGS,
    "bn_gpu": [],
    "training_throughput": GPU_ARGS,
}
# compile (about 3 h at full size: a fresh process per family × norm × mode) has its own target,
# `make bench-compile`; the smoke run still covers it.
SMOKE = [*CPU, "compile", "bn_gpu", "training_throughput"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--gpu", action="store_true", help="the GPU benchmarks")
    mode.add_argument("--smoke", action="store_true", help="every benchmark once, tiny, in-process")
    parser.add_argument("--only", nargs="*", help="benchmarks to run (default: all of the mode)")
    parser.add_argument("--out-dir", type=Path, default=HERE)
    args = parser.parse_args()

    if args.smoke:
        for name in args.only or SMOKE:
            module = importlib.import_module(f"{__package__}.{name}")
            module.main([*module.SMOKE, "--out", str(args.out_dir / f"{name}.md")])
        return
    plan = GPU if args.gpu else {name: [] for name in CPU}
    for name, extra in plan.items():
        if args.only and name not in args.only:
            continue
        out = args.out_dir / f"{name}{'_gpu' if args.gpu and name != 'bn_gpu' else ''}.md"
        start = time.perf_counter()
        command = [sys.executable, "-m", f"{__package__}.{name}", *extra, "--out", str(out)]
        subprocess.run(command, cwd=REPO_ROOT, check=True)
        print(f"{name}: {time.perf_counter() - start:.0f} s → {out}", flush=True)


if __name__ == "__main__":
    main()
