"""``compile=true``: the config switch and its checks, the tasks compiling their networks in place,
and checkpoints of a compiled run that are those of an uncompiled one."""

from __future__ import annotations

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from normlab.errors import ConfigError
from normlab.eval import evaluate
from normlab.export import export
from normlab.runs import fill_from_datamodule, instantiate_data
from normlab.tasks.base import Task
from normlab.validation import COMPILE_MODES, validate_config
from tiny_runs import TASK_OVERRIDES, compose_run, tiny_checkpoint


def test_compile_is_off_by_default_and_composes_with_every_mode(compose_config) -> None:
    cfg = compose_config()
    assert cfg.compile is False and cfg.compile_mode == "default" and cfg.compile_regional is False
    validate_config(compose_config("compile=true", "compile_regional=true"))
    for mode in COMPILE_MODES:
        cfg = compose_config("compile=true", f"compile_mode={mode}")
        validate_config(cfg)
        assert cfg.compile is True and cfg.compile_mode == mode


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            ["compile_mode=fastest"],
            r"compile_mode must be one of default, reduce-overhead, .*'fastest'",
        ),
        (["compile=maybe"], r"compile must be true or false, got 'maybe'"),
        (["compile=true", "compile_regional=1"], r"compile_regional must be true or false, got 1"),
        (["compile_regional=true"], r"compile_regional=true compiles nothing without compile=true"),
        (
            ["compile=true", "trainer=ddp_cpu", "norm=syncbn"],
            r"compile=true with norm=syncbn in 2 processes: .* graph break",
        ),
        (
            ["compile=true", "trainer=ddp_cpu", "norm=cuda_bn", "norm.sync=true"],
            r"compile=true with norm.sync=true in 2 processes: .* graph break",
        ),
        (
            ["compile=true", "trainer=ddp_cpu", "trainer.sync_batchnorm=true"],
            r"compile=true with trainer.sync_batchnorm=true in 2 processes",
        ),
    ],
)
def test_bad_compile_options_are_refused_in_one_line(compose_config, overrides, message) -> None:
    with pytest.raises(ConfigError, match=message):
        validate_config(compose_config(*overrides))


def test_compile_allows_norms_that_do_not_sync_or_a_single_process(compose_config) -> None:
    validate_config(compose_config("compile=true", "trainer=ddp_cpu", "norm=gn"))
    # sync_batchnorm converts only BatchNorm-family norms: with gn it syncs nothing.
    validate_config(
        compose_config("compile=true", "trainer=ddp_cpu", "norm=gn", "trainer.sync_batchnorm=true")
    )
    validate_config(compose_config("compile=true", "norm=syncbn"))  # nothing to sync with


def _task_module(task: str, tmp_path) -> tuple[DictConfig, Task]:
    cfg = compose_run([*TASK_OVERRIDES[task], "compile=true"], "config", tmp_path / "run")
    fill_from_datamodule(cfg, instantiate_data(cfg.data))
    return cfg, instantiate(OmegaConf.to_container(cfg.task, resolve=True), _recursive_=False)


@pytest.mark.parametrize("task", sorted(TASK_OVERRIDES))
def test_each_task_compiles_the_networks_it_trains_in_place(task, tmp_path) -> None:
    cfg, module = _task_module(task, tmp_path)
    keys = list(module.state_dict())
    module.compile_networks(cfg.compile_mode)
    # Compiled lazily, on the first call: nothing is traced here.
    networks = [getattr(module, name) for name in module.network_names]
    assert networks and all(n._compiled_call_impl is not None for n in networks)
    assert sum(p.numel() for n in networks for p in n.parameters()) == sum(
        p.numel() for p in module.parameters()
    )
    assert list(module.state_dict()) == keys


@pytest.mark.parametrize("task", sorted(TASK_OVERRIDES))
def test_regional_compile_compiles_blocks_not_whole_networks(task, tmp_path) -> None:
    cfg, module = _task_module(task, tmp_path)
    keys = list(module.state_dict())
    # It raises Dynamo's process-wide recompile limit; patch() puts the value back.
    with torch._dynamo.config.patch(recompile_limit=torch._dynamo.config.recompile_limit):
        module.compile_networks(cfg.compile_mode, regional=True)
    compiled = [m for m in module.modules() if m._compiled_call_impl is not None]
    assert len(compiled) > len(module.network_names)
    # The pix2pix discriminator repeats nothing and is compiled whole; every other network
    # keeps its own call eager and compiles its blocks.
    whole = [name for name in module.network_names if getattr(module, name) in compiled]
    assert whole == (["discriminator"] if task == "pix2pix" else [])
    assert list(module.state_dict()) == keys


@pytest.mark.slow
def test_a_compiled_runs_checkpoint_is_an_uncompiled_runs_and_eval_and_export_load_it(
    tmp_path, compose_config
) -> None:
    compiled = tiny_checkpoint("classification", tmp_path / "compiled", "compile=true")
    plain = tiny_checkpoint("classification", tmp_path / "plain")
    compiled_state = torch.load(compiled, map_location="cpu", weights_only=False)["state_dict"]
    plain_state = torch.load(plain, map_location="cpu", weights_only=False)["state_dict"]
    assert list(compiled_state) == list(plain_state)
    assert not any("_orig_mod" in key for key in compiled_state)

    eval_cfg = compose_config(f"ckpt_path={compiled}", "logger=csv", config_name="eval", run="eval")
    metrics = evaluate(eval_cfg)
    assert 0.0 <= metrics["test/acc"] <= 1.0

    # Export reads it as it reads an uncompiled run's: the same norms folded, and the exported
    # file computes what the checkpoint's eval model does.
    reports = [
        export(compose_config(f"ckpt_path={path}", config_name="export", run=f"export_{name}"))
        for name, path in (("compiled", compiled), ("plain", plain))
    ]
    assert reports[0]["folding"]["folded"] == reports[1]["folding"]["folded"]
    assert reports[0]["max_abs_difference_exported"] < 1e-4
