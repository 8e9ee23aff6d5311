"""Image-to-image translation with pix2pix (Isola et al., 2017) as a LightningModule.

Two networks, two optimizers, manual optimization: each batch first updates the discriminator on
real pairs (A, B) against fake pairs (A, G(A)) with G's output detached, then the generator on the
GAN loss of its fakes plus λ·L1 to the target. ``toggled_optimizer`` freezes the other network's
parameters during each step (the reference's ``set_requires_grad``). Because each batch makes two
optimizer steps, ``global_step`` advances by two per batch.

Batches are dicts ``{"A": input, "B": target}`` in [-1, 1] (see ``normlab.data.AlignedDataModule``).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from torch import Tensor, nn
from torchmetrics import MeanMetric, MetricCollection, MinMetric
from torchmetrics.image import PeakSignalNoiseRatio, StructuralSimilarityIndexMeasure

from normlab.errors import ConfigError
from normlab.models.pix2pix import check_image_size
from normlab.ranges import FRACTION, ArgumentError, check_choice, checked_arguments
from normlab.tasks.base import Task, take_values
from normlab.tasks.checks import check_norm_inputs
from normlab.tasks.optim import build_optimizer
from normlab.utils.figures import log_image, translation_grid

log = logging.getLogger(__name__)

GAN_MODES = ("vanilla", "lsgan", "wgangp")
TEST_MODES = ("eval", "train")


def gan_loss(prediction: Tensor, target_is_real: bool, mode: str) -> Tensor:
    """The adversarial loss of a discriminator output against "real" or "fake".

    ``vanilla``: BCE on logits; ``lsgan``: least squares towards 1 / 0; ``wgangp``: the Wasserstein
    critic's -mean (real) / +mean (fake).
    """
    if mode == "wgangp":
        return -prediction.mean() if target_is_real else prediction.mean()
    target = torch.full_like(prediction, 1.0 if target_is_real else 0.0)
    if mode == "lsgan":
        return F.mse_loss(prediction, target)
    return F.binary_cross_entropy_with_logits(prediction, target)


def gradient_penalty(discriminator: nn.Module, real: Tensor, fake: Tensor) -> Tensor:
    """WGAN-GP's (‖∇D(x̂)‖₂ - 1)² at random interpolates x̂ of real and fake pairs."""
    alpha = torch.rand(real.shape[0], 1, 1, 1, device=real.device, dtype=real.dtype)
    mixed = (alpha * real + (1 - alpha) * fake).requires_grad_(True)
    scores = discriminator(mixed)
    (gradients,) = torch.autograd.grad(scores.sum(), mixed, create_graph=True)
    return ((gradients.flatten(1).norm(2, dim=1) - 1) ** 2).mean()


def linear_decay(n_epochs: int, n_epochs_decay: int):
    """The reference's schedule: factor 1 for ``n_epochs``, then linearly towards 0 over
    ``n_epochs_decay`` (epoch k, counted from 1, gets 1 - max(0, k - n_epochs) / (n_epochs_decay + 1))."""

    def factor(epoch: int) -> float:
        return 1.0 - max(0, epoch + 1 - n_epochs) / float(n_epochs_decay + 1)

    return factor


