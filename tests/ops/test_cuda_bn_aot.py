"""cuda_bn's kernels compiled for sm_80 and sm_90 without a GPU (normlab.ops.batchnorm.aot): a
representative launch of every kernel, dtype class and layout, as the host code records it under
the GPU's tile plan, must compile and must not spill. `make test-aot` runs the whole matrix."""

from __future__ import annotations

import os
import re

from cli import run_module
from normlab.ops.batchnorm.launches import KERNEL_NAMES

LINE = re.compile(
    r"^sm_(?P<arch>\d+) (?P<kernel>\w+) \[\S+ (?P<layout>\S+) (?P<dtype>\S+) .*\] "
    r"registers=(?P<registers>\d+) spills=(?P<spills>\d+)",
    re.MULTILINE,
)


def test_every_kernel_compiles_for_sm80_and_sm90_without_spilling():
    # A process of its own: here the kernels are interpreted (conftest sets TRITON_INTERPRET=1).
    result = run_module("normlab.ops.batchnorm.aot", env={**os.environ, "TRITON_INTERPRET": "0"})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    compiled = [match.groupdict() for match in LINE.finditer(result.stdout)]
    assert compiled, result.stdout
    assert all(entry["spills"] == "0" for entry in compiled)
    assert all(0 < int(entry["registers"]) <= 255 for entry in compiled)
    seen = {(e["arch"], e["kernel"], e["layout"], e["dtype"]) for e in compiled}
    # The merge kernels run on fp32 statistics whatever x's dtype: they appear with fp32 only.
    wanted = {
        (arch, kernel, layout, dtype)
        for arch in ("80", "90")
        for kernel in KERNEL_NAMES
        for layout in ("nchw", "channels_last")
        for dtype in ("float32", "bfloat16")
        if dtype == "float32" or ("merge" not in kernel and "finish" not in kernel)
    }
    assert wanted <= seen, sorted(wanted - seen)
