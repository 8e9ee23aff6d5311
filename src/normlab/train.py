"""Training entry point: ``python -m normlab.train experiment=densenet_digits norm=gn``."""

from __future__ import annotations

from normlab.utils.startup_interrupt import exit_on_interrupt, exit_quietly_on_sigint

if __name__ == "__main__":
    # Ctrl-C during the imports below (seconds): one line, not their traceback.
    exit_quietly_on_sigint()

import functools
import logging
import math
import signal
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

import hydra
import lightning.pytorch as pl
from hydra.utils import instantiate
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.plugins.environments import SLURMEnvironment
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, OmegaConf

from normlab.callbacks import ResumeRecord
from normlab.callbacks.checkpointing import (
    AtomicCheckpointIO,
    RunInfo,
    SaveOnSigterm,
    checkpoint_size_estimate,
    remove_stale_partial_saves,
)
from normlab.callbacks.preemption import StopOnSignal, report_stop
from normlab.errors import ConfigError, JobFailed, TrainingError
from normlab.group_options import refuse_unknown_options
from normlab.norm.lightning_sync_plugin import NormSync
from normlab.runs import (
    check_required,
    exit_on_config_error,
    fill_from_datamodule,
    import_user_modules,
    instantiate_data,
    instantiate_group,
    one_line,
    read_run_record,
    reported_error,
)
from normlab.tasks.base import Task
from normlab.utils.dependency_warnings import quiet_dependency_warnings
from normlab.utils.distributed import (
    inherited_run_config,
    is_rank_zero,
    publish_run_config,
    split_global_batch,
)
from normlab.utils.extras import apply_extras, print_config
from normlab.utils.hydra_run import (
    CONFIG_DIR,
    in_multirun,
    register_resolvers,
    sweeper_reads_metric,
)
from normlab.utils.logs import continue_logs
from normlab.utils.resume_selection import Resume, load_weights, resume_checkpoint
from normlab.utils.run_identity import check_same_run, requested_config
from normlab.utils.run_info import git_sha, save_run_info
from normlab.utils.run_lock import hold_run_dir
from normlab.utils.secrets import mask_secrets, mask_secrets_in_logs, masked_config
from normlab.utils.wandb_logger import attach_wandb_run
from normlab.utils.writable_dirs import check_free_space, check_writable
from normlab.validation import apply_ema_selection, name_config_keys, validate_config

log = logging.getLogger("normlab.train")
register_resolvers()
quiet_dependency_warnings()


def _fit_and_test(
    cfg: DictConfig,
    trainer: pl.Trainer,
    module: pl.LightningModule,
    datamodule: pl.LightningDataModule,
    continuing: Resume | None,
    record: ResumeRecord,
) -> dict[str, float]:
    metrics: dict[str, float] = {}
    if cfg.get("train", True):
        trainer.fit(module, datamodule=datamodule, ckpt_path=continuing and continuing.path)
        if continuing and record.resumed and trainer.global_step == continuing.step:
            # A requeued or repeated command of a run that had finished: not an error, and a
            # sweeper gets the metrics the run ended with.
            log.info("run already complete at step %d: nothing left to train", continuing.step)
            metrics.update(record.resumed["metrics"])
    metrics.update({k: float(v) for k, v in trainer.callback_metrics.items()})
    if cfg.get("test", True):
        best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
        if not best:
            log.warning(
                "no best checkpoint (fast_dev_run or no validation): testing current weights"
            )
        trainer.test(module, datamodule=datamodule, ckpt_path=best or None)
        metrics.update({k: float(v) for k, v in trainer.callback_metrics.items()})
    if best_score := getattr(trainer.checkpoint_callback, "best_model_score", None):
        metrics["best_model_score"] = float(best_score)
    return metrics


def _finish_wandb(loggers: list) -> None:
    if any(isinstance(logger, WandbLogger) for logger in loggers):
        import wandb

        wandb.finish()  # a no-op when no run was started (e.g. fast_dev_run)


def _stop_other_ranks(trainer: pl.Trainer) -> None:
    """After a failure in the launching process, end the processes it started for the other ranks
    (they would otherwise wait in a collective until the process-group timeout)."""
    launcher = getattr(trainer.strategy, "launcher", None)
    if launcher is not None and getattr(launcher, "procs", None):
        launcher.kill(signal.SIGKILL)


