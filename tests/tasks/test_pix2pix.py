"""pix2pix task: manual optimization, GAN objectives, test-time modes, Hydra runs, dashboards."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest
import torch

from normlab.collect.wandb_runs import read_offline_run
from normlab.errors import ConfigError
from normlab.eval import evaluate
from normlab.tasks.pix2pix import GAN_MODES, Pix2PixModule, gan_loss, linear_decay
from normlab.train import train


def _module(**options) -> Pix2PixModule:
    norm = options.pop("norm", "bn")
    model = {
        "generator": {
            "_target_": "normlab.models.pix2pix.UnetGenerator",
            "in_channels": 1,
            "out_channels": 1,
            "num_downs": 5,
            "ngf": 8,
            "norm": norm,
        },
        "discriminator": {
            "_target_": "normlab.models.pix2pix.PatchDiscriminator",
            "ndf": 8,
            "n_layers": 2,
            "norm": norm,
        },
    }
    optimizer = {
        "_target_": "torch.optim.Adam",
        "_partial_": True,
        "lr": 2e-4,
        "betas": [0.5, 0.999],
    }
    return Pix2PixModule(model, optimizer, **options)


def _batch(size: int = 2) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return {
        "A": torch.rand(size, 1, 32, 32, generator=generator) * 2 - 1,
        "B": torch.rand(size, 1, 32, 32, generator=generator) * 2 - 1,
    }


def test_linear_decay_matches_the_reference_formula() -> None:
    factor = linear_decay(n_epochs=3, n_epochs_decay=4)
    # Epochs 1..3 at full rate, then 1 - (k - 3) / 5 for k = 4..7.
    assert [factor(e) for e in range(7)] == pytest.approx([1, 1, 1, 0.8, 0.6, 0.4, 0.2])


@pytest.mark.parametrize("mode", GAN_MODES)
def test_gan_losses_push_real_and_fake_apart(mode: str) -> None:
    confident_real = torch.full((2, 1, 4, 4), 3.0)
    confident_fake = torch.full((2, 1, 4, 4), -3.0)
    if mode == "lsgan":
        confident_real, confident_fake = torch.ones(2, 1, 4, 4), torch.zeros(2, 1, 4, 4)
    assert gan_loss(confident_real, True, mode) < gan_loss(confident_real, False, mode)
    assert gan_loss(confident_fake, False, mode) < gan_loss(confident_fake, True, mode)


def test_bad_options_name_the_key() -> None:
    with pytest.raises(ConfigError, match=r"^gan_mode='hinge' is not one of vanilla"):
        _module(gan_mode="hinge")
    with pytest.raises(ConfigError, match=r"^test_mode='sample'"):
        _module(test_mode="sample")


@pytest.mark.parametrize(
    ("option", "message"),
    [
        ({"gradient_clip_val": 1.0}, r"trainer\.gradient_clip_val=1\.0: Lightning cannot clip"),
        ({"accumulate_grad_batches": 4}, r"trainer\.accumulate_grad_batches=4: gradient accum"),
    ],
)
def test_trainer_options_that_manual_optimization_cannot_honour_are_refused(option, message):
    import lightning.pytorch as pl

    trainer = pl.Trainer(logger=False, enable_checkpointing=False, **option)
    with pytest.raises(ConfigError, match=message):
        _module().check_run(trainer, None)


def test_train_test_mode_uses_batch_statistics_and_leaves_running_stats_alone() -> None:
    torch.manual_seed(0)
    module = _module(test_mode="train").eval()
    before = {k: v.clone() for k, v in module.generator.state_dict().items()}
    batch = _batch()
    with torch.no_grad(), module.test_time_generator() as generator:
        assert generator.training
        batch_stats = generator(batch["A"])
    assert not module.generator.training
    for key, value in module.generator.state_dict().items():
        assert torch.equal(value, before[key]), key
    with torch.no_grad():
        running = module.generator(batch["A"])
    assert not torch.allclose(batch_stats, running)


@pytest.mark.parametrize("mode", GAN_MODES)
def test_one_epoch_updates_both_networks_twice_per_batch(tmp_path, mode: str) -> None:
    import lightning.pytorch as pl
    from torch.utils.data import DataLoader, Dataset

    class Pairs(Dataset):
        def __len__(self) -> int:
            return 4

        def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
            return {key: value[0] for key, value in _batch(1).items()}

    torch.manual_seed(0)
    module = _module(gan_mode=mode, n_epochs=1, n_epochs_decay=1)
    g_before = [p.detach().clone() for p in module.generator.parameters()]
    d_before = [p.detach().clone() for p in module.discriminator.parameters()]
    trainer = pl.Trainer(
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        default_root_dir=tmp_path,
    )
    trainer.fit(module, DataLoader(Pairs(), batch_size=2))
    assert trainer.global_step == 4  # two optimizer steps per batch
    assert all(torch.isfinite(p).all() for p in module.parameters())
    assert any(
        not torch.equal(a, b) for a, b in zip(g_before, module.generator.parameters(), strict=True)
    )
    assert any(
        not torch.equal(a, b)
        for a, b in zip(d_before, module.discriminator.parameters(), strict=True)
    )
    metrics = trainer.callback_metrics
    assert math.isfinite(float(metrics["train/loss_g"])) and math.isfinite(
        float(metrics["train/loss_d"])
    )
    # The epoch-end scheduler step moved both optimizers into the decay phase: 1 - 1/2.
    for optimizer in trainer.optimizers:
        assert optimizer.param_groups[0]["lr"] == pytest.approx(2e-4 * 0.5)


@pytest.fixture(scope="module")
def pairs_root(tmp_path_factory) -> Path:
    """One data dir for the module: the tiny digit pairs are generated once."""
    return tmp_path_factory.mktemp("data")


@pytest.fixture
def tiny_pairs(pairs_root: Path) -> list[str]:
    return [
        "experiment=pix2pix_digits",
        f"data.root={pairs_root}",
        "data.num_train=8",
        "data.num_val=4",
        "data.num_test=4",
        "data.batch_size=4",
        "model.generator.ngf=8",
        "model.discriminator.ndf=8",
        "callbacks.model_summary=null",
        "callbacks.progress_bar=null",
    ]


@pytest.mark.parametrize("norm", ["bn", "in", "gn", "syncbn", "none", "ln", "frozen_bn", "cuda_bn"])
def test_fast_dev_run_translates_with_every_norm(compose_config, tiny_pairs, norm):
    cfg = compose_config(*tiny_pairs, "debug=fdr", "logger=csv", f"norm={norm}")
    metrics = train(cfg)
    for key in ("train/loss_g", "train/loss_d", "test/l1", "test/psnr", "test/ssim"):
        assert math.isfinite(metrics[key]), key


def test_image_size_must_fit_the_unet(compose_config, tiny_pairs):
    cfg = compose_config(*tiny_pairs, "debug=fdr", "logger=csv", "model.generator.num_downs=7")
    with pytest.raises(
        ConfigError, match=r"image size 64 does not fit model\.generator\.num_downs=7"
    ):
        train(cfg)


def test_short_run_logs_translations_metrics_and_checkpoints(compose_config, tiny_pairs):
    cfg = compose_config(
        *tiny_pairs,
        "logger=many",
        "trainer.max_epochs=2",
        "trainer.log_every_n_steps=1",
        "task.n_epochs=1",
        "task.n_epochs_decay=1",
        "task.num_logged_images=3",
    )
    metrics = train(cfg)
    run_dir = Path(cfg.paths.output_dir)

    with (run_dir / "csv" / "metrics.csv").open() as handle:
        columns = set(next(csv.reader(handle)))
    expected = {"train/loss_d", "train/loss_g", "train/loss_g_gan", "train/loss_g_l1"}
    expected |= {"val/l1", "val/psnr", "val/ssim", "val/l1_best", "test/l1", "test/psnr"}
    expected |= {"train/grad_norm/generator", "train/grad_norm/discriminator"}
    assert expected <= columns
    assert any(column.startswith("lr-Adam") for column in columns)

    run = read_offline_run(run_dir / "wandb", wait=60)
    assert run.complete and run.config["task"]["gan_mode"] == "vanilla"
    assert "val/translations/_type" in run.history_keys
    assert any("translations" in path.name for path in run.media)

    # normlab.eval rebuilds both networks from the checkpoint and reproduces the test metrics.
    best = next((run_dir / "checkpoints").glob("epoch*.ckpt"))
    eval_cfg = compose_config(f"ckpt_path={best}", "logger=csv", config_name="eval", run="eval")
    evaluated = evaluate(eval_cfg)
    assert evaluated["test/l1"] == pytest.approx(metrics["test/l1"], abs=1e-6)


def test_facades_experiment_is_the_reference_recipe(compose_config) -> None:
    cfg = compose_config("experiment=pix2pix_facades", "data.root=/data/facades")
    assert cfg.data.direction == "BtoA" and cfg.data.batch_size == 1
    assert (cfg.data.load_size, cfg.data.crop_size, cfg.data.flip) == (286, 256, True)
    generator, discriminator = cfg.model.generator, cfg.model.discriminator
    assert (generator.num_downs, generator.ngf, generator.use_dropout) == (8, 64, True)
    assert (discriminator.ndf, discriminator.n_layers) == (64, 3)
    assert cfg.norm.name == "bn" and generator.init_type == "normal"
    assert cfg.task.gan_mode == "vanilla" and cfg.task.lambda_l1 == 100.0
    assert list(cfg.task.optimizer.betas) == [0.5, 0.999] and cfg.task.optimizer.lr == 2e-4
    assert (cfg.task.n_epochs, cfg.task.n_epochs_decay, cfg.trainer.max_epochs) == (100, 100, 200)
    assert cfg.task.test_mode == "train"
