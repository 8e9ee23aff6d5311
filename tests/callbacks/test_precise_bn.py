"""PreciseBN: after a real Lightning fit, every norm's running statistics are the exact average
over the first N training batches of the per-batch mean and unbiased variance of its input
(computed here independently, from the inputs a forward hook sees), with the weights, momentum
and num_batches_tracked untouched; across two gloo processes, the statistics of the union of
the processes' inputs."""

from __future__ import annotations

import copy
import csv
import multiprocessing as mp
import random
import socket
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from lightning.pytorch.loggers import CSVLogger
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from normlab.callbacks import PreciseBN, recompute_norm_statistics
from normlab.callbacks.precise_bn import preserved_rng_state
from normlab.errors import ConfigError
from normlab.norm import SyncBatchNorm
from normlab.ops.batchnorm import CudaBatchNorm
from normlab.tasks.base import Task
from normlab.train import train

MOMENTUM = 0.9  # torch's convention: the running estimate is mostly the last batch


def _norm(kind: str, channels: int) -> nn.Module:
    if kind == "bn":
        return nn.BatchNorm2d(channels, momentum=MOMENTUM)
    if kind == "cuda_bn":
        return CudaBatchNorm(channels, momentum=MOMENTUM, backend="reference")
    if kind == "syncbn":
        return SyncBatchNorm(channels, momentum=MOMENTUM)
    if kind == "in":
        return nn.InstanceNorm2d(channels, momentum=MOMENTUM, affine=True, track_running_stats=True)
    raise ValueError(kind)


def _net(kind: str) -> nn.Sequential:
    # Dropout between the norms: the statistics are those of the network as at inference
    # (dropout off), so with dropout on the second norm's statistics would not match.
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        _norm(kind, 4),
        nn.ReLU(),
        nn.Dropout(0.5),
        nn.Conv2d(4, 6, 3, stride=2, padding=1),
        _norm(kind, 6),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(6, 3),
    )


class TinyTask(Task):
    def __init__(self, kind: str) -> None:
        super().__init__()
        self.net = _net(kind)

    @classmethod
    def logged_metrics(cls) -> list[str]:
        return ["val/loss"]

    def forward_for_norm_statistics(self, batch: tuple[Tensor, Tensor]) -> None:
        self.net(batch[0])

    def inference_network(self, batch: tuple[Tensor, Tensor]) -> tuple[nn.Module, tuple[Tensor]]:
        return self.net, (batch[0],)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        images, labels = batch
        return F.cross_entropy(self.net(images), labels)

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self.log("val/loss", F.cross_entropy(self.net(batch[0]), batch[1]))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _data() -> TensorDataset:
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(40, 3, 8, 8, generator=generator, dtype=torch.float64) * 2 + 0.5
    return TensorDataset(images, torch.randint(0, 3, (40,), generator=generator))