def _build_trainer(cfg: DictConfig, callbacks: list, loggers: list) -> pl.Trainer:
    plugins = [AtomicCheckpointIO()]
    if SLURMEnvironment.detect():
        # Pre-emption is ours (USR2 -> last.ckpt -> the launcher requeues, resume=auto); Lightning's
        # own USR1 requeue would write hpc_ckpt files that nothing resumes from.
        plugins.append(SLURMEnvironment(auto_requeue=False))
    options = {}
    if cfg.trainer.get("sync_batchnorm"):
        # Lightning's own option converts to torch.nn.SyncBatchNorm, which refuses CPU tensors.
        plugins.append(NormSync())
        options["sync_batchnorm"] = False
    return instantiate(cfg.trainer, callbacks=callbacks, logger=loggers, plugins=plugins, **options)


@name_config_keys
def train(cfg: DictConfig) -> dict[str, float]:
    """Fit, then test the best checkpoint; return the final metrics."""
    # In a process Lightning launched for another rank: run exactly rank 0's resolved config.
    cfg = inherited_run_config() or cfg
    mask_secrets_in_logs()
    check_required(cfg)
    apply_ema_selection(cfg)
    validate_config(cfg)
    apply_extras(cfg)
    import_user_modules(cfg.get("imports"))
    pl.seed_everything(cfg.seed, workers=True)
    output_dir = Path(cfg.paths.output_dir)
    resume = resume_checkpoint(
        cfg.get("ckpt_path"), cfg.get("resume"), output_dir, cfg.get("resume_mode", "continue")
    )
    continuing = resume if resume is not None and resume.mode == "continue" else None
    # Now, not after an epoch of training (or in Hydra's log setup, for the run dir itself).
    check_writable(output_dir / "checkpoints", "hydra.run.dir")
    if is_rank_zero():  # the processes Lightning starts for other ranks share rank 0's dir
        hold_run_dir(output_dir)
        remove_stale_partial_saves(output_dir / "checkpoints")

    split_global_batch(cfg)
    continued = None
    if continuing is not None:  # before anything is written: the checkpoint must be this run's
        # Compared with the requested config, never built from: no target check needed here.
        continued = read_run_record(str(continuing.path))
        check_same_run(continued["config"], requested_config(cfg, continued), continuing.path)
    datamodule = instantiate_data(cfg.data)
    fill_from_datamodule(cfg, datamodule)
    print_config(cfg)
    # The model is built here, before any data is read, so a bad norm or model fails at once.
    task = OmegaConf.to_container(cfg.task, resolve=True)
    module = instantiate(task, _recursive_=False)
    if not isinstance(module, Task):
        raise ConfigError(f"task._target_={task['_target_']} is not a normlab.tasks.Task")
    if resume is not None and resume.mode == "weights":
        load_weights(module, resume.path)
    if cfg.get("compile"):  # after loading: the weights go into the uncompiled module tree
        module.compile_networks(cfg.compile_mode, cfg.get("compile_regional", False))
    check_free_space(
        output_dir / "checkpoints",
        checkpoint_size_estimate(module),
        "hydra.run.dir",
        "a checkpoint of this model",
    )

    resume_from = continuing and continuing.path
    wandb_id = attach_wandb_run(cfg, output_dir, resume_from, write=is_rank_zero())
    run_record = save_run_info(
        cfg, output_dir, git_sha(), write=is_rank_zero(), continued=continued
    )
    info = {**run_record.info, "wandb_id": wandb_id}
    if is_rank_zero():
        publish_run_config(run_record.config_file)
    record = ResumeRecord()
    saver = SaveOnSigterm(output_dir / "checkpoints")
    callbacks = [
        *instantiate_group(cfg.get("callbacks")),
        RunInfo(info),
        StopOnSignal("SIGINT"),  # Ctrl-C: stop at the next batch and save, as for SIGTERM
        saver,
        record,
    ]
    if continuing is not None:
        continue_logs(cfg.get("logger"), continuing.path)
    # Logger options (run names carry the overrides) with secrets masked, as in the saved config.
    loggers = instantiate_group(masked_config(cfg.get("logger")))
    trainer = _build_trainer(cfg, callbacks, loggers)
    # Tasks refuse Trainer options or data they cannot work with (manual optimization, image
    # sizes) here, naming the config key, rather than deep inside fit().
    module.check_run(trainer, datamodule)
    # The loggers as configured, not trainer.loggers: fast_dev_run swaps those for a dummy, and a
    # debug run or sweep should still leave a wandb run saying what it was.
    for logger in loggers:
        logger.log_hyperparams(
            {**info["config"], "git_sha": info["git_sha"], "overrides": info["overrides"]}
        )

    ctrl_c_before = signal.getsignal(signal.SIGINT)
    try:
        metrics = _fit_and_test(cfg, trainer, module, datamodule, continuing, record)
    except SIGTERMException:
        # Pre-empted or interrupted: last.ckpt was written (SaveOnSigterm) if there was a step to
        # save. Exit as a killed process would, not with 0, so a scheduler does not count the run
        # as finished.
        raise SystemExit(report_stop(trainer, saver, output_dir)) from None
    except BaseException:
        _stop_other_ranks(trainer)
        raise
    finally:
        # Close the wandb run now, not at interpreter exit: multirun jobs share one process,
        # and a reader of the offline run needs it complete.
        _finish_wandb(loggers)
        _restore_ctrl_c(ctrl_c_before)
    if is_rank_zero():
        log.info("run dir: %s", output_dir)
    return metrics


