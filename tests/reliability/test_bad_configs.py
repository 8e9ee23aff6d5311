"""A misconfigured run stops before any data is read, with one line naming the key.

One table of bad configs, each checked as a user meets it: exit code 2 and exactly one line
``normlab: configuration error: <message>`` on stderr, no traceback, nothing trained. Rows marked
``cli`` run ``python -m normlab.train`` in a subprocess (Hydra's own error, a check of the config
alone, a check of the built model); the others run ``train()`` in this process and report
through the same ``exit_on_config_error`` as the entry point, with ``Trainer.fit`` made to fail
if it is reached. A subprocess spends about 8 s of CPU importing torch, Lightning and friends,
so a table of subprocesses alone would take minutes.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import lightning.pytorch as pl
import pytest
from torch import nn

from cli import offline_env, run_train
from normlab.errors import ConfigError
from normlab.norm import build_norm
from normlab.runs import exit_on_config_error
from normlab.tasks.checks import check_norm_inputs
from normlab.train import train

ENV = offline_env(HYDRA_FULL_ERROR="0", OMP_NUM_THREADS="1")
# The small classifier: what the run is does not matter, only that it is refused at once.
SMALL = ("model=densenet_bc_40", "data.image_size=16", "debug=fdr", "logger=csv")
ERROR = "normlab: configuration error: "


@dataclass(frozen=True)
class BadConfig:
    """Overrides (``{tmp}`` is the test's tmp_path) and the text the one error line must hold."""

    overrides: tuple[str, ...]
    message: str
    cli: bool = False


CASES = {
    # 1. Unknown group options, refused before Hydra composes (its own error: 16 lines, exit 1).
    "unknown_experiment": BadConfig(
        ("experiment=nope",),
        "experiment='nope': no such config in conf/experiment/; options: convnext_digits, ",
        cli=True,
    ),
    "unknown_norm_in_a_sweep": BadConfig(
        ("-m", "norm=bn,nope"),
        "norm='nope': no such config in conf/norm/; options: bn, brn, ",
        cli=True,
    ),
    # 2. GroupNorm groups that do not divide a layer's channels.
    "gn_groups": BadConfig(
        (*SMALL, "norm=gn", "norm.num_groups=7"),
        "gn: 24 channels are not divisible by norm.num_groups=7",
    ),
    # 3. A norm that cannot train on the maps it gets: ConvNeXt's last stage is 1×1 at 16 px.
    "instance_norm_on_1x1_maps": BadConfig(
        ("model=convnext_atto", "norm=in", "data.image_size=16", "debug=fdr", "logger=csv"),
        "data.image_size=16, data.batch_size=64: norm layer stages.3.blocks.0.norm "
        "(InstanceNorm2d) gets input of shape (64, 320, 1, 1)",
        cli=True,
    ),
    "instance_norm_in_retinanet_p7": BadConfig(
        ("experiment=retinanet_digits", "model.head_norm=in", "debug=fdr", "logger=csv"),
        "128-px images (model.min_size, data sizes), data.batch_size=8: norm layer "
        "head.classification_head.conv.0.1 (InstanceNorm2d) gets input of shape (8, 128, 1, 1)",
    ),
    # 5. Trainer options that pix2pix's manual optimization cannot honour.
    "pix2pix_accumulation": BadConfig(
        ("experiment=pix2pix_digits", "trainer.accumulate_grad_batches=2", "logger=csv"),
        "trainer.accumulate_grad_batches=2: gradient accumulation is not supported",
    ),
    "pix2pix_clipping": BadConfig(
        ("experiment=pix2pix_digits", "trainer.gradient_clip_val=0.5", "logger=csv"),
        "trainer.gradient_clip_val=0.5: Lightning cannot clip gradients",
    ),
    # 6. Image sides the U-Net cannot halve num_downs times.
    "pix2pix_image_size": BadConfig(
        (
            "experiment=pix2pix_digits",
            "data.image_size=40",
            "data.crop_size=40",
            "data.load_size=48",
            "logger=csv",
        ),
        "data.crop_size=40: image size 40 does not fit model.generator.num_downs=6",
    ),
    # 7. A global batch that does not split evenly over the processes.
    "global_batch_vs_processes": BadConfig(
        (*SMALL, "trainer=ddp_cpu", "data.global_batch_size=7"),
        "data.global_batch_size=7 does not divide by the 2 processes",
    ),
    # 8. Monitored metrics the task never logs.
    "monitor_metric": BadConfig(
        (*SMALL, "monitor.metric=val/accuracy"),
        "monitor.metric='val/accuracy' is not a metric ClassificationModule logs; one of: "
        "test/acc, test/acc_top5, test/loss, train/acc, train/acc_top5, train/loss, val/acc, "
        "val/acc_best, val/acc_top5, val/loss",
        cli=True,
    ),
    "checkpoint_monitor": BadConfig(
        ("experiment=pix2pix_digits", "callbacks.model_checkpoint.monitor=val/psnr_best"),
        "callbacks.model_checkpoint.monitor='val/psnr_best' is not a metric Pix2PixModule logs",
    ),
    "optimized_metric": BadConfig(
        ("experiment=retinanet_digits", "optimized_metric=val/mAP"),
        "optimized_metric='val/mAP' is not a metric DetectionModule logs; one of: "
        "best_model_score, test/map,",
    ),
    # 9. Fewer outputs than the data has categories (read from the annotation json's list).
    "retinanet_num_classes": BadConfig(
        ("experiment=retinanet_digits", "model.num_classes=5", "debug=fdr", "logger=csv"),
        "model.num_classes=5 is smaller than the 10 categories of the data (0, 1, 2, 3, 4, ...)",
    ),
    # 10. data.root that does not exist, for each kind of data module that reads one.
    "cifar_root": BadConfig(
        (*SMALL, "data=cifar10", "data.root={tmp}/nowhere"),
        "data.root: {tmp}/nowhere/cifar-10-batches-py not found",
    ),
    "imagefolder_root": BadConfig(
        (*SMALL, "data=imagefolder", "data.root={tmp}/nowhere"),
        "data.root: {tmp}/nowhere is not a directory",
    ),
    "coco_root": BadConfig(
        ("experiment=retinanet_coco", "trainer=cpu", "data.root={tmp}/nowhere"),
        "data.root: {tmp}/nowhere is not a directory",
    ),
    "facades_root": BadConfig(
        ("experiment=pix2pix_facades", "data.root={tmp}/nowhere"),
        "data.root: {tmp}/nowhere is not a directory",
    ),
    # 11. A required value left at ???.
    "required_root": BadConfig(
        (*SMALL, "data=imagefolder"), "data.root must be set, on the command line"
    ),
    # 12. Values of the wrong type or range.
    "max_epochs_type": BadConfig(
        (*SMALL, "trainer.max_epochs=abc"),
        "trainer.max_epochs must be an integer >= 1, -1 (no limit) or null, got 'abc'",
    ),
    "accumulate_zero": BadConfig(
        (*SMALL, "trainer.accumulate_grad_batches=0"),
        "trainer.accumulate_grad_batches must be an integer >= 1, got 0",
    ),
    "batch_size_zero": BadConfig(
        (*SMALL, "data.batch_size=0"), "data.batch_size must be an integer >= 1, got 0"
    ),
    # Library code names the argument (digit_size[1], gan_mode); the entry point adds the key.
    "digit_size_upper": BadConfig(
        ("experiment=retinanet_digits", "data.digit_size=[20,10]", "debug=fdr", "logger=csv"),
        "data.digit_size[1] must be an integer >= 20, got 10",
    ),
    "pix2pix_gan_mode": BadConfig(
        ("experiment=pix2pix_digits", "task.gan_mode=hinge", "logger=csv"),
        "task.gan_mode='hinge' is not one of vanilla",
    ),
    "pix2pix_discriminator_init_type": BadConfig(
        ("experiment=pix2pix_digits", "model.discriminator.init_type=he", "logger=csv"),
        "model.discriminator.init_type='he' is not one of normal",
    ),
    "seed_type": BadConfig(
        (*SMALL, "seed=abc"), "seed must be an integer (or null for a random seed), got 'abc'"
    ),
    # 13. Norm, model and optimizer numbers outside their valid ranges (the registry's and the
    # constructors' declarations), named by the config key they were given as.
    "norm_eps_negative": BadConfig(
        (*SMALL, "norm.eps=-1"), "norm.eps must be a number > 0, got -1"
    ),
    "ln_eps_zero": BadConfig(
        (*SMALL, "norm=ln", "norm.eps=0"), "norm.eps must be a number > 0, got 0"
    ),
    "norm_momentum": BadConfig(
        (*SMALL, "norm.momentum=2"), "norm.momentum must be null or a number in [0, 1], got 2"
    ),
    "head_norm_eps": BadConfig(
        (
            "experiment=retinanet_digits",
            "model.head_norm={{name:gn,eps:-1}}",
            "debug=fdr",
            "logger=csv",
        ),
        "model.head_norm.eps must be a number > 0, got -1",
    ),
    "convnext_drop_path": BadConfig(
        ("model=convnext_atto", "model.drop_path_rate=1.5", "debug=fdr", "logger=csv"),
        "model.drop_path_rate must be a number in [0, 1), got 1.5",
    ),
    "pix2pix_generator_width": BadConfig(
        ("experiment=pix2pix_digits", "model.generator.ngf=0", "logger=csv"),
        "model.generator.ngf must be an integer >= 1, got 0",
    ),
    "optimizer_lr": BadConfig(
        (*SMALL, "task.optimizer.lr=-1"), "task.optimizer.lr must be a number >= 0, got -1"
    ),
    "optimizer_weight_decay": BadConfig(
        (*SMALL, "task.optimizer.weight_decay=-0.1"),
        "task.optimizer.weight_decay must be a number >= 0, got -0.1",
    ),
    "optimizer_betas": BadConfig(
        (*SMALL, "task/optimizer=adam", "task.optimizer.betas=[0.9,1.0]"),
        "task.optimizer.betas must be two numbers in [0, 1), got [0.9, 1.0]",
    ),
}


def run_cli(*args: str, cwd: Path) -> tuple[int, str, str]:
    result = run_train(*args, cwd=cwd, env=ENV, timeout=300)
    return result.returncode, result.stdout, result.stderr


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_bad_config_stops_at_once_with_one_line(
    case: BadConfig, tmp_path, compose_config, capsys, monkeypatch
):
    overrides = [o.format(tmp=tmp_path) for o in case.overrides]
    message = case.message.format(tmp=tmp_path)
    if case.cli:
        code, stdout, stderr = run_cli(*overrides, cwd=tmp_path)
        assert "Epoch" not in stdout  # no training step ran
    else:
        # Rank 0 publishes its config for other ranks through the environment; keep it local.
        monkeypatch.setenv("NORMLAB_RUN_CONFIG", "")
        monkeypatch.setattr(pl.Trainer, "fit", lambda *a, **k: pytest.fail("training started"))
        cfg = compose_config(*overrides)
        with pytest.raises(SystemExit) as exit_info:
            try:
                train(cfg)
            except Exception as error:
                exit_on_config_error(error)
        code, stderr = exit_info.value.code, capsys.readouterr().err

    assert "Traceback" not in stderr
    errors = [line for line in stderr.splitlines() if line.startswith(ERROR)]
    assert len(errors) == 1, stderr
    assert code == 2
    assert message in errors[0]


def test_syncbn_in_one_process_warns_once_and_the_run_goes_on(tmp_path):
    code, stdout, stderr = run_cli(*SMALL, "norm=syncbn", "test=false", cwd=tmp_path)
    assert code == 0, stderr
    assert (stdout + stderr).count("norm=syncbn, but this run has one process") == 1


def test_trainer_sync_batchnorm_in_one_process_warns_and_trains_as_bn(
    compose_config, caplog, monkeypatch
):
    monkeypatch.setenv("NORMLAB_RUN_CONFIG", "")
    cfg = compose_config(
        *SMALL,
        "trainer.sync_batchnorm=true",
        "test=false",
        "callbacks.progress_bar=null",
        "callbacks.model_summary=null",
    )
    assert train(cfg)["train/loss"] > 0
    warnings = [
        r.getMessage() for r in caplog.records if "nothing to synchronise" in r.getMessage()
    ]
    assert len(warnings) == 1
    assert warnings[0].startswith("trainer.sync_batchnorm=true, but this run has one process")


def test_a_2d_norm_on_pooled_features_is_named():
    """No model here applies a registry norm to features without H and W (ConvNeXt's head
    normalises N×C×1×1 before flattening), but a model that did would be refused like this."""
    head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), build_norm("ln", 8))
    with pytest.raises(
        ConfigError, match=r"norm layer 2 \(Float32LayerNorm2d\) gets input of shape"
    ):
        check_norm_inputs(head, (4, 8, 5, 5), where="test")
