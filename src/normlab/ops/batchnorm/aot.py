"""cuda_bn's kernels compiled ahead of time for GPUs that are not there: sm_80 and sm_90.

Triton compiles for a target without a device (PTX, then cubin with its bundled ``ptxas``). The
launches come from :func:`launches.record_layer` under the target's tile plan, and are
specialised exactly as Triton's launcher would specialise them (its own binder: dtypes, integer
values of 1, 16-byte divisibility), so each compilation is a kernel a GPU would run for that
layer. ``ptxas -v`` on the PTX reports registers, spills and stack; Triton's metadata the
shared memory. Needs the kernels compiled, not interpreted::

    TRITON_INTERPRET=0 python -m normlab.ops.batchnorm.aot            # representative set
    TRITON_INTERPRET=0 python -m normlab.ops.batchnorm.aot --full     # the whole matrix

It exits 1 if a kernel fails to compile or spills. ``make test`` runs the first
(tests/ops/test_cuda_bn_aot.py), ``make test-aot`` the second, writing
experiments/bench/cuda_bn_aot.md.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability
from triton.compiler import ASTSource, make_backend
from triton.runtime.jit import create_function_from_signature

from normlab.ops.batchnorm import kernels
from normlab.ops.batchnorm.launches import Launch, LayerConfig, record_layer

# Compute capability → multiprocessors of the GPU whose plan is recorded (A100, H100 SXM).
TARGETS = {80: 108, 90: 132}
ACTIVATIONS = [None, "relu", "leaky_relu", "silu"]
HALF_DTYPES = [torch.float16, torch.bfloat16]
# The shapes: DenseNet/ResNet stages and a tiny odd one.
FULL_SHAPES = [
    (32, 64, 112, 112),
    (32, 256, 56, 56),
    (32, 1024, 14, 14),
    (256, 2048, 7, 7),
    (2, 3, 5, 7),
]
SYNC_RANKS = [2, 8, 32]


@dataclass(frozen=True)
class Compiled:
    kernel: str
    config: str  # the first layer configuration that needed this specialisation
    arch: int
    constexprs: str
    registers: int
    spill_stores: int
    spill_loads: int
    stack: int
    shared: int

    @property
    def spills(self) -> int:
        return self.spill_stores + self.spill_loads


def representative_configs() -> list[LayerConfig]:
    """One layer per layout × dtype class, with the activation that needs most registers: every
    kernel in every dtype class and layout, training and eval forward and backward."""
    return [
        LayerConfig((8, 64, 14, 14), channels_last, dtype, "silu")
        for channels_last in (False, True)
        for dtype in (torch.float32, torch.bfloat16)
    ]


def full_configs() -> list[LayerConfig]:
    configs = []
    for shape in FULL_SHAPES:
        for channels_last in (False, True):
            for dtype in (torch.float32, *HALF_DTYPES):
                for activation in ACTIVATIONS:
                    for affine in (True, False):
                        for half_weights in (False, True) if dtype != torch.float32 else (False,):
                            configs.append(
                                LayerConfig(
                                    shape, channels_last, dtype, activation, affine, half_weights
                                )
                            )
            for ranks in SYNC_RANKS:
                configs.append(
                    LayerConfig(shape, channels_last, torch.bfloat16, "relu", ranks=ranks)
                )
    return configs


class Compiler:
    """Compiles launches for one target; each specialisation once per process (Triton also
    caches its output under ~/.triton)."""

    def __init__(self, arch: int) -> None:
        if kernels.INTERPRETED:
            raise RuntimeError("compiling ahead of time needs TRITON_INTERPRET=0 (it is 1)")
        self.arch = arch
        self.target = GPUTarget("cuda", arch, 32)
        self.backend = make_backend(self.target)
        self._binders = {}
        self._done: dict[tuple, Compiled] = {}

    def specialise(self, launch: Launch) -> tuple[dict, dict, dict, dict]:
        """(signature, constexprs, attributes, options) as Triton's launcher would derive them."""
        fn = getattr(kernels, launch.kernel)
        if launch.kernel not in self._binders:
            self._binders[launch.kernel] = create_function_from_signature(
                fn.signature, fn.params, self.backend
            )
        kwargs = {**launch.kwargs, "debug": False}
        bound, specialization, options = self._binders[launch.kernel](*launch.args, **kwargs)
        options, signature, constexprs, attrs = fn._pack_args(
            self.backend, kwargs, bound, specialization, options
        )
        return signature, constexprs, attrs, options.__dict__

    def compile(self, launch: Launch, config: str) -> tuple[Compiled, bool]:
        """The compiled kernel's resources, and whether this process compiled it just now."""
        signature, constexprs, attrs, options = self.specialise(launch)
        key = (launch.kernel, repr(sorted(signature.items())), repr(constexprs), repr(attrs))
        if key in self._done:
            return self._done[key], False
        fn = getattr(kernels, launch.kernel)
        source = ASTSource(fn, signature, constexprs, attrs)
        binary = triton.compile(source, target=self.target, options=options)
        usage = _ptxas_usage(binary.asm["ptx"], self.arch)
        named = {fn.arg_names[path[0]]: value for path, value in constexprs.items()}
        compiled = Compiled(
            launch.kernel,
            config,
            self.arch,
            " ".join(f"{name}={_short(value)}" for name, value in named.items()),
            shared=binary.metadata.shared,
            **usage,
        )
        self._done[key] = compiled
        return compiled, True


