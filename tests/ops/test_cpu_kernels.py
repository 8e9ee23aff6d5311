"""The fused CPU kernels of EvoNorm and FRN (``normlab.ops.cpu_kernels``): where they are built
from and when they are refused, and the cases the parity tests (``tests/norm/test_fast_paths.py``)
do not reach: thread counts, layouts of the upstream gradient, other ranks, saturated and NaN
input."""

from __future__ import annotations

import logging
import shutil
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

from normlab.norm import build_norm
from normlab.ops import cpu_kernels

SPECS = [
    {"name": "evonorm_b0"},
    {"name": "evonorm_s0", "num_groups": 4},
    {"name": "frn"},
    {"name": "frn", "tlu": False, "learnable_eps": True},
]


def _id(spec: dict) -> str:
    return "-".join(map(str, spec.values()))


@pytest.fixture
def fresh_library(monkeypatch, tmp_path: Path) -> Iterator[Path]:
    """library() built anew into a temporary cache folder, and forgotten again after the test."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("NORMLAB_CACHE_DIR", str(cache))
    cpu_kernels.library.cache_clear()
    yield cache
    cpu_kernels.library.cache_clear()


def _step(layer: nn.Module, x: Tensor, upstream: Tensor) -> list[Tensor]:
    leaf = x.detach().requires_grad_(True)
    layer.zero_grad()
    y = layer(leaf)
    y.backward(upstream)
    return [y.detach(), leaf.grad, *(p.grad for p in layer.parameters())]


def _aten_step(layer: nn.Module, x: Tensor, upstream: Tensor, monkeypatch) -> list[Tensor]:
    with monkeypatch.context() as patch:
        patch.setattr(cpu_kernels, "applies", lambda *_: False)
        return _step(layer, x, upstream)


def _layer(spec: dict, channels: int = 8) -> nn.Module:
    layer = build_norm(spec, channels).train()
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for parameter in layer.parameters():
            parameter.copy_(torch.rand(parameter.shape, generator=generator) + 0.5)
    return layer


def test_the_kernels_are_built_once_into_a_private_cache_folder(fresh_library):
    lib = cpu_kernels.library()
    assert lib is not None
    built = list(fresh_library.glob("cpu_kernels-*.so"))
    assert len(built) == 1 and Path(lib._name) == built[0]
    assert stat.S_IMODE(fresh_library.stat().st_mode) == 0o700
    assert list(fresh_library.iterdir()) == built  # no build folder left behind
    cpu_kernels.library.cache_clear()
    modified = built[0].stat().st_mtime_ns
    assert cpu_kernels.library() is not None
    assert built[0].stat().st_mtime_ns == modified  # loaded, not rebuilt


@pytest.mark.parametrize(
    ("compiler", "why"),
    [("/nonexistent/cc", "no C compiler"), ("false", "false failed: exit status 1")],
)
def test_without_a_working_compiler_evonorm_runs_on_aten_after_one_warning(
    fresh_library, monkeypatch, caplog, compiler, why
):
    monkeypatch.setenv("CC", compiler)
    x, upstream = torch.randn(3, 8, 4, 5), torch.randn(3, 8, 4, 5)
    layer = _layer(SPECS[1])
    expected = _aten_step(layer, x, upstream, monkeypatch)
    with caplog.at_level(logging.WARNING, logger=cpu_kernels.__name__):
        for _ in range(3):
            got = _step(layer, x, upstream)
    assert cpu_kernels.library() is None
    assert [r.getMessage().count("\n") for r in caplog.records] == [0]
    assert why in caplog.text and "NORMLAB_CPU_KERNELS=0" in caplog.text
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_a_damaged_library_file_is_built_again(fresh_library, caplog):
    target = cpu_kernels.library_path(shutil.which("cc"))
    fresh_library.mkdir(mode=0o700)
    target.write_bytes(b"\x7fELF cut short by a full disk")
    with caplog.at_level(logging.WARNING, logger=cpu_kernels.__name__):
        assert cpu_kernels.library() is not None
    assert caplog.records == []
    assert target.stat().st_size > 1000


def test_a_library_others_can_write_is_not_loaded(fresh_library, caplog):
    assert cpu_kernels.library() is not None
    fresh_library.chmod(0o777)
    cpu_kernels.library.cache_clear()
    with caplog.at_level(logging.WARNING, logger=cpu_kernels.__name__):
        assert cpu_kernels.library() is None
    assert "writable by other users" in caplog.text


def test_the_switch_turns_them_off_without_a_warning(fresh_library, monkeypatch, caplog):
    monkeypatch.setenv("NORMLAB_CPU_KERNELS", "0")
    with caplog.at_level(logging.WARNING):
        assert cpu_kernels.library() is None
        assert not cpu_kernels.applies(torch.randn(2, 8, 3, 3))
    assert caplog.records == []
    assert not fresh_library.exists()


@pytest.mark.parametrize("spec", SPECS, ids=_id)
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_results_do_not_depend_on_the_thread_count(spec, layout):
    # 5 samples: 2 threads take 2 and 3, 3 threads 1, 2 and 2.
    x = torch.randn(5, 8, 6, 7).contiguous(memory_format=layout)
    upstream = torch.randn(x.shape).contiguous(memory_format=layout)
    threads = torch.get_num_threads()
    results = []
    try:
        for count in (1, 2, 3):
            torch.set_num_threads(count)
            results.append(_step(_layer(spec), x, upstream))
    finally:
        torch.set_num_threads(threads)
    for other in results[1:]:
        for a, b in zip(results[0], other, strict=True):
            assert torch.equal(a, b)


@pytest.mark.parametrize("spec", SPECS, ids=_id)
@pytest.mark.parametrize(
    ("shape", "x_layout", "upstream_layout"),
    [
        ((4, 8, 5, 6), torch.channels_last, torch.contiguous_format),
        ((4, 8, 5, 6), torch.contiguous_format, torch.channels_last),
        ((4, 8, 30), torch.contiguous_format, torch.contiguous_format),
        ((3, 8, 2, 3, 4), torch.contiguous_format, torch.contiguous_format),
        ((3, 8, 2, 3, 4), torch.channels_last_3d, torch.channels_last_3d),
    ],
    ids=["cl-x-nchw-grad", "nchw-x-cl-grad", "3d", "5d", "5d-channels-last"],
)
def test_other_layouts_and_ranks_match_the_aten_path(
    spec, shape, x_layout, upstream_layout, monkeypatch
):
    x = (torch.randn(shape) * 2 + 0.5).contiguous(memory_format=x_layout)
    upstream = torch.randn(shape).contiguous(memory_format=upstream_layout)
    assert cpu_kernels.applies(x)
    layer = _layer(spec)
    expected = _aten_step(layer, x, upstream, monkeypatch)
    for a, b in zip(_step(layer, x, upstream), expected, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_s0_saturates_as_the_exact_sigmoid_does():
    """The kernels' own e^x (vectorised) against float64, where sigmoid(v·x) is 0 or 1 to float32
    precision and in between: no overflow, no lost digits."""
    layer = _layer({"name": "evonorm_s0", "num_groups": 1}, channels=1)
    x = torch.cat([torch.linspace(-1e4, 1e4, 101), torch.linspace(-30, 30, 601)]).view(1, 1, -1)
    y = layer(x).detach()
    v, gamma, beta = (p.detach().double() for p in (layer.v, layer.weight, layer.bias))
    x64 = x.double()
    expected = x64 * torch.sigmoid(v * x64) / torch.sqrt(x64.var(correction=0) + layer.eps)
    torch.testing.assert_close(y.double(), expected * gamma + beta, rtol=2e-6, atol=1e-6)


@pytest.mark.parametrize("spec", SPECS, ids=_id)
def test_nan_and_inf_spread_as_on_the_aten_path(spec, monkeypatch):
    x = torch.randn(3, 8, 4, 4)
    x[0, 1, 2, 2], x[2, 5, 0, 1] = float("nan"), float("inf")
    upstream = torch.randn(x.shape)
    layer = _layer(spec)
    expected = _aten_step(layer, x, upstream, monkeypatch)
    for a, b in zip(_step(layer, x, upstream), expected, strict=True):
        assert torch.equal(a.isnan(), b.isnan())
        assert torch.equal(a.isinf(), b.isinf())