def _fit(kind: str, tmp_path: Path, callbacks: list[pl.Callback], name: str) -> TinyTask:
    pl.seed_everything(0)
    task = TinyTask(kind).double()
    trainer = pl.Trainer(
        accelerator="cpu",
        max_epochs=2,
        precision="64-true",
        callbacks=callbacks,
        logger=CSVLogger(tmp_path, name=name, version=""),
        log_every_n_steps=1,
        num_sanity_val_steps=0,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    data = _data()
    trainer.fit(
        task,
        DataLoader(data, batch_size=8),  # 5 batches, in order
        DataLoader(data, batch_size=20),
    )
    return task


def _norms(module: nn.Module) -> list[nn.Module]:
    return [m for m in module.modules() if hasattr(m, "running_mean")]


def _reference(net: nn.Sequential, batches: list[Tensor]) -> list[tuple[Tensor, Tensor]]:
    """Per norm: mean over the batches of the per-batch mean and unbiased variance of its input,
    with the norms in training mode and everything else (dropout) in eval mode."""
    net = copy.deepcopy(net).eval()
    inputs: dict[int, list[Tensor]] = {}
    for index, norm in enumerate(_norms(net)):
        norm.train()
        norm.register_forward_pre_hook(
            lambda module, args, index=index: inputs.setdefault(index, []).append(args[0])
        )
    with torch.no_grad():
        for batch in batches:
            net(batch)
    result = []
    for index, norm in enumerate(_norms(net)):
        if isinstance(norm, nn.InstanceNorm2d):  # per instance over H·W, then over instances
            means = [x.flatten(2).mean(2).mean(0) for x in inputs[index]]
            variances = [x.flatten(2).var(2, correction=1).mean(0) for x in inputs[index]]
        else:  # per channel over N·H·W
            means = [x.transpose(0, 1).flatten(1).mean(1) for x in inputs[index]]
            variances = [x.transpose(0, 1).flatten(1).var(1, correction=1) for x in inputs[index]]
        result.append((torch.stack(means).mean(0), torch.stack(variances).mean(0)))
    return result


def _logged_batches(path: Path) -> list[float]:
    with path.open() as handle:
        rows = list(csv.DictReader(handle))
    return [float(r["precise_bn/num_batches"]) for r in rows if r.get("precise_bn/num_batches")]


@pytest.mark.parametrize("kind", ["bn", "cuda_bn", "syncbn", "in"])
def test_precise_statistics_after_a_fit_are_exact_averages(tmp_path, kind):
    precise = _fit(kind, tmp_path, [PreciseBN(num_batches=3)], "precise")
    plain = _fit(kind, tmp_path, [], "plain")

    # Same training: weights, num_batches_tracked and momentum are those of a run without it.
    for (name, p), q in zip(precise.named_parameters(), plain.parameters(), strict=True):
        assert torch.equal(p, q), name
    for ours, theirs in zip(_norms(precise), _norms(plain), strict=True):
        assert torch.equal(ours.num_batches_tracked, theirs.num_batches_tracked)
        assert ours.momentum == theirs.momentum == MOMENTUM
        assert ours.training == theirs.training

    images = _data().tensors[0]
    expected = _reference(precise.net, [images[i * 8 : (i + 1) * 8] for i in range(3)])
    for norm, (mean, var), plain_norm in zip(_norms(precise), expected, _norms(plain), strict=True):
        torch.testing.assert_close(norm.running_mean, mean, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(norm.running_var, var, rtol=1e-12, atol=1e-14)
        # ... and not the momentum estimate.
        assert (norm.running_var - plain_norm.running_var).abs().max() > 1e-3
    assert _logged_batches(tmp_path / "precise" / "metrics.csv") == [3.0, 3.0]


def test_fewer_batches_when_the_loader_is_shorter_and_every_n_epochs(tmp_path):
    task = _fit("bn", tmp_path, [PreciseBN(num_batches=200, every_n_epochs=2)], "short")
    images = _data().tensors[0]
    expected = _reference(task.net, [images[i * 8 : (i + 1) * 8] for i in range(5)])
    for norm, (mean, var) in zip(_norms(task), expected, strict=True):
        torch.testing.assert_close(norm.running_mean, mean, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(norm.running_var, var, rtol=1e-12, atol=1e-14)
    assert _logged_batches(tmp_path / "short" / "metrics.csv") == [5.0]  # in epoch 2 only


def test_bad_options_name_the_key():
    with pytest.raises(ConfigError, match=r"callbacks\.precise_bn\.num_batches must be"):
        PreciseBN(num_batches=0)
    with pytest.raises(ConfigError, match=r"callbacks\.precise_bn\.every_n_epochs must be"):
        PreciseBN(every_n_epochs=1.5)


@pytest.mark.parametrize(
    ("overrides", "layers"),
    [
        # the backbone's BatchNorms (the heads have GroupNorm); the U-Net's 9 and PatchGAN's 3
        (["experiment=retinanet_digits", "data.num_train=8", "data.num_val=4"], 20),
        (
            [
                "experiment=pix2pix_digits",
                "data.num_train=8",
                "data.num_val=4",
                "model.generator.ngf=8",
                "model.discriminator.ndf=8",
            ],
            12,
        ),
    ],
    ids=["detection", "pix2pix"],
)
def test_every_task_runs_its_networks_for_precise_bn(
    compose_config, tmp_path, caplog, overrides, layers
):
    cfg = compose_config(
        *overrides,
        f"data.root={tmp_path / 'data'}",
        "data.num_test=4",
        "data.batch_size=4",
        "debug=fdr",
        "logger=csv",
        "callbacks=precise_bn",
        "callbacks.model_summary=null",
        "callbacks.progress_bar=null",
    )
    with caplog.at_level("INFO", logger="normlab.callbacks.precise_bn"):
        train(cfg)
    assert f"precise BN: {layers} norm layers from 1 batches" in caplog.text


# -- two processes (gloo) --------------------------------------------------------------------------

STEPS = 3


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _global_batches(total: int) -> list[Tensor]:
    generator = torch.Generator().manual_seed(1)
    return [
        torch.randn(total, 3, 6, 6, generator=generator, dtype=torch.float64) * 3 - 1
        for _ in range(STEPS)
    ]


def _seeded_net(kind: str) -> nn.Sequential:
    torch.manual_seed(0)
    return _net(kind).double()


def _worker(rank: int, port: int, kind: str, sizes: tuple[int, int], out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        net = _seeded_net(kind)
        start = sum(sizes[:rank])
        local = [x[start : start + sizes[rank]] for x in _global_batches(sum(sizes))]
        result = recompute_norm_statistics(net, local, net, num_batches=10)
        state = {k: v for k, v in net.state_dict().items() if "running" in k}
        torch.save({"state": state, "num_batches": result.num_batches}, f"{out_dir}/{rank}.pt")
    finally:
        dist.destroy_process_group()


def _union_reference(kind: str, sizes: tuple[int, int]) -> list[tuple[Tensor, Tensor]]:
    """Each process normalises its own part (``bn``, ``in``) or the union (``syncbn``, which
    in one process is BatchNorm on the whole batch); the statistics pool the inputs the layer saw
    across processes in each step."""
    net = _seeded_net("bn" if kind == "syncbn" else kind).eval()
    norms = _norms(net)
    inputs: dict[int, list[Tensor]] = {}
    for index, norm in enumerate(norms):
        norm.train()
        norm.register_forward_pre_hook(
            lambda module, args, index=index: inputs.setdefault(index, []).append(args[0])
        )
    sums = [[0, 0] for _ in norms]
    with torch.no_grad():
        for x in _global_batches(sum(sizes)):
            inputs.clear()
            parts = [x] if kind == "syncbn" else [x[: sizes[0]], x[sizes[0] :]]
            for part in parts:
                net(part)
            for index, norm in enumerate(norms):
                pooled = torch.cat(inputs[index])
                if isinstance(norm, nn.InstanceNorm2d):
                    mean = pooled.flatten(2).mean(2).mean(0)
                    var = pooled.flatten(2).var(2, correction=1).mean(0)
                else:
                    mean = pooled.transpose(0, 1).flatten(1).mean(1)
                    var = pooled.transpose(0, 1).flatten(1).var(1, correction=1)
                sums[index][0] += mean / STEPS
                sums[index][1] += var / STEPS
    return [tuple(s) for s in sums]


@pytest.mark.parametrize(
    ("kind", "sizes"), [("bn", (4, 4)), ("bn", (3, 5)), ("syncbn", (4, 4)), ("in", (2, 6))]
)
def test_two_processes_pool_their_inputs(tmp_path, kind, sizes):
    context = mp.get_context("fork")
    port = _free_port()
    processes = [
        context.Process(target=_worker, args=(rank, port, kind, sizes, str(tmp_path)))
        for rank in range(2)
    ]
    for process in processes:
        process.start()
    for process in processes:
        process.join(timeout=120)
    assert [p.exitcode for p in processes] == [0, 0]
    results = [torch.load(tmp_path / f"{rank}.pt") for rank in range(2)]
    assert [r["num_batches"] for r in results] == [STEPS, STEPS]
    expected = _union_reference(kind, sizes)
    for result in results:
        means = [v for k, v in result["state"].items() if k.endswith("running_mean")]
        variances = [v for k, v in result["state"].items() if k.endswith("running_var")]
        for mean, var, (want_mean, want_var) in zip(means, variances, expected, strict=True):
            torch.testing.assert_close(mean, want_mean, rtol=1e-12, atol=1e-14)
            torch.testing.assert_close(var, want_var, rtol=1e-12, atol=1e-14)


def test_statistics_pass_leaves_every_random_generator_where_it_was():
    def draw() -> tuple:
        return random.random(), float(np.random.rand()), float(torch.rand(()))

    pl.seed_everything(5)
    expected = draw()
    pl.seed_everything(5)
    with preserved_rng_state():
        inside = draw()
        draw()
    assert inside == expected
    assert draw() == expected