@checked_arguments(max_nonfinite_fraction=FRACTION)
class Pix2PixModule(Task):
    """pix2pix: U-Net generator, PatchGAN discriminator, cGAN + λ·L1.

    ``model`` holds ``generator`` and ``discriminator`` configs (the discriminator's input channels
    are the generator's input + output channels and are filled in here); ``optimizer`` is a
    ``_partial_`` optimizer config used for both networks (Adam, lr 2e-4, β=(0.5, 0.999) in the
    reference). ``test_mode``: ``eval`` runs validation/test with running statistics and without
    dropout; ``train`` uses batch statistics and dropout, as the reference does without ``--eval``
    (the module's running statistics are left untouched either way).
    """

    # In the order configure_optimizers returns them (callbacks name curves after these).
    batch_format = "image pairs"
    network_names = ("generator", "discriminator")
    # Weight EMA averages the generator only, the common GAN practice (inference runs it alone).
    averaged_network_names = ("generator",)
    optimizer_names = ("generator", "discriminator")

    def __init__(
        self,
        model: Mapping[str, Any],
        optimizer: Mapping[str, Any],
        gan_mode: str = "vanilla",
        lambda_l1: float = 100.0,
        n_epochs: int = 100,
        n_epochs_decay: int = 100,
        gp_weight: float = 10.0,
        test_mode: str = "eval",
        num_logged_images: int = 8,
        on_nonfinite_loss: str = "stop",
        max_nonfinite_fraction: float = 0.25,
        eval_norm_statistics: str = "population",
    ) -> None:
        super().__init__(on_nonfinite_loss, max_nonfinite_fraction, eval_norm_statistics)
        check_choice("gan_mode", gan_mode, GAN_MODES)
        check_choice("test_mode", test_mode, TEST_MODES)
        for argument, epochs in (("n_epochs", n_epochs), ("n_epochs_decay", n_epochs_decay)):
            if epochs < 0:
                raise ArgumentError(argument, epochs, f"{{key}} must be >= 0, got {epochs}")
        self.automatic_optimization = False
        networks = self.hparams.model
        self.generator: nn.Module = instantiate(networks["generator"])
        pair_channels = networks["generator"]["in_channels"] + networks["generator"]["out_channels"]
        self.discriminator: nn.Module = instantiate(
            networks["discriminator"], in_channels=pair_channels
        )

        metrics = MetricCollection(
            {
                "l1": MeanMetric(),
                "psnr": PeakSignalNoiseRatio(data_range=1.0),
                "ssim": StructuralSimilarityIndexMeasure(data_range=1.0),
            }
        )
        self.val_metrics = metrics.clone(prefix="val/")
        self.test_metrics = metrics.clone(prefix="test/")
        self.val_l1_best = MinMetric()
        self._shown: list[tuple[Tensor, Tensor, Tensor]] = []

    # -- configuration checks ---------------------------------------------------------------------

    @classmethod
    def logged_metrics(cls, gan_mode: str = "vanilla") -> list[str]:
        """Every metric name this task logs (what ``monitor.metric`` and ``optimized_metric`` may
        name); the gradient penalty only with ``gan_mode=wgangp``."""
        losses = ["loss_d", "loss_d_real", "loss_d_fake", "loss_g", "loss_g_gan", "loss_g_l1"]
        if gan_mode == "wgangp":
            losses.append("gradient_penalty")
        quality = [
            f"{stage}/{name}" for stage in ("val", "test") for name in ("l1", "psnr", "ssim")
        ]
        return [*(f"train/{name}" for name in losses), *quality, "val/l1_best"]

    def check_run(self, trainer: pl.Trainer, datamodule: pl.LightningDataModule | None) -> None:
        """Refuse Trainer options that manual optimization cannot honour and images the U-Net
        cannot take, naming the config key."""
        image_size = getattr(datamodule, "image_size", None)
        if image_size is not None:
            try:
                check_image_size(image_size, self.generator.num_downs)
            except ConfigError as error:
                # The aligned data modules give every image crop_size² pixels: name that key too.
                raise ConfigError(f"data.crop_size={image_size}: {error}") from None
            self._check_norm_inputs(image_size, datamodule, trainer)
        if trainer.gradient_clip_val:
            raise ConfigError(
                f"trainer.gradient_clip_val={trainer.gradient_clip_val}: Lightning cannot clip "
                "gradients with pix2pix's manual optimization (two optimizers); set it to null"
            )
        if trainer.accumulate_grad_batches != 1:
            raise ConfigError(
                f"trainer.accumulate_grad_batches={trainer.accumulate_grad_batches}: gradient "
                "accumulation is not supported with pix2pix's manual optimization; set it to 1 "
                "and raise data.batch_size instead"
            )
        total = self.hparams.n_epochs + self.hparams.n_epochs_decay
        if trainer.max_epochs not in (None, -1, total) and not trainer.fast_dev_run:
            log.warning(
                "trainer.max_epochs=%s but task.n_epochs + task.n_epochs_decay = %s: the learning "
                "rate schedule will not end where training does",
                trainer.max_epochs,
                total,
            )

    def _check_norm_inputs(
        self,
        image_size: int | Sequence[int],
        datamodule: pl.LightningDataModule,
        trainer: pl.Trainer | None,
    ) -> None:
        batch_size = getattr(datamodule, "batch_size", 1)
        generator = self.hparams.model["generator"]
        inputs, outputs = generator["in_channels"], generator["out_channels"]
        where = f"data image size {image_size}, data.batch_size={batch_size}"
        size = tuple(image_size) if isinstance(image_size, Sequence) else (image_size, image_size)
        # The summary's FLOPs are the generator's (forward), the network that inference runs.
        self.set_example_input(torch.zeros(1, inputs, *size), trainer)
        for network, channels in ((self.generator, inputs), (self.discriminator, inputs + outputs)):
            shape = (batch_size, channels, *size)
            check_norm_inputs(network, shape, where=where, datamodule=datamodule)

    # -- training ---------------------------------------------------------------------------------

    def forward(self, inputs: Tensor) -> Tensor:
        return self.generator(inputs)

    def forward_for_norm_statistics(self, batch: Mapping[str, Tensor]) -> None:
        """Run both networks on a training batch, for callbacks that measure or recompute their
        norm statistics (``PreciseBN``): the generator on A, the discriminator once on the
        generated pair (A, G(A)) and once on the real pair (A, B), so its statistics weigh the two
        kinds of input it judges equally (training calls it on fakes twice per batch)."""
        real_a, real_b = batch["A"], batch["B"]
        fake_b = self.generator(real_a)
        self.discriminator(torch.cat([real_a, fake_b], dim=1))
        self.discriminator(torch.cat([real_a, real_b], dim=1))

    def inference_network(self, batch: Mapping[str, Tensor]) -> tuple[nn.Module, tuple[Tensor]]:
        """The network to export (``normlab.export``) and its input for ``batch``: the generator
        on A. It is exported in eval mode (running statistics, no dropout), which is how this task
        tests with ``test_mode=eval``; with ``test_mode=train`` it tests with batch statistics
        and dropout instead, which an exported eval-mode network does not reproduce."""
        if self.hparams.test_mode == "train":
            log.warning(
                "task.test_mode=train: the exported generator runs in eval mode (running "
                "statistics, no dropout), unlike this task's validation and test"
            )
        return self.generator, (batch["A"],)

    def training_step(self, batch: Mapping[str, Tensor], batch_idx: int) -> None:
        self.loss_guard.remember(self)
        real_a, real_b = batch["A"], batch["B"]
        opt_g, opt_d = self.optimizers()
        mode = self.hparams.gan_mode
        fake_b = self.generator(real_a)
        real_pair = torch.cat([real_a, real_b], dim=1)
        fake_pair = torch.cat([real_a, fake_b], dim=1)

        with self.toggled_optimizer(opt_d):
            loss_d_fake = gan_loss(self.discriminator(fake_pair.detach()), False, mode)
            loss_d_real = gan_loss(self.discriminator(real_pair), True, mode)
            loss_d = 0.5 * (loss_d_fake + loss_d_real)
            if mode == "wgangp":
                penalty = gradient_penalty(self.discriminator, real_pair, fake_pair.detach())
                loss_d = loss_d + self.hparams.gp_weight * penalty
                self.log("train/gradient_penalty", penalty, batch_size=len(real_a))
            if self.loss_guard.check(self, {"train/loss_d": loss_d}, batch_idx):
                opt_d.zero_grad(set_to_none=True)
                self.manual_backward(loss_d)
                opt_d.step()

        with self.toggled_optimizer(opt_g):
            loss_g_gan = gan_loss(self.discriminator(fake_pair), True, mode)
            loss_g_l1 = F.l1_loss(fake_b, real_b)
            loss_g = loss_g_gan + self.hparams.lambda_l1 * loss_g_l1
            terms = {"train/loss_g_gan": loss_g_gan, "train/loss_g_l1": loss_g_l1}
            if self.loss_guard.check(self, terms, batch_idx):
                opt_g.zero_grad(set_to_none=True)
                self.manual_backward(loss_g)
                opt_g.step()

        size = len(real_a)
        self.log_dict(
            {
                "train/loss_d": loss_d,
                "train/loss_d_real": loss_d_real,
                "train/loss_d_fake": loss_d_fake,
                "train/loss_g_gan": loss_g_gan,
                "train/loss_g_l1": loss_g_l1,
            },
            batch_size=size,
        )
        self.log("train/loss_g", loss_g, prog_bar=True, batch_size=size)

    def on_train_epoch_end(self) -> None:
        super().on_train_epoch_end()
        # Manual optimization: Lightning does not step schedulers itself.
        for scheduler in self.lr_schedulers():
            scheduler.step()

    # -- evaluation -------------------------------------------------------------------------------

    @contextlib.contextmanager
    def test_time_generator(self) -> Iterator[nn.Module]:
        """The generator as ``test_mode`` asks; in ``train`` mode its buffers are restored after."""
        if self.hparams.test_mode == "eval":
            yield self.generator
            return
        saved = {name: buffer.clone() for name, buffer in self.generator.named_buffers()}
        self.generator.train()
        try:
            yield self.generator
        finally:
            self.generator.eval()
            with torch.no_grad():
                for name, buffer in self.generator.named_buffers():
                    buffer.copy_(saved[name])

    def _evaluate(self, batch: Mapping[str, Tensor], stage: str) -> Tensor:
        """Update the ``stage`` metrics of every evaluated model (this one and, with weight
        averaging, its averaged copy); return this model's translations."""
        real_a, real_b = batch["A"], batch["B"]
        outputs = {}
        for suffix, task in self.evaluated_models():
            with task.test_time_generator() as generator:
                fake_b = generator(real_a)
            metrics = getattr(task, f"{stage}_metrics")
            # L1 on the networks' [-1, 1] scale (the training loss); PSNR / SSIM on [0, 1] images.
            metrics["l1"].update(F.l1_loss(fake_b, real_b, reduction="none").flatten(1).mean(1))
            fake_01, real_01 = (fake_b + 1) / 2, (real_b + 1) / 2
            metrics["psnr"].update(fake_01.clamp(0, 1), real_01)
            metrics["ssim"].update(fake_01.clamp(0, 1), real_01)
            outputs[suffix] = fake_b
        return outputs[""]

    def on_validation_epoch_start(self) -> None:
        self._shown.clear()

    def validation_step(self, batch: Mapping[str, Tensor], batch_idx: int) -> None:
        fake_b = self._evaluate(batch, "val")
        room = self.hparams.num_logged_images - sum(len(a) for a, _, _ in self._shown)
        if room > 0:
            self._shown.append(
                (batch["A"][:room].cpu(), fake_b[:room].cpu(), batch["B"][:room].cpu())
            )

    def on_validation_epoch_end(self) -> None:
        self.log_evaluation(
            lambda task: take_values(task.val_metrics),
            best_of="val/l1",
            prog_bar=("val/l1", "val/psnr", "val/ssim"),
        )
        if self.trainer.sanity_checking or not self.trainer.loggers or not self._shown:
            return
        inputs, outputs, targets = (torch.cat(part) for part in zip(*self._shown, strict=True))
        log_image(
            self.trainer.loggers,
            "val/translations",
            translation_grid(inputs, outputs, targets),
            self.global_step,
            caption="input | output | target",
        )

    def test_step(self, batch: Mapping[str, Tensor], batch_idx: int) -> None:
        self._evaluate(batch, "test")

    def on_test_epoch_end(self) -> None:
        self.log_evaluation(lambda task: take_values(task.test_metrics))

    def configure_optimizers(self) -> tuple[list, list]:
        config = self.hparams.optimizer
        opt_g = build_optimizer(config, self.generator, decay_norm_and_bias=True)
        opt_d = build_optimizer(config, self.discriminator, decay_norm_and_bias=True)
        factor = linear_decay(self.hparams.n_epochs, self.hparams.n_epochs_decay)
        schedulers = [torch.optim.lr_scheduler.LambdaLR(opt, factor) for opt in (opt_g, opt_d)]
        return [opt_g, opt_d], schedulers