def _short(value: object) -> str:
    return str(value).removeprefix("fp").replace("True", "1").replace("False", "0")


def _ptxas_usage(ptx: str, arch: int) -> dict[str, int]:
    """Registers, spills and stack of ``ptx`` by Triton's ptxas with Triton's flags."""
    with tempfile.TemporaryDirectory() as directory:
        source = Path(directory, "kernel.ptx")
        source.write_text(ptx)
        command = [
            get_ptxas(arch).path, "-v", "-lineinfo", "--regAllocOptLevel=2",
            f"--gpu-name={sm_arch_from_capability(arch)}", str(source),
            "-o", str(Path(directory, "kernel.cubin")),
        ]  # fmt: skip
        log = subprocess.run(command, check=True, capture_output=True, text=True).stderr

    def number(pattern: str) -> int:
        match = re.search(pattern, log)
        if match is None:
            raise RuntimeError(f"ptxas -v printed no {pattern!r}:\n{log}")
        return int(match.group(1))

    return {
        "registers": number(r"Used (\d+) registers"),
        "spill_stores": number(r"(\d+) bytes spill stores"),
        "spill_loads": number(r"(\d+) bytes spill loads"),
        "stack": number(r"(\d+) bytes stack frame"),
    }


def compile_all(
    configs: Iterable[LayerConfig],
    archs: Iterable[int] = TARGETS,
    on_layer: Callable[[int, int], None] | None = None,
) -> Iterator[tuple[Compiled, Launch]]:
    """Every distinct kernel specialisation the layers in ``configs`` launch, compiled for each
    target under that target's plan (first occurrence only). ``on_layer(done, total)`` is called
    after each (layer configuration, target): the full matrix compiles for about an hour."""
    configs, archs = list(configs), list(archs)
    done, total = 0, len(configs) * len(archs)
    for arch in archs:
        compiler = Compiler(arch)
        for config in configs:
            with kernels.forced_plan(kernels.gpu_plan_settings(TARGETS[arch])):
                recorded = record_layer(config)
            for launch in recorded.all():
                compiled, new = compiler.compile(launch, config.describe())
                if new:
                    yield compiled, launch
            done += 1
            if on_layer is not None:
                on_layer(done, total)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--full", action="store_true", help="the whole matrix (minutes)")
    args = parser.parse_args(argv)
    configs = full_configs() if args.full else representative_configs()
    failures = 0
    count = 0
    for compiled, _ in compile_all(configs):
        count += 1
        spilled = compiled.spills > 0 or compiled.stack > 0
        failures += spilled
        print(
            f"sm_{compiled.arch} {compiled.kernel} [{compiled.config}] "
            f"registers={compiled.registers} spills={compiled.spills} stack={compiled.stack} "
            f"shared={compiled.shared}{'  SPILLS' if spilled else ''}"
        )
    print(f"{count} kernels compiled for sm_80 and sm_90, {failures} spilling")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
