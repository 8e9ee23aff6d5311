"""Which checkpoint a run continues from (by recorded step; unreadable ones skipped or named, and
only one of the same config), one last.ckpt holding the final state, finished and short runs
that end well, unwritable run dirs refused at start, and the two resume modes (continue, weights)
for every LR schedule."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.utils import instantiate
from omegaconf import OmegaConf

from cli import TINY_DIGITS_RUN as TINY
from normlab.errors import ConfigError
from normlab.train import main, train
from normlab.utils.hydra_run import CONFIG_DIR
from normlab.utils.logs import continue_logs
from normlab.utils.resume_selection import load_weights, resume_checkpoint
from normlab.utils.run_identity import changed_keys, is_trajectory_neutral
from normlab.utils.writable_dirs import WritableRunDir


def fake_checkpoint(path: Path, step: int, mtime: float) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"global_step": step}, path)
    os.utime(path, (mtime, mtime))
    return path


def truncate_half(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def test_resume_auto_takes_the_highest_step_not_the_newest_file(tmp_path):
    checkpoints = tmp_path / "checkpoints"
    # As after `cp -r` of a run dir: file times say nothing about which state is newer.
    fake_checkpoint(checkpoints / "last.ckpt", 80, mtime=1_000)
    fake_checkpoint(checkpoints / "epoch000-step40.ckpt", 40, mtime=2_000)
    resume = resume_checkpoint(None, "auto", tmp_path)
    assert (resume.path.name, resume.step) == ("last.ckpt", 80)
    # Older versions wrote last-vN.ckpt beside last.ckpt: ckpt_path=last takes the newest state.
    fake_checkpoint(checkpoints / "last-v1.ckpt", 90, mtime=500)
    resume = resume_checkpoint("last", None, tmp_path)
    assert (resume.path.name, resume.step) == ("last-v1.ckpt", 90)


def test_a_corrupt_last_ckpt_is_named_or_skipped(tmp_path, caplog):
    checkpoints = tmp_path / "checkpoints"
    last = fake_checkpoint(checkpoints / "last.ckpt", 80, mtime=2_000)
    fake_checkpoint(checkpoints / "epoch000-step40.ckpt", 40, mtime=1_000)
    truncate_half(last)
    with pytest.raises(ConfigError, match=rf"ckpt_path=last: {last} is not a readable checkpoint"):
        resume_checkpoint("last", None, tmp_path)
    with caplog.at_level(logging.WARNING):
        resume = resume_checkpoint(None, "auto", tmp_path)
    assert resume.path.name == "epoch000-step40.ckpt"
    assert f"{last} is not a readable checkpoint" in caplog.text
    with pytest.raises(ConfigError, match=rf"ckpt_path={last}: {last} is not a readable"):
        resume_checkpoint(str(last), None, tmp_path)


def test_resume_mode_is_checked(tmp_path):
    with pytest.raises(ConfigError, match="resume_mode='restart' is not one of continue, weights"):
        resume_checkpoint(None, None, tmp_path, mode="restart")
    with pytest.raises(ConfigError, match="resume_mode=weights needs ckpt_path"):
        resume_checkpoint(None, "auto", tmp_path, mode="weights")
    fake_checkpoint(tmp_path / "checkpoints" / "last.ckpt", 3, mtime=1_000)
    with pytest.raises(ConfigError, match="resume_mode=weights starts a new run at step 0"):
        resume_checkpoint("last", None, tmp_path, mode="weights")
    # A restart of a weights run continues its own checkpoints.
    resume = resume_checkpoint("/elsewhere.ckpt", "auto", tmp_path, mode="weights")
    assert (resume.path.name, resume.mode) == ("last.ckpt", "continue")


def test_an_unwritable_checkpoint_dir_is_refused_before_any_data_is_read(compose_config):
    # Tests run as root, whom chmod does not stop: a regular file where the directory must go
    # makes the write fail for anyone.
    cfg = compose_config(*TINY)
    run_dir = Path(cfg.paths.output_dir)
    run_dir.mkdir(parents=True)
    (run_dir / "checkpoints").write_text("not a directory")
    with pytest.raises(ConfigError, match=rf"{run_dir / 'checkpoints'} is not writable"):
        train(cfg)
    cfg = compose_config(*TINY, run="file/run")
    (Path(cfg.paths.output_dir).parent).write_text("not a directory")
    with pytest.raises(ConfigError, match=r"file/run/checkpoints is not writable .*hydra.run.dir"):
        train(cfg)


def test_max_steps_run_ends_with_its_final_state_in_the_one_last_ckpt_and_exits_0(
    compose_config, caplog
):
    # 5 steps, stopping mid-epoch (8 batches), before the first validation; last.ckpt every 2.
    cfg = compose_config(
        *TINY,
        "trainer.max_epochs=null",
        "trainer.max_steps=5",
        "trainer.limit_train_batches=8",
        "callbacks.last_checkpoint.every_n_train_steps=2",
    )
    with caplog.at_level(logging.WARNING):
        assert main(cfg) is None  # no SystemExit: a run shorter than its first validation is fine
    assert "optimized_metric='val/acc_best' was not logged" in caplog.text
    checkpoints = Path(cfg.paths.output_dir) / "checkpoints"
    assert sorted(path.name for path in checkpoints.glob("last*.ckpt")) == ["last.ckpt"]
    assert torch.load(checkpoints / "last.ckpt", weights_only=True)["global_step"] == 5


def test_a_finished_run_resumed_reports_its_metrics_again_and_trains_nothing(
    compose_config, caplog
):
    cfg = compose_config(*TINY)
    first = main(cfg)
    run_dir = Path(cfg.paths.output_dir)
    rows = (run_dir / "csv" / "metrics.csv").read_text()
    last = run_dir / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=True)["global_step"] == 3
    # The same command again, as a requeue of a finished job or a re-run of the README command.
    for resume in ("resume=auto", "ckpt_path=last"):
        with caplog.at_level(logging.INFO):
            again = main(compose_config(*TINY, resume))
        assert again == first
        assert "run already complete at step 3" in caplog.text
        assert torch.load(last, weights_only=True)["global_step"] == 3
        assert (run_dir / "csv" / "metrics.csv").read_text() == rows  # kept, nothing added


def checkpoint_of(run_dir: Path) -> dict:
    return torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)


SCHEDULES = [
    pytest.param("task/scheduler=onecycle", id="onecycle"),
    pytest.param("task/scheduler=warmup_multistep", id="warmup_multistep", marks=pytest.mark.slow),
    pytest.param("~task/scheduler", id="none", marks=pytest.mark.slow),
]


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_extending_a_finished_run_continue_or_weights(compose_config, schedule):
    first = compose_config(*TINY, schedule)
    train(first)
    first_dir = Path(first.paths.output_dir)
    before = checkpoint_of(first_dir)

    longer = (*TINY, schedule, "trainer.max_epochs=2")
    continued = compose_config(*longer, "ckpt_path=last")
    if schedule.startswith("~"):
        # Without a schedule there is nothing to re-plan: the run goes on to 6 steps, with the
        # optimizer's state carried over (AdamW counts 6 steps).
        train(continued)
        after = checkpoint_of(first_dir)
        assert after["global_step"] == 6
        assert next(iter(after["optimizer_states"][0]["state"].values()))["step"] == 6
    else:
        with pytest.raises(
            ConfigError, match=r"planned for 3 optimizer steps, this run asks for 6"
        ):
            train(continued)
        assert checkpoint_of(first_dir)["global_step"] == 3  # stopped before training

    # weights: a new run in its own dir, at step 0, with a fresh optimizer and a schedule
    # planned for its own 6 steps.
    extended = compose_config(
        *longer,
        f"ckpt_path={first_dir}/checkpoints/last.ckpt",
        "resume_mode=weights",
        run="extended",
    )
    train(extended)
    after = checkpoint_of(Path(extended.paths.output_dir))
    assert after["global_step"] == 6
    assert next(iter(after["optimizer_states"][0]["state"].values()))["step"] == 6
    if not schedule.startswith("~"):
        assert after["resume_record"]["planned_steps"] == 6
    assert before["global_step"] == 3


def test_weights_mode_loads_weights_and_norm_statistics_only(compose_config, tmp_path):
    cfg = compose_config(*TINY)
    cfg.model.num_classes, cfg.model.in_channels = 10, 1
    task = OmegaConf.to_container(cfg.task, resolve=True)
    source = instantiate(task, _recursive_=False)
    for name, buffer in source.named_buffers():
        if name.endswith("running_mean"):
            buffer.normal_()
    path = tmp_path / "source.ckpt"
    torch.save({"state_dict": source.state_dict(), "global_step": 7}, path)
    target = instantiate(task, _recursive_=False)
    load_weights(target, path)
    for (name, a), b in zip(source.state_dict().items(), target.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    other = compose_config(*TINY, "model=densenet_bc_100")
    other.model.num_classes, other.model.in_channels = 10, 1
    mismatched = instantiate(OmegaConf.to_container(other.task, resolve=True), _recursive_=False)
    with pytest.raises(ConfigError, match=rf"the weights in {path} do not fit this model"):
        load_weights(mismatched, path)


@pytest.mark.parametrize(
    ("override", "unwritable"),
    [
        ("hydra.run.dir={tmp}/file/run", "{tmp}/file/run"),
        # The default run dir: ${paths.log_dir}/... through ${hydra:runtime.cwd}, which Hydra
        # resolves only once its config is set.
        ("paths.log_dir={tmp}/file/logs", "{tmp}/file/logs/classification/default/"),
    ],
)
def test_an_unwritable_run_dir_stops_the_command_in_one_line(
    tmp_path, capsys, override, unwritable
):
    (tmp_path / "file").write_text("not a directory")
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        config = compose(
            "config", overrides=[override.format(tmp=tmp_path)], return_hydra_config=True
        )
    with pytest.raises(SystemExit) as stopped:
        WritableRunDir().on_run_start(config=config)
    assert stopped.value.code == 2
    line = capsys.readouterr().err.strip()
    assert line.startswith("normlab: configuration error: ") and "\n" not in line
    assert f"{unwritable.format(tmp=tmp_path)}" in line and "is not writable" in line
    assert "hydra.run.dir" in line


def saved_at(step: int, batch_in_epoch: int, after_batch_end: bool) -> dict:
    """The loop state of a checkpoint written at ``step`` (as Lightning stores it)."""
    processed = batch_in_epoch
    return {
        "global_step": step,
        "loops": {
            "fit_loop": {
                "epoch_loop.batch_progress": {
                    "current": {"processed": processed, "completed": processed - after_batch_end}
                },
                "epoch_loop.state_dict": {"_batches_that_stepped": step - after_batch_end},
            }
        },
    }


def test_resumed_csv_and_tensorboard_logs_continue_from_the_checkpoint(compose_config, tmp_path):
    # Saved at the end of training batch 4 (4 steps), before that batch's values were logged
    # at step 3: the resumed run logs from step 4 on.
    checkpoint = tmp_path / "at4.ckpt"
    torch.save(saved_at(4, 4, after_batch_end=True), checkpoint)
    cfg = compose_config(*TINY, "logger=many")
    continue_logs(cfg.logger, checkpoint)
    assert cfg.logger.csv.keep_before_step == 4 and cfg.logger.tensorboard.purge_step == 4
    torch.save(saved_at(6, 6, after_batch_end=False), checkpoint)  # after a validation
    continue_logs(cfg.logger, checkpoint)
    assert cfg.logger.tensorboard.purge_step == 6

    csv_dir = Path(cfg.paths.output_dir) / "csv"
    csv_dir.mkdir(parents=True)
    # The killed run's file: rows up to step 5, the last one cut short by the kill.
    (csv_dir / "metrics.csv").write_text(
        "epoch,step,train/loss\n0,2,2.5\n0,3,2.4\n0,4,2.3\n0,5,2.2\n0,6"
    )
    logger = instantiate(cfg.logger.csv, keep_before_step=4)
    logger.log_metrics({"train/loss": 2.25, "epoch": 0}, step=4)
    logger.save()
    assert (csv_dir / "metrics.csv").read_text().splitlines() == [
        "epoch,step,train/loss",
        "0,2,2.5",
        "0,3,2.4",
        "0,4,2.25",
    ]


def test_resume_auto_recovers_from_a_corrupt_last_ckpt_and_the_next_save_replaces_it(
    compose_config, caplog
):
    recipe = (*TINY, "~task/scheduler")  # so the run can be extended in continue mode
    cfg = compose_config(*recipe)
    train(cfg)
    last = Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt"
    truncate_half(last)
    with caplog.at_level(logging.WARNING):
        train(compose_config(*recipe, "trainer.max_epochs=2", "resume=auto"))
    assert f"{last} is not a readable checkpoint" in caplog.text
    # It went on from the best checkpoint (step 3) and wrote a whole last.ckpt at step 6.
    assert torch.load(last, weights_only=True)["global_step"] == 6


def test_a_fast_dev_run_writes_no_checkpoint(compose_config):
    cfg = compose_config(*TINY, "debug=fdr")
    train(cfg)
    assert not list((Path(cfg.paths.output_dir) / "checkpoints").glob("*.ckpt"))


# -- a resumed run is the run it claims to be: a new run does not start over another run's
# checkpoints, resume_mode=continue refuses a config that changes the run's trajectory before
# anything is written, and the first command's config record is never overwritten.

# Without a schedule, so that max_epochs may be extended.
RECIPE = (*TINY, "~task/scheduler")


@pytest.fixture
def finished_run(compose_config) -> Path:
    """The run dir of a finished TINY run (3 steps)."""
    cfg = compose_config(*RECIPE)
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
        train(compose_config(*RECIPE, *other))
    # resume=auto continues only a checkpoint of the same config: A's is not B's.
    with pytest.raises(ConfigError) as refused:
        train(compose_config(*RECIPE, *other, "resume=auto"))
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
                train(compose_config(*RECIPE, override, resume, "trainer.max_epochs=2"))
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
        train(compose_config(*RECIPE, *neutral, "resume=auto"))
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
    train(compose_config(*RECIPE, *neutral, "trainer.max_epochs=3", "resume=auto"))
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
