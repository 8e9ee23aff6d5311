"""WeightEMA (``callbacks=ema``) after real Lightning fits of a small BatchNorm network in
float64: the averaged weights equal an average computed here by hand from the raw weights of
every step (with timm's warm-up, an update interval and a start step), and the averaged norm
buffers are averaged with them, copied from the raw model, or PreciseBN's on the averaged
weights, as ``norm_buffers`` says; the checkpoint holds both models and the counters."""

from __future__ import annotations

import copy
import re
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from normlab.callbacks import WeightEMA, recompute_norm_statistics
from normlab.errors import ConfigError
from normlab.tasks.base import Task

BATCH = 8


class BatchNormTask(Task):
    def __init__(self, eval_norm_statistics: str = "population") -> None:
        super().__init__(eval_norm_statistics=eval_norm_statistics)
        self.net = nn.Sequential(
            nn.Conv2d(3, 4, 3, padding=1),
            nn.BatchNorm2d(4, momentum=0.5),
            nn.ReLU(),
            nn.Conv2d(4, 6, 3, stride=2, padding=1),
            nn.BatchNorm2d(6, momentum=0.5),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(6, 3),
        )

    @classmethod
    def logged_metrics(cls) -> list[str]:
        return ["val/loss"]

    def forward_for_norm_statistics(self, batch: tuple[Tensor, Tensor]) -> None:
        self.net(batch[0])

    def inference_network(self, batch: tuple[Tensor, Tensor]) -> tuple[nn.Module, tuple[Tensor]]:
        return self.net, (batch[0],)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        return F.cross_entropy(self.net(batch[0]), batch[1])

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        for suffix, task in self.evaluated_models():
            self.log(f"val/loss{suffix}", F.cross_entropy(task.net(batch[0]), batch[1]))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.2, momentum=0.9)