def _restore_ctrl_c(handler: Any) -> None:
    """Leave SIGINT as the run found it. In a Python session that goes on after the run (a
    notebook, a test) the next Ctrl-C must not reach this run's StopOnSignal, which Lightning
    reinstalls at the end of each stage, nor be ignored: Lightning ignores SIGINT after it has
    handled a KeyboardInterrupt."""
    if handler is not None and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, handler)


def fail_sweep_job(error: Exception) -> NoReturn:
    """End a multirun job that failed without ending the sweep: write why into the job's log (the
    one line, or the traceback of an unexpected error) and raise :class:`JobFailed`, which Hydra
    records as the job's result (``SweepReport`` lists it when the sweep ends)."""
    reported = reported_error(error)
    if reported is None:
        log.exception("job failed")
        first_line = next(iter(str(error).splitlines()), "")
        line = mask_secrets(f"{type(error).__name__}: {first_line}")
    else:
        line = one_line(reported)
        log.error("normlab: %s", line)
    raise JobFailed(line) from error


def _group_options_checked_first(entry: Callable[..., Any]) -> Callable[..., Any]:
    """On the command line, refuse unknown group options (``norm=nope``) in one line before Hydra
    composes the config (Hydra's error would list the options over 16 lines, exit code 1)."""

    @functools.wraps(entry)
    def checked(*args: Any, **kwargs: Any) -> Any:
        if not args and not kwargs:  # Hydra is about to read sys.argv
            try:
                refuse_unknown_options(sys.argv[1:])
            except ConfigError as error:
                exit_on_config_error(error)
        return entry(*args, **kwargs)

    return checked


@_group_options_checked_first
@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="config")
def main(cfg: DictConfig) -> float | None:
    """Hydra entry; returns ``cfg.optimized_metric`` for sweepers (Optuna). A single run that
    fails exits (see :func:`exit_on_config_error`); a multirun job that fails is recorded as
    failed and the sweep goes on (see :func:`fail_sweep_job`)."""
    # From here on Ctrl-C is KeyboardInterrupt again: stopped at once before training, saved
    # and stopped at the next batch once a Trainer runs (StopOnSignal).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        metrics = train(cfg)
        name = cfg.get("optimized_metric")
        if name and name not in metrics:
            message = f"optimized_metric={name!r} was not logged; logged: {sorted(metrics)}"
            if sweeper_reads_metric():
                raise ConfigError(message)  # Optuna needs it: the job failed
            # A run (or grid job) shorter than its first validation trained fine: not a failure;
            # a grid's summary lists the jobs without the metric.
            log.warning(message)
        if name in metrics and sweeper_reads_metric() and not math.isfinite(metrics[name]):
            # Optuna cannot store a NaN value: the trial is a failure, not a result.
            raise TrainingError(f"optimized_metric {name}={metrics[name]}")
    except KeyboardInterrupt:
        exit_on_interrupt("before training started")
    except Exception as error:
        if in_multirun():
            fail_sweep_job(error)
        exit_on_config_error(error)
    return metrics.get(name) if name else None


if __name__ == "__main__":
    main()
