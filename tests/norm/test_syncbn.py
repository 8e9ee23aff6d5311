"""Our SyncBatchNorm across real processes (gloo on CPU): it must equal BatchNorm on the union of
the per-process batches, for even, uneven and empty per-process batches."""

from __future__ import annotations

import multiprocessing as mp
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch import nn

from normlab.norm import SyncBatchNorm, build_norm

CHANNELS = 3


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _data(dtype: torch.dtype, total: int, steps: int) -> tuple[list[torch.Tensor], ...]:
    generator = torch.Generator().manual_seed(0)
    xs = [
        (torch.randn(total, CHANNELS, 5, 4, generator=generator) * 3 + 1).to(dtype)
        for _ in range(steps)
    ]
    grads = [
        torch.randn(total, CHANNELS, 5, 4, generator=generator).to(dtype) for _ in range(steps)
    ]
    return xs, grads


def _make(module_class, dtype: torch.dtype, momentum: float | None, **kwargs) -> nn.Module:
    """``module_class(CHANNELS, momentum=..., **kwargs)`` (a class or a registry name)."""
    if isinstance(module_class, str):
        module = build_norm({"name": module_class, "momentum": momentum, **kwargs}, CHANNELS)
    else:
        module = module_class(CHANNELS, momentum=momentum, **kwargs)
    module = module.to(dtype)
    with torch.no_grad():
        module.weight.copy_(torch.tensor([0.5, -1.0, 2.0], dtype=dtype))
        module.bias.copy_(torch.tensor([0.1, 0.0, -0.3], dtype=dtype))
    return module