class RecordRawStates(pl.Callback):
    """The raw model's state after every optimizer step."""

    def __init__(self) -> None:
        self.states: list[dict[str, Tensor]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.states.append({k: v.clone() for k, v in pl_module.state_dict().items()})


def _images() -> TensorDataset:
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(48, 3, 8, 8, generator=generator, dtype=torch.float64) * 2 + 0.5
    return TensorDataset(images, torch.randint(0, 3, (48,), generator=generator))


def _fit(
    tmp_path: Path, ema: WeightEMA, statistics: str = "population"
) -> tuple[BatchNormTask, RecordRawStates, pl.Trainer]:
    pl.seed_everything(0)
    task = BatchNormTask(statistics).double()
    record = RecordRawStates()
    trainer = pl.Trainer(
        accelerator="cpu",
        max_epochs=2,  # 6 batches each: 12 optimizer steps
        precision="64-true",
        callbacks=[record, ema],
        logger=False,
        default_root_dir=tmp_path,
        num_sanity_val_steps=0,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    data = _images()
    trainer.fit(task, DataLoader(data, batch_size=BATCH), DataLoader(data, batch_size=24))
    return task, record, trainer


def _step_decay(t: int, decay: float, warmup: bool) -> float:
    return min(decay, 1 - (1 + t) ** (-2 / 3)) if warmup else decay


def _hand_average(
    states: list[dict[str, Tensor]], decay: float, warmup: bool, every: int, start: int
) -> tuple[dict[str, Tensor], int, int]:
    """The EMA of the float tensors of ``states`` (one per optimizer step, step 1 first), the
    number of updates and the step of the last one, written out step by step."""
    average: dict[str, Tensor] | None = None
    updates, last = 0, 0
    for step, state in enumerate(states, start=1):
        if step <= start or (average is not None and step - last < every):
            continue
        if average is None:
            average = {k: v.clone() for k, v in state.items()}
        else:
            kept = 1.0
            for passed in range(last + 1, step + 1):  # each step since the last update
                kept *= _step_decay(passed - start - 1, decay, warmup)
            for key, value in state.items():
                if value.is_floating_point():
                    average[key] = kept * average[key] + (1 - kept) * value
                else:
                    average[key] = value.clone()
        updates, last = updates + 1, step
    assert average is not None
    return average, updates, last


def test_the_warm_up_is_timms():
    ema = WeightEMA(decay=0.9998)
    assert ema.step_decay(1) == 0.0  # the first step after start_step: a copy
    assert ema.step_decay(2) == pytest.approx(1 - 2 ** (-2 / 3))
    assert ema.step_decay(32) == pytest.approx(0.9008, abs=1e-4)
    assert ema.step_decay(1001) == pytest.approx(0.99, abs=1e-4)
    assert ema.step_decay(31624) == pytest.approx(0.999, abs=1e-5)
    assert ema.step_decay(10**8) == 0.9998
    assert WeightEMA(decay=0.9, decay_warmup=False).step_decay(2) == 0.9


@pytest.mark.parametrize(
    ("decay", "warmup", "every", "start"),
    [(0.5, True, 1, 0), (0.8, False, 3, 2), (0.6, True, 2, 3)],
    ids=["warm-up", "every-3-from-step-2", "warm-up-every-2-from-step-3"],
)
def test_averaged_weights_and_buffers_equal_the_hand_computed_average(
    tmp_path, decay, warmup, every, start
):
    ema = WeightEMA(
        decay=decay,
        decay_warmup=warmup,
        update_every_n_steps=every,
        start_step=start,
        norm_buffers="average",
    )
    task, record, _ = _fit(tmp_path, ema)
    expected, updates, last = _hand_average(record.states, decay, warmup, every, start)
    averaged = ema.averaged_task.state_dict()
    assert averaged.keys() == expected.keys()
    for key, value in expected.items():
        torch.testing.assert_close(averaged[key], value, rtol=0, atol=1e-12, msg=key)
    assert ema.num_updates == updates
    assert ema.state_dict() == {"latest_update_step": last}
    # Not the raw weights: an average that stood still or copied would fail above or here.
    assert not torch.equal(averaged["net.0.weight"], task.state_dict()["net.0.weight"])


def test_copy_takes_the_raw_buffers_and_averages_the_weights(tmp_path):
    ema = WeightEMA(decay=0.7, decay_warmup=False, norm_buffers="copy")
    task, record, _ = _fit(tmp_path, ema)
    expected, _, _ = _hand_average(record.states, 0.7, False, 1, 0)
    averaged, raw = ema.averaged_task.state_dict(), task.state_dict()
    for key, value in raw.items():
        if key.endswith(("running_mean", "running_var", "num_batches_tracked")):
            assert torch.equal(averaged[key], value), key
        else:
            torch.testing.assert_close(averaged[key], expected[key], rtol=0, atol=1e-12)


def test_recompute_gives_precise_bn_of_the_averaged_weights(tmp_path):
    # 20 images at 8 per batch: PreciseBN over the first 3 training batches, in order.
    ema = WeightEMA(decay=0.7, norm_buffers="recompute", recompute_images=20)
    task, record, _ = _fit(tmp_path, ema)
    reference = copy.deepcopy(ema.averaged_task)
    reference.load_state_dict(
        {k: v for k, v in _hand_average(record.states, 0.7, True, 1, 0)[0].items()}
    )
    batches = [images for images, _ in DataLoader(_images(), batch_size=BATCH)]
    result = recompute_norm_statistics(reference.net, batches, reference.net, num_batches=3)
    assert result.num_batches == 3 and len(result.updated) == 2
    averaged = ema.averaged_task.state_dict()
    for key, value in reference.state_dict().items():
        torch.testing.assert_close(averaged[key], value, rtol=0, atol=1e-12, msg=key)
    # Not the raw model's, nor averaged ones.
    raw = task.state_dict()["net.1.running_mean"]
    assert not torch.allclose(averaged["net.1.running_mean"], raw)


def test_the_checkpoint_holds_both_models_and_the_counters(tmp_path):
    ema = WeightEMA(decay=0.7, update_every_n_steps=2)
    task, _, trainer = _fit(tmp_path, ema)
    path = tmp_path / "both.ckpt"
    trainer.save_checkpoint(path)
    checkpoint = torch.load(path, weights_only=True)
    averaged, raw = ema.averaged_task.state_dict(), task.state_dict()
    assert checkpoint["state_dict"].keys() == raw.keys() == checkpoint["current_model_state"].keys()
    for key in raw:
        assert torch.equal(checkpoint["state_dict"][key], averaged[key]), key
        assert torch.equal(checkpoint["current_model_state"][key], raw[key]), key
    assert int(checkpoint["averaging_state"]["n_averaged"]) == ema.num_updates == 6
    assert checkpoint["callbacks"]["WeightEMA"] == {"latest_update_step": 11}

    # Loaded into a fresh task and callback, as a resume loads it.
    fresh = WeightEMA(decay=0.7, update_every_n_steps=2)
    other = BatchNormTask().double()
    resumed = pl.Trainer(
        accelerator="cpu",
        max_epochs=2,
        precision="64-true",
        callbacks=[fresh],
        logger=False,
        default_root_dir=tmp_path,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    data = DataLoader(_images(), batch_size=BATCH)
    resumed.fit(other, data, ckpt_path=path)  # already at max_epochs: restores, trains nothing
    assert fresh.num_updates == 6 and fresh.state_dict() == {"latest_update_step": 11}
    for key in raw:
        assert torch.equal(fresh.averaged_task.state_dict()[key], averaged[key]), key
        assert torch.equal(other.state_dict()[key], raw[key]), key


@pytest.mark.parametrize("statistics", ["population", "batch"])
def test_the_averaged_model_is_evaluated_with_the_statistics_the_task_asks_for(
    tmp_path, statistics
):
    ema = WeightEMA(decay=0.7)
    _, _, trainer = _fit(tmp_path, ema, statistics)
    averaged = copy.deepcopy(ema.averaged_task.net).eval()
    if statistics == "batch":
        for layer in averaged.modules():
            if isinstance(layer, nn.BatchNorm2d):
                layer.train()
    losses = [F.cross_entropy(averaged(x), y) for x, y in DataLoader(_images(), batch_size=24)]
    expected = torch.stack(losses).mean()
    torch.testing.assert_close(trainer.callback_metrics["val/loss_ema"], expected)
    # The other statistics give another loss: the check above can tell them apart.
    other = copy.deepcopy(ema.averaged_task.net).train(statistics == "population")
    assert not torch.allclose(other(_images().tensors[0][:24]), averaged(_images().tensors[0][:24]))


@pytest.mark.parametrize(
    ("argument", "value", "message"),
    [
        ("decay", 1.5, "decay must be a number in [0, 1], got 1.5"),
        ("update_every_n_steps", 0, "update_every_n_steps must be an integer >= 1, got 0"),
        ("start_step", -1, "start_step must be an integer >= 0, got -1"),
        ("warmup_gamma", 0, "warmup_gamma must be a number > 0, got 0"),
        ("norm_buffers", "mean", "norm_buffers='mean' is not one of average, copy, recompute"),
        ("decay_warmup", 1, "decay_warmup must be true or false, got 1"),
    ],
)
def test_bad_arguments_are_one_line_naming_them(argument, value, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        WeightEMA(**{argument: value})
