"""A resumed run is the run it claims to be: a new run does not start over another run's
checkpoints, ``resume_mode=continue`` refuses a config that changes the run's trajectory before
anything is written, and the first command's config record is never overwritten."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from normlab.errors import ConfigError
from normlab.train import train
from normlab.utils.run_identity import changed_keys, is_trajectory_neutral

# 3 batches of the small DenseNet at 16 px, without a schedule (so max_epochs may be extended).
TINY = (
    "experiment=densenet_digits",
    "model=densenet_bc_40",
    "data.image_size=16",
    "data.batch_size=8",
    "trainer.max_epochs=1",
    "trainer.limit_train_batches=3",
    "trainer.limit_val_batches=1",
    "test=false",
    "logger=csv",
    "~task/scheduler",
    "callbacks.progress_bar=null",
    "callbacks.model_summary=null",
)


@pytest.fixture
def finished_run(compose_config) -> Path:
    """The run dir of a finished TINY run (3 steps)."""
    cfg = compose_config(*TINY)
    train(cfg)
    return Path(cfg.paths.output_dir)


def record_of(run_dir: Path) -> tuple[str, bytes]:
    """What must not change when a resume is refused: the config record and last.ckpt."""
    last = run_dir / "checkpoints" / "last.ckpt"
    return (run_dir / "config_resolved.yaml").read_text(), last.read_bytes()


def test_a_new_run_in_a_dir_with_another_runs_checkpoints_is_refused(compose_config, finished_run):
    # Run A finished in the dir; run B (other lr and seed) is started there without resume.
    before = record_of(finished_run)
    other = ("task.optimizer.lr=0.01", "seed=7")
    with pytest.raises(ConfigError, match=r"this command starts a new run, but .* already holds"):
        train(compose_config(*TINY, *other))
    # resume=auto continues only a checkpoint of the same config: A's is not B's.
    with pytest.raises(ConfigError) as refused:
        train(compose_config(*TINY, *other, "resume=auto"))
    message = str(refused.value)
    assert "belongs to a run with another config" in message
    assert "seed 42 -> 7" in message and "task.optimizer.lr 0.003 -> 0.01" in message
    assert "resume_mode=weights" in message
    assert record_of(finished_run) == before
    assert not (finished_run / "resumes").exists()


# What changes the run (issue 32, point 8) and the key each refusal must name.
CHANGES = [
    ("data.batch_size=16", "data.batch_size 8 -> 16"),
    ("data=fashion_mnist", "data._target_ 'normlab.data.DigitsDataModule' -> "),
    ("task.optimizer.lr=0.1", "task.optimizer.lr 0.003 -> 0.1"),
    ("seed=1", "seed 42 -> 1"),
    ("norm=gn", "norm.name 'bn' -> 'gn'"),
    ("model=densenet_bc_100", "model._target_ 'normlab.models.densenet_bc' -> "),
    ("task/optimizer=sgd", "task.optimizer._target_ 'torch.optim.AdamW' -> 'torch.optim.SGD'"),
    ("+task.scheduler.foo=1", "task.scheduler.foo <unset> -> 1"),  # a key nobody declared
]


def test_continuing_with_a_config_that_changes_the_run_is_refused_before_anything_is_written(
    compose_config, finished_run
):
    before = record_of(finished_run)
    for override, named in CHANGES:
        for resume in ("resume=auto", "ckpt_path=last"):
            with pytest.raises(ConfigError) as refused:
                train(compose_config(*TINY, override, resume, "trainer.max_epochs=2"))
            message = str(refused.value)
            assert named in message, (override, message)
            assert "\n" not in message and "trainer.max_epochs" not in message
            assert record_of(finished_run) == before, override
    assert not (finished_run / "resumes").exists()


def test_neutral_changes_pass_and_each_command_keeps_its_own_config_record(
    compose_config, finished_run, caplog
):
    first_record = (finished_run / "config_resolved.yaml").read_text()
    neutral = (
        "trainer.max_epochs=2",
        "logger=tensorboard",
        "callbacks.progress_bar=null",
        "callbacks.last_checkpoint.every_n_train_steps=1",
        "data.num_workers=0",
    )
    with caplog.at_level(logging.INFO):
        train(compose_config(*TINY, *neutral, "resume=auto"))
    line = next(r.message for r in caplog.records if "without changing the run" in r.message)
    assert "trainer.max_epochs 1 -> 2" in line and "logger (" in line
    assert "callbacks.last_checkpoint.every_n_train_steps 200 -> 1" in line

    # The first command's record stays; the resumed command's config is recorded beside it.
    assert (finished_run / "config_resolved.yaml").read_text() == first_record
    resumed = OmegaConf.load(finished_run / "resumes" / "1" / "config_resolved.yaml")
    assert resumed.trainer.max_epochs == 2 and "tensorboard" in resumed.logger
    assert (finished_run / "resumes" / "1" / "git_sha.txt").is_file()
    # The checkpoints keep the run's first config and list what each later command changed.
    stored = torch.load(finished_run / "checkpoints" / "last.ckpt", weights_only=True)
    assert stored["global_step"] == 6
    assert stored["normlab"]["config"]["trainer"]["max_epochs"] == 1
    (segment,) = stored["normlab"]["resumes"]
    assert segment["changes"]["trainer.max_epochs"] == [1, 2]
    assert "trainer.max_epochs=2" in segment["overrides"]

    # A second resume is checked against the run's first config and recorded as resumes/2.
    train(compose_config(*TINY, *neutral, "trainer.max_epochs=3", "resume=auto"))
    assert (finished_run / "resumes" / "2" / "config_resolved.yaml").is_file()
    stored = torch.load(finished_run / "checkpoints" / "last.ckpt", weights_only=True)
    assert stored["global_step"] == 9 and len(stored["normlab"]["resumes"]) == 2


def test_only_listed_keys_are_trajectory_neutral():
    assert is_trajectory_neutral("logger.wandb.project")
    assert is_trajectory_neutral("callbacks.model_checkpoint.dirpath")
    assert is_trajectory_neutral("trainer.max_epochs")
    for key in ("seed", "data.batch_size", "trainer.accumulate_grad_batches", "model.norm.name"):
        assert not is_trajectory_neutral(key), key
    # A key that no list knows changes the run.
    assert not is_trajectory_neutral("callbacks.new_callback.option")
    assert changed_keys({"a": {"b": 1}}, {"a": {"b": 1, "c": 2}}) == {"a.c": ["<unset>", 2]}
