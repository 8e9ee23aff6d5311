"""DenseNet-121's memory-efficient mode: peak memory and step time, on vs off.

    python -m experiments.bench.densenet_memory                    # part of `make bench`
    python -m experiments.bench.densenet_memory --device cuda --precision bf16-mixed

``memory_efficient=True`` recomputes each dense layer's concat → norm → ReLU → 1×1 conv in
backward instead of keeping its output (torchvision documents the saving). One step is forward,
cross-entropy and backward at batch 32, 224×224. Two memory measures:

- peak step memory: each mode runs in a fresh process, first one batch-2 step (so that library
  initialisation and the allocator's first growth are already in the peak), then the measured
  step; the growth of the process's peak resident set (``ru_maxrss``) is what the step needed.
- saved activations: the bytes autograd holds for backward at the end of the forward pass
  (distinct storages packed by ``saved_tensors_hooks``, parameters excluded).

On a GPU the peak step memory is ``torch.cuda.max_memory_allocated`` during the step minus what
was allocated before it. Time: both modes alternate in one process. Goal: ≥ 40 % less peak step
memory at ≤ 1.25× time.
Writes densenet_memory.md next to this file.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from experiments.lib.benchmark import compare, machine_load, markdown_table, write_report
from normlab.models import densenet121

HERE = Path(__file__).resolve().parent
REPO_ROOT = HERE.parents[1]  # where `python -m experiments.bench...` finds the package
# Arguments of the tiny run in `make test` (tests/experiments/test_benchmarks.py).
SMOKE = ["--batch-size", "4", "--image-size", "32", "--repeats", "1"]
MEMORY_GOAL, TIME_GOAL = 0.40, 1.25


def training_step(
    memory_efficient: bool,
    batch_size: int,
    image_size: int,
    model: torch.nn.Module | None = None,
    device: str = "cpu",
    precision: str = "32-true",
):
    torch.manual_seed(0)
    if model is None:
        model = densenet121(num_classes=1000, memory_efficient=memory_efficient).train()
    model.to(device)
    images = torch.randn(batch_size, 3, image_size, image_size, device=device)
    labels = torch.randint(0, 1000, (batch_size,), device=device)
    autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=precision == "bf16-mixed")

    def step() -> None:
        model.zero_grad(set_to_none=True)
        with autocast:
            loss = F.cross_entropy(model(images), labels)
        loss.backward()

    return step


def cuda_step_memory(step) -> int:
    step()  # warm-up: cuDNN workspaces and the allocator's pools
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - before


def saved_activation_bytes(memory_efficient: bool, batch_size: int, image_size: int) -> int:
    torch.manual_seed(0)
    model = densenet121(num_classes=1000, memory_efficient=memory_efficient).train()
    parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in parameters:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    images = torch.randn(batch_size, 3, image_size, image_size)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = model(images).sum()
    loss.backward()
    return sum(saved.values())


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def step_memory(memory_efficient: bool, batch_size: int, image_size: int) -> int:
    """Bytes the peak RSS grows by during one step, measured in a fresh process."""
    result = subprocess.run(
        [sys.executable, "-m", __spec__.name, "--measure", str(int(memory_efficient)),
         "--batch-size", str(batch_size), "--image-size", str(image_size)],
        capture_output=True, text=True, check=True, cwd=REPO_ROOT,
    )  # fmt: skip
    return json.loads(result.stdout.strip().splitlines()[-1])["step_bytes"]


def _measure(memory_efficient: bool, batch_size: int, image_size: int) -> None:
    model = densenet121(num_classes=1000, memory_efficient=memory_efficient).train()
    training_step(memory_efficient, 2, image_size, model)()
    step = training_step(memory_efficient, batch_size, image_size, model)
    before = peak_rss_bytes()
    step()
    print(json.dumps({"step_bytes": peak_rss_bytes() - before}))


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--precision", default="32-true", choices=["32-true", "bf16-mixed"])
    parser.add_argument("--measure", type=int, choices=[0, 1], help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=HERE / "densenet_memory.md")
    args = parser.parse_args(argv)
    load_before = machine_load()
    if args.measure is not None:
        _measure(bool(args.measure), args.batch_size, args.image_size)
        return ""

    size, options = (args.batch_size, args.image_size), (None, args.device, args.precision)
    steps = {mode: training_step(mode, *size, *options) for mode in (False, True)}
    if args.device == "cuda":
        memory = {mode: cuda_step_memory(step) for mode, step in steps.items()}
    else:
        memory = {mode: step_memory(mode, *size) for mode in (False, True)}
    saved = {mode: saved_activation_bytes(mode, *size) for mode in (False, True)}
    timings = compare(
        {f"memory_efficient={mode}": step for mode, step in steps.items()},
        repeats=args.repeats,
        warmup=1,
        device=torch.device(args.device),
    )
    slowdown = timings[1].ratio_to(timings[0])
    saved_saving = 1 - saved[True] / saved[False]
    if memory[False] > 0:
        saving = 1 - memory[True] / memory[False]
        met = saving >= MEMORY_GOAL and slowdown <= TIME_GOAL
        verdict = (
            f"Memory-efficient mode needs {100 * saving:.0f} % less peak step memory "
            f"({100 * saved_saving:.0f} % fewer saved activations) at {slowdown:.2f}× the step "
            f"time: {'meets' if met else 'misses'} the goal (≥ {100 * MEMORY_GOAL:.0f} % less "
            f"at ≤ {TIME_GOAL}×)."
        )
    else:
        verdict = "The step stayed within the warm-up's peak memory: too small to measure."
    return write_report(
        args.out,
        "DenseNet-121 memory-efficient mode: peak step memory and time",
        f"python -m experiments.bench.densenet_memory --batch-size {args.batch_size} "
        f"--image-size {args.image_size} --repeats {args.repeats} --device {args.device} "
        f"--precision {args.precision}",
        f"One step = forward, cross-entropy, backward of densenet121 (norm=bn) on "
        f"{args.batch_size}×3×{args.image_size}×{args.image_size}, {args.device}, "
        f"{args.precision} (saved activations: float32 on CPU).",
        "| mode | peak step memory (MiB) | saved activations (MiB) |\n|---|---:|---:|\n"
        + "\n".join(
            f"| memory_efficient={mode} | {memory[mode] / 2**20:.0f} | {saved[mode] / 2**20:.0f} |"
            for mode in (False, True)
        ),
        markdown_table(timings, unit="s"),
        verdict,
        load_before=load_before,
    )


if __name__ == "__main__":
    print(main())