def _worker(rank: int, world: int, port: int, case: dict, out_dir: str) -> None:
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    try:
        torch.manual_seed(0)
        dtype, sizes, steps = case["dtype"], case["sizes"], case["steps"]
        xs, grads = _data(dtype, sum(sizes), steps)
        start = sum(sizes[:rank])
        local = slice(start, start + sizes[rank])
        module = _make(
            case.get("norm", SyncBatchNorm),
            dtype,
            case["momentum"],
            group_size=case.get("group_size"),
            **case.get("norm_args", {}),
        )
        results = []
        for x_full, g_full in zip(xs, grads, strict=True):
            module.zero_grad()
            x = x_full[local].clone().requires_grad_(True)
            out = module(x)
            (out * g_full[local]).sum().backward()
            results.append(
                {
                    "out": out.detach(),
                    "grad_x": x.grad,
                    "grad_w": module.weight.grad.clone(),
                    "grad_b": module.bias.grad.clone(),
                }
            )
        state = {k: v.clone() for k, v in module.state_dict().items()}
        # Eval mode must not communicate: only rank 0 runs it (a collective would hang).
        if rank == 0:
            module.eval()
            with torch.no_grad():
                state["eval_out"] = module(xs[0][:2])
        torch.save({"steps": results, "state": state}, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _run(case: dict, tmp_path: Path, world: int = 2) -> list[dict]:
    context = mp.get_context("fork")
    port = _free_port()
    processes = [
        context.Process(target=_worker, args=(rank, world, port, case, str(tmp_path)))
        for rank in range(world)
    ]
    for process in processes:
        process.start()
    for process in processes:
        process.join(timeout=120)
    assert all(p.exitcode == 0 for p in processes), [p.exitcode for p in processes]
    return [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(world)]


def _reference(case: dict) -> tuple[list[dict], dict]:
    dtype = case["dtype"]
    xs, grads = _data(dtype, sum(case["sizes"]), case["steps"])
    module = _make(nn.BatchNorm2d, dtype, case["momentum"])
    results = []
    for x_full, g_full in zip(xs, grads, strict=True):
        module.zero_grad()
        x = x_full.clone().requires_grad_(True)
        out = module(x)
        if case.get("norm_args", {}).get("activation") == "relu":
            out = torch.relu(out)
        (out * g_full).sum().backward()
        var, mean = torch.var_mean(x.detach(), dim=(0, 2, 3), unbiased=False, keepdim=True)
        results.append(
            {
                "out": out.detach(),
                "grad_x": x.grad,
                "grad_w": module.weight.grad.clone(),
                "grad_b": module.bias.grad.clone(),
                "x_hat": (x.detach() - mean) / torch.sqrt(var + module.eps),
                "dy": g_full,
            }
        )
    state = {k: v.clone() for k, v in module.state_dict().items()}
    module.eval()
    with torch.no_grad():
        state["eval_out"] = module(xs[0][:2])
        if case.get("norm_args", {}).get("activation") == "relu":
            state["eval_out"] = torch.relu(state["eval_out"])
    return results, state


@pytest.mark.parametrize("sizes", [(4, 4), (3, 5), (0, 8)], ids=["4+4", "3+5", "0+8"])
@pytest.mark.parametrize(
    ("dtype", "tolerance"), [(torch.float32, 1e-6), (torch.float64, 1e-12)], ids=["fp32", "fp64"]
)
@pytest.mark.parametrize("momentum", [0.1, None], ids=["momentum", "cumulative"])
def test_two_processes_equal_batchnorm_on_the_union(tmp_path, sizes, dtype, tolerance, momentum):
    _check_against_the_union(
        {"dtype": dtype, "sizes": sizes, "steps": 2, "momentum": momentum}, tmp_path, tolerance
    )


@pytest.mark.parametrize("sizes", [(4, 4), (3, 5), (0, 8)], ids=["4+4", "3+5", "0+8"])
@pytest.mark.parametrize("backend", ["triton", "reference", "auto"])
def test_cuda_bn_sync_equals_batchnorm_on_the_union(tmp_path, sizes, backend):
    """cuda_bn with sync=True: its kernels (Triton's interpreter on CPU), its reference and its
    CPU fallback, each across two gloo processes."""
    case = {
        "dtype": torch.float32,
        "sizes": sizes,
        "steps": 2,
        "momentum": 0.1,
        "norm": "cuda_bn",
        "norm_args": {"sync": True, "backend": backend},
    }
    _check_against_the_union(case, tmp_path, 1e-6)


def test_cuda_bn_sync_with_fused_relu(tmp_path):
    case = {
        "dtype": torch.float32,
        "sizes": (3, 5),
        "steps": 2,
        "momentum": None,
        "norm": "cuda_bn",
        "norm_args": {"sync": True, "backend": "triton", "activation": "relu"},
    }
    _check_against_the_union(case, tmp_path, 1e-6)


def _check_against_the_union(case: dict, tmp_path: Path, tolerance: float) -> None:
    ranks = _run(case, tmp_path)
    expected, expected_state = _reference(case)

    def close(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
        assert got.dtype == want.dtype, what
        torch.testing.assert_close(
            got, want, rtol=tolerance, atol=tolerance, msg=lambda m: f"{what}: {m}"
        )

    for step, want in enumerate(expected):
        got = [r["steps"][step] for r in ranks]
        close(torch.cat([g["out"] for g in got]), want["out"], f"output, step {step}")
        close(torch.cat([g["grad_x"] for g in got]), want["grad_x"], f"input grad, step {step}")
        # Parameter gradients are per-process sums; DDP averages them, so their sum is the
        # big batch's gradient (and the average what DDP applies with a loss averaged per process).
        # They are sums of 160 O(1) terms that cancel: in fp32 the summation order alone moves
        # them by up to ~3e-6 (measured), so the bound is 1e-6 of the terms' total magnitude.
        x_hat, dy = want["x_hat"], want["dy"]
        scale_w = (dy * x_hat).abs().sum(dim=(0, 2, 3))
        scale_b = dy.abs().sum(dim=(0, 2, 3))
        for key, scale in (("grad_w", scale_w), ("grad_b", scale_b)):
            total = sum(g[key] for g in got)
            assert total.dtype == want[key].dtype
            assert ((total - want[key]).abs() <= tolerance * scale).all(), (key, step)
    for rank in ranks:
        for key in ("running_mean", "running_var", "num_batches_tracked"):
            close(rank["state"][key], expected_state[key], key)
    close(ranks[0]["state"]["eval_out"], expected_state["eval_out"], "eval output")


def test_group_size_one_is_per_process_batchnorm(tmp_path):
    case = {"dtype": torch.float64, "sizes": (3, 5), "steps": 1, "momentum": 0.1, "group_size": 1}
    ranks = _run(case, tmp_path)
    xs, grads = _data(torch.float64, 8, 1)
    for rank, part in zip(ranks, (slice(0, 3), slice(3, 8)), strict=True):
        module = _make(nn.BatchNorm2d, torch.float64, 0.1)
        x = xs[0][part].clone().requires_grad_(True)
        out = module(x)
        (out * grads[0][part]).sum().backward()
        torch.testing.assert_close(rank["steps"][0]["out"], out.detach(), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(rank["steps"][0]["grad_x"], x.grad, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(rank["state"]["running_var"], module.running_var)


def test_single_process_is_exactly_batchnorm():
    torch.manual_seed(0)
    x = torch.randn(6, CHANNELS, 4, 4)
    sync, bn = _make(SyncBatchNorm, torch.float32, None), _make(nn.BatchNorm2d, torch.float32, None)
    for module in (sync, bn):
        module(x)
        module(x * 2)
    assert torch.equal(sync(x), bn(x))
    assert sync.state_dict().keys() == bn.state_dict().keys()
    for key, value in bn.state_dict().items():
        assert torch.equal(sync.state_dict()[key], value), key
    # State dicts move both ways between bn and syncbn.
    assert build_norm("syncbn", CHANNELS).load_state_dict(bn.state_dict())
    assert nn.BatchNorm2d(CHANNELS).load_state_dict(sync.state_dict())


def test_registry_syncbn_is_ours_and_takes_a_group_size():
    layer = build_norm({"name": "syncbn", "group_size": 2}, 8)
    assert isinstance(layer, SyncBatchNorm) and layer.group_size == 2
    assert not isinstance(layer, nn.SyncBatchNorm)


def test_norm_sync_plugin_converts_batchnorm_like_layers_and_reverts():
    from torchvision.ops import FrozenBatchNorm2d

    from normlab.norm.lightning_sync_plugin import NormSync

    class OwnSync(nn.Module):
        def to_synchronised(self, group_size):
            return nn.Identity()

    model = nn.Sequential(
        nn.Conv2d(3, 4, 3),
        nn.BatchNorm2d(4),
        FrozenBatchNorm2d(4),
        nn.Sequential(nn.BatchNorm1d(4)),
        OwnSync(),
    )
    with torch.no_grad():
        model[1].weight.fill_(2.0)
        model[1].running_mean.fill_(0.5)
    model[1].weight.requires_grad_(False)
    model.eval()
    plugin = NormSync()
    synced = plugin.apply(model)
    assert type(synced[1]) is SyncBatchNorm and type(synced[3][0]) is SyncBatchNorm
    assert type(synced[2]) is FrozenBatchNorm2d and type(synced[4]) is nn.Identity
    assert torch.equal(synced[1].weight, torch.full((4,), 2.0))
    assert torch.equal(synced[1].running_mean, torch.full((4,), 0.5))
    assert not synced[1].weight.requires_grad and not synced[1].training
    reverted = plugin.revert(synced)
    assert type(reverted[1]) is nn.BatchNorm2d and type(reverted[3][0]) is nn.BatchNorm1d
    assert torch.equal(reverted[1].running_mean, torch.full((4,), 0.5))
