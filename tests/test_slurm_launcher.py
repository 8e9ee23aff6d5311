"""The Slurm launcher's pieces that need no scheduler (the live tests are in tests/slurm/):
reading squeue, the overrides each job gets and the one-line refusal without Slurm. (The stop at a
batch boundary on the pre-emption signal: tests/reliability/test_interrupts.py.)"""

from __future__ import annotations

from lightning.pytorch.plugins.environments import SLURMEnvironment
from omegaconf import OmegaConf

from hydra_plugins.normlab_launchers.slurm import (
    SchedulerStates,
    _with_slurm_overrides,
    slurm_problem,
)
from normlab.train import _build_trainer


def test_squeue_states_are_read_per_array_task():
    watcher = SchedulerStates()
    watcher.accounting = False
    states = watcher.read_info(b"7_0|COMPLETED\n7_1|RUNNING\n8|FAILED\n")
    assert {job: info["State"] for job, info in states.items()} == {
        "7_0": "COMPLETED",
        "7_1": "RUNNING",
        "8": "FAILED",
    }
    watcher.register_job("7_1")
    watcher._info_dict.update(states)
    assert not watcher.is_done("7_1", mode="cache")
    assert watcher.is_done("8", mode="cache")


def test_each_job_resumes_automatically_unless_the_command_line_chose():
    added = _with_slurm_overrides(["norm=bn"])
    assert added[:2] == ["norm=bn", "resume=auto"]
    assert "StopOnSignal" in added[2] and "SIGUSR2" in added[2]
    for chosen in ("resume=never", "ckpt_path=/x/last.ckpt", "+ckpt_path=last"):
        assert "resume=auto" not in _with_slurm_overrides([chosen])


def test_no_sbatch_on_path_is_named(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    assert slurm_problem().startswith("sbatch, squeue, scontrol not found on PATH")


def test_what_the_launcher_adds_stays_out_of_the_run_name():
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from normlab.utils.hydra_run import CONFIG_DIR

    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
            cfg = compose(
                "config",
                overrides=_with_slurm_overrides(["norm=gn"]),
                return_hydra_config=True,
            )
    finally:
        GlobalHydra.instance().clear()
    assert cfg.resume == "auto"
    assert cfg.callbacks.slurm_preemption.signal_name == "SIGUSR2"
    assert cfg.hydra.job.override_dirname == "norm=gn"


def test_inside_a_slurm_job_lightning_requeues_nothing_itself(monkeypatch):
    for key, value in {
        "SLURM_NTASKS": "1",
        "SLURM_JOB_NAME": "train",
        "SLURM_JOB_ID": "7",
        "SLURM_NODELIST": "localhost",
        "SLURM_PROCID": "0",
        "SLURM_LOCALID": "0",
        "SLURM_NODEID": "0",
    }.items():
        monkeypatch.setenv(key, value)
    cfg = OmegaConf.create(
        {"trainer": {"_target_": "lightning.pytorch.Trainer", "accelerator": "cpu", "devices": 1}}
    )
    trainer = _build_trainer(cfg, callbacks=[], loggers=[])
    environment = trainer._accelerator_connector.cluster_environment
    assert isinstance(environment, SLURMEnvironment)
    assert environment.auto_requeue is False
