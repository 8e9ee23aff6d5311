"""Start-up checks that stop a misconfigured run before any data is read.

Each mistake raises :class:`~normlab.errors.ConfigError` with one message naming the config key and
what is allowed; the entry point prints it as one line (``normlab.runs.exit_on_config_error``).

- :func:`validate_config` checks what the composed config alone decides (Trainer values, the
  seed, the ranges of norm, model and optimizer arguments, the metrics that checkpoints and
  sweeps monitor, BN synchronisation in a single process).
  ``train()`` calls it before anything is built: several bad Trainer values would otherwise fail
  inside Lightning's constructor with a traceback.
- What needs the built model and data module is checked by the tasks' ``check_run``
  (:mod:`normlab.tasks.checks`).
"""

from __future__ import annotations

import functools
import inspect
import logging
from collections.abc import Callable
from typing import Any, TypeVar

from hydra.utils import get_class, get_object
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from normlab.callbacks.weight_ema import NORM_BUFFERS, WeightEMA
from normlab.errors import ConfigError
from normlab.norm.registry import NORMS, check_arguments, norm_traits, norms_with
from normlab.norm.traits import NormTraits
from normlab.ranges import (
    COUNT,
    DROP_RATE,
    FRACTION,
    NON_NEGATIVE,
    SEED,
    ArgumentError,
    ValueRange,
    check_choice,
    declared_ranges,
    is_int,
    is_number,
)
from normlab.tasks.base import AVERAGED_SUFFIX, Task
from normlab.utils.config_keys import config_keys_named
from normlab.utils.distributed import world_size

log = logging.getLogger(__name__)

# Names the entry point returns to sweepers besides the logged metrics (see normlab.train).
_EXTRA_RESULTS = ("best_model_score",)


def validate_config(cfg: DictConfig) -> None:
    """Check what the config alone decides; raise ConfigError naming the key, or log a warning
    where the run can go on (BN synchronisation asked for in a single process)."""
    _check_trainer_values(cfg.trainer)
    seed = cfg.get("seed")
    if seed is not None and not SEED.allows(seed):
        allowed = SEED if is_int(seed) else "an integer"
        raise ConfigError(f"seed must be {allowed} (or null for a random seed), got {seed!r}")
    _check_ema(cfg)
    _check_argument_ranges(cfg)
    _check_monitored_metrics(cfg)
    _check_compile(cfg)
    _warn_sync_in_one_process(cfg)
    _say_what_sync_batchnorm_syncs(cfg)


# -- Trainer values -------------------------------------------------------------------------------


def _int_from(minimum: int, *, nullable: bool = False) -> Callable[[Any], bool]:
    return lambda v: (nullable and v is None) or (is_int(v) and v >= minimum)


def _batches(value: Any) -> bool:
    """Lightning's limit_*_batches / val_check_interval: a count, or a fraction of the epoch."""
    return value is None or (is_int(value) and value >= 0) or (is_number(value) and 0 <= value <= 1)


_BATCHES = "null, an integer >= 0 (batches) or a fraction in [0, 1] of the epoch"


def _count_or_unlimited(*, nullable: bool) -> Callable[[Any], bool]:
    """A training budget: a count >= 1, or -1 for no limit (0 would train nothing)."""
    return lambda v: (nullable and v is None) or (is_int(v) and v == -1) or COUNT.allows(v)


# The Trainer keys of conf/trainer/*.yaml whose wrong values Lightning reports late or as a
# traceback (max_epochs=abc is accepted by its constructor and fails in the first epoch).
_TRAINER_RULES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "max_epochs": (
        _count_or_unlimited(nullable=True),
        "an integer >= 1, -1 (no limit) or null",
    ),
    "min_epochs": (_int_from(0, nullable=True), "an integer >= 0 or null"),
    "max_steps": (_count_or_unlimited(nullable=False), "an integer >= 1 or -1 (no limit)"),
    "accumulate_grad_batches": (_int_from(1), "an integer >= 1"),
    "gradient_clip_val": (
        lambda v: v is None or (is_number(v) and v >= 0),
        "null (no clipping) or a number >= 0",
    ),
    "log_every_n_steps": (_int_from(1), "an integer >= 1"),
    "check_val_every_n_epoch": (_int_from(1, nullable=True), "an integer >= 1 or null"),
    "num_sanity_val_steps": (_int_from(-1), "an integer >= -1 (-1: the whole val set)"),
    "num_nodes": (_int_from(1), "an integer >= 1"),
    "fast_dev_run": (
        lambda v: isinstance(v, bool) or _int_from(0)(v),
        "true, false or a number of batches >= 0",
    ),
    "limit_train_batches": (_batches, _BATCHES),
    "limit_val_batches": (_batches, _BATCHES),
    "limit_test_batches": (_batches, _BATCHES),
    "val_check_interval": (_batches, _BATCHES),
}


def _check_trainer_values(trainer: DictConfig) -> None:
    for key, (valid, allowed) in _TRAINER_RULES.items():
        if key in trainer and not valid(trainer[key]):
            raise ConfigError(f"trainer.{key} must be {allowed}, got {trainer[key]!r}")
    _check_accelerator(trainer.get("accelerator"))


def _check_accelerator(name: Any) -> None:
    """A GPU accelerator this machine lacks: one line, not Lightning's traceback."""
    from lightning.pytorch.accelerators import CUDAAccelerator, MPSAccelerator

    devices = {"cuda": "CUDA GPU", "mps": "Apple GPU (MPS)", "gpu": "CUDA or Apple (MPS) GPU"}
    if name not in devices:
        return
    cuda, mps = CUDAAccelerator.is_available(), MPSAccelerator.is_available()
    if not {"cuda": cuda, "mps": mps, "gpu": cuda or mps}[name]:
        raise ConfigError(
            f"trainer.accelerator={name}: this machine has no {devices[name]}; use trainer=cpu"
        )


# -- argument ranges ------------------------------------------------------------------------------

# torch.optim's numeric options, by name: torch refuses some only at construction (a traceback
# after the data is set up), and accepts others (betas >= 1, momentum > 1) that diverge.
_OPTIMIZER_RANGES: dict[str, ValueRange] = {
    "lr": NON_NEGATIVE,
    "weight_decay": NON_NEGATIVE,
    "momentum": DROP_RATE,
    "dampening": FRACTION,
    "eps": NON_NEGATIVE,
    "alpha": FRACTION,
}
_BETA = ValueRange(low=0, high=1, high_open=True)


def _is_norm_key(key: str) -> bool:
    return key == "norm" or key.endswith("_norm")


# A value still ``???`` (filled from the data later) or not resolving (reported elsewhere).
_UNSET = object()


def _resolved(node: DictConfig, key: str) -> Any:
    if OmegaConf.is_missing(node, key):
        return _UNSET
    try:
        return node[key]
    except OmegaConfBaseException:
        return _UNSET


def _check_norm_spec(spec: Any, key: str) -> None:
    """The arguments of a norm spec written as a mapping, checked by the registry as building it
    would check them, but naming ``key``. Names not registered yet (``imports=``) are checked
    when built."""
    if not isinstance(spec, DictConfig) or spec.get("name") not in NORMS:
        return
    given = {argument: _resolved(spec, argument) for argument in spec if argument != "name"}
    try:
        check_arguments(spec.name, {a: v for a, v in given.items() if v is not _UNSET})
    except ArgumentError as error:
        raise error.at(f"{key}.{error.argument}") from None


def _target(node: DictConfig) -> Any:
    try:
        return get_object(node["_target_"]) if "_target_" in node else None
    except Exception:  # a bad _target_ is reported when it is instantiated
        return None


def _check_node_ranges(node: DictConfig, prefix: str, ranges: dict[str, ValueRange]) -> None:
    """Every value of ``node`` (a model or one of its networks) against the ranges its
    ``_target_`` declares; norm specs against the registry; nested targets likewise."""
    for key in node:
        path = f"{prefix}.{key}"
        value = _resolved(node, key)
        if _is_norm_key(str(key)):
            _check_norm_spec(value, path)
        elif isinstance(value, DictConfig):
            _check_node_ranges(value, path, dict(declared_ranges(_target(value))))
        elif value is not _UNSET and key in ranges and not ranges[key].allows(value):
            raise ConfigError(f"{path} must be {ranges[key]}, got {value!r}")


def _check_optimizer(node: Any, prefix: str) -> None:
    if not isinstance(node, DictConfig):
        return
    _check_node_ranges(node, prefix, _OPTIMIZER_RANGES)
    betas = _resolved(node, "betas") if "betas" in node else _UNSET
    if betas is not _UNSET and not (
        OmegaConf.is_list(betas) and len(betas) == 2 and all(_BETA.allows(b) for b in betas)
    ):
        shown = list(betas) if OmegaConf.is_list(betas) else betas
        raise ConfigError(f"{prefix}.betas must be two numbers in [0, 1), got {shown!r}")


def _check_argument_ranges(cfg: DictConfig) -> None:
    """Norm, model, task, optimizer and callback arguments outside their valid ranges fail late
    (a traceback in the first step, ``Invalid learning rate``) or not at all (a NaN loss, a run
    that trains nothing). The ranges are declared where the arguments are taken (the norm
    registry, the model, task and callback constructors, ``_OPTIMIZER_RANGES``); here they are
    checked against the config, naming its key. The top-level norm spec goes first:
    ``model.norm`` is usually ``${norm}``."""
    if "norm" in cfg:
        _check_norm_spec(_resolved(cfg, "norm"), "norm")
    model = cfg.get("model")
    if isinstance(model, DictConfig):
        _check_node_ranges(model, "model", dict(declared_ranges(_target(model))))
    task = cfg.get("task")
    if isinstance(task, DictConfig):
        _check_node_ranges(task, "task", dict(declared_ranges(_target(task))))
    if isinstance(task, DictConfig) and "optimizer" in task:
        _check_optimizer(_resolved(task, "optimizer"), "task.optimizer")
    for name, node in (cfg.get("callbacks") or {}).items():
        if isinstance(node, DictConfig):
            _check_node_ranges(node, f"callbacks.{name}", dict(declared_ranges(_target(node))))


# -- monitored metrics ----------------------------------------------------------------------------


def _class_of(node: Any) -> type | None:
    """The class a ``_target_`` config names, or None (instantiating it reports a bad name)."""
    target = node.get("_target_") if isinstance(node, DictConfig) else None
    try:
        return get_class(target) if target else None
    except (ImportError, ValueError):
        return None


def _option(cfg: DictConfig, name: str) -> Any:
    """A task option as ``logged_metrics`` wants it. Where the config leaves it to the data
    (``num_classes: ???``), a data module that fixes it as a class attribute (digits: 10) gives
    it; else None."""
    try:
        value = OmegaConf.select(cfg.task, name, throw_on_missing=True)
    except OmegaConfBaseException:  # ??? or an interpolation to one
        value = None
    if value is None:
        value = getattr(_class_of(cfg.get("data")), name, None)
    return value if isinstance(value, (str, int, float)) else None


def _declared_metrics(cfg: DictConfig) -> list[str] | None:
    """The metric names the configured task logs (its class's ``logged_metrics``, given the
    options it takes from the config), or None if ``task._target_`` names no task class."""
    task_class = _class_of(cfg.task)
    if not (isinstance(task_class, type) and issubclass(task_class, Task)):
        return None
    declare = task_class.logged_metrics
    options = {
        name: value
        for name in inspect.signature(declare).parameters
        if (value := _option(cfg, name)) is not None
    }
    names = declare(**options)
    if _averages_weights(cfg):
        names += task_class.averaged_metrics(names)
    return sorted(names)


def _check_monitored_metrics(cfg: DictConfig) -> None:
    """``monitor.metric``, any literal ``callbacks.<name>.monitor`` and ``optimized_metric`` must
    be metrics the task logs: otherwise checkpointing fails at the first validation, or a sweep
    learns only after a whole run that it optimised nothing."""
    if not isinstance(cfg.get("task"), DictConfig):
        return
    logged = _declared_metrics(cfg)
    if logged is None:
        return
    wanted = [("monitor.metric", OmegaConf.select(cfg, "monitor.metric"))]
    for name, node in (cfg.get("callbacks") or {}).items():
        # `${monitor.metric}` is checked as monitor.metric; report only values set here.
        set_here = isinstance(node, DictConfig) and "monitor" in node
        if set_here and not OmegaConf.is_interpolation(node, "monitor"):
            wanted.append((f"callbacks.{name}.monitor", node.monitor))
    task_name = cfg.task._target_.rsplit(".", 1)[-1]
    for key, metric in wanted:
        if metric is not None and metric not in logged:
            raise ConfigError(
                f"{key}={metric!r} is not a metric {task_name} logs; one of: {', '.join(logged)}"
            )
    optimized = cfg.get("optimized_metric")
    if optimized is not None and optimized not in (*logged, *_EXTRA_RESULTS):
        raise ConfigError(
            f"optimized_metric={optimized!r} is not a metric {task_name} logs; one of: "
            f"{', '.join(sorted((*logged, *_EXTRA_RESULTS)))}"
        )


# -- weight EMA -----------------------------------------------------------------------------------

EMA_SELECTIONS = ("ema", "raw")


def _averages_weights(cfg: DictConfig) -> bool:
    """Whether a configured callback is a :class:`~normlab.callbacks.WeightEMA`."""
    nodes = (cfg.get("callbacks") or {}).values()
    return any(
        isinstance(c := _target(node), type) and issubclass(c, WeightEMA)
        for node in nodes
        if isinstance(node, DictConfig)
    )


def _check_ema(cfg: DictConfig) -> None:
    """The ``ema`` block (``callbacks=ema``) against WeightEMA's ranges and choices, naming
    ``ema.<key>`` (the callback's own keys only repeat them)."""
    ema = cfg.get("ema")
    if not isinstance(ema, DictConfig):
        return
    _check_node_ranges(ema, "ema", dict(declared_ranges(WeightEMA)))
    try:
        check_choice("norm_buffers", ema.get("norm_buffers", "average"), NORM_BUFFERS)
        check_choice("select", ema.get("select", "ema"), EMA_SELECTIONS)
    except ArgumentError as error:
        raise error.at(f"ema.{error.argument}") from None


def apply_ema_selection(cfg: DictConfig) -> None:
    """With ``ema.select=ema`` (``callbacks=ema``'s default) the best checkpoint and the sweeps
    follow the averaged model: ``monitor.metric`` and ``optimized_metric`` get the suffix
    ``_ema`` (``val/acc`` -> ``val/acc_ema``; not training metrics), once; said in one line.
    ``raw`` leaves them."""
    _check_ema(cfg)
    if OmegaConf.select(cfg, "ema.select") != "ema":
        return
    changed = []
    for key in ("monitor.metric", "optimized_metric"):
        name = OmegaConf.select(cfg, key)
        # Training metrics are the raw model's alone; a name already suffixed stays as it is.
        if isinstance(name, str) and not name.endswith(AVERAGED_SUFFIX):
            for averaged in Task.averaged_metrics([name]):
                OmegaConf.update(cfg, key, averaged)
                changed.append(f"{key}={averaged}")
    if changed:
        log.info("ema.select=ema: the averaged model's metrics decide: %s", ", ".join(changed))


# -- BatchNorm synchronisation --------------------------------------------------------------------

# Where a norm spec can ask for synchronised statistics (model.norm and the pix2pix networks'
# norms are ${norm}).
_NORM_KEYS = ("norm", "model.head_norm", "model.fpn_norm")


def _sync_requests(cfg: DictConfig) -> list[str]:
    requests = []
    if OmegaConf.select(cfg, "trainer.sync_batchnorm"):
        requests.append("trainer.sync_batchnorm=true")
    for key in _NORM_KEYS:
        spec = OmegaConf.select(cfg, key)
        name = spec.get("name") if isinstance(spec, DictConfig) else spec
        traits = norm_traits(name) if isinstance(name, str) else None
        switch = traits.syncs_itself if traits is not None else False
        if switch is True:
            requests.append(f"{key}={name}")
        elif switch and isinstance(spec, DictConfig) and spec.get(switch):
            requests.append(f"{key}.{switch}=true")
    return requests


def _warn_sync_in_one_process(cfg: DictConfig) -> None:
    """Synchronised BN in a single process is plain BN: allowed (one config for laptop and
    cluster), but said once, since a user who asked for it may have meant to run DDP."""
    requests = _sync_requests(cfg)
    if not requests or world_size(cfg.trainer) > 1:
        return
    log.warning(
        "%s, but this run has one process (trainer.devices × trainer.num_nodes = 1, strategy "
        "%s): there is nothing to synchronise with, so BatchNorm uses this process's batch "
        "statistics as plain BN does. Use a distributed trainer (e.g. trainer=ddp) to sync.",
        " and ".join(requests),
        OmegaConf.select(cfg, "trainer.strategy", default="auto"),
    )


def _say_what_sync_batchnorm_syncs(cfg: DictConfig) -> None:
    """``trainer.sync_batchnorm=true`` with norms it does not synchronise: one line saying so."""
    if not OmegaConf.select(cfg, "trainer.sync_batchnorm"):
        return
    left: dict[str, str] = {}  # name -> what it does; model.norm is usually ${norm}: said once
    for key in _NORM_KEYS:
        spec = OmegaConf.select(cfg, key)
        name = spec.get("name") if isinstance(spec, DictConfig) else spec
        traits = norm_traits(name) if isinstance(name, str) else None
        if traits is None or traits.syncs or name in left:
            continue
        statistics = "per-process batch" if traits.batch_statistics else "no batch"
        left[name] = f"{key}={name} ({statistics} statistics)"
    if left:
        log.info(
            "trainer.sync_batchnorm=true syncs only BatchNorm-family layers (%s); it leaves %s "
            "as they are",
            ", ".join(norms_with("syncs")),
            ", ".join(left.values()),
        )


# -- torch.compile --------------------------------------------------------------------------------

COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def _named_traits(spec: Any) -> NormTraits | None:
    name = spec.get("name") if isinstance(spec, DictConfig) else spec
    return norm_traits(name) if isinstance(name, str) else None


def _check_compile(cfg: DictConfig) -> None:
    """``compile`` and ``compile_regional`` are switches (the second only with the first) and
    ``compile_mode`` one of torch.compile's modes; a norm that syncs across processes breaks the
    graph at its collective, so compiling it is refused."""
    enabled = cfg.get("compile", False)
    if not isinstance(enabled, bool):
        raise ConfigError(f"compile must be true or false, got {enabled!r}")
    regional = cfg.get("compile_regional", False)
    if not isinstance(regional, bool):
        raise ConfigError(f"compile_regional must be true or false, got {regional!r}")
    mode = cfg.get("compile_mode", "default")
    if mode not in COMPILE_MODES:
        raise ConfigError(f"compile_mode must be one of {', '.join(COMPILE_MODES)}, got {mode!r}")
    if regional and not enabled:
        raise ConfigError("compile_regional=true compiles nothing without compile=true: set both")
    if not enabled or world_size(cfg.trainer) == 1:
        return
    # trainer.sync_batchnorm converts only norms with the syncs trait: with none, nothing syncs.
    converted = any(
        traits is not None and traits.syncs
        for traits in (_named_traits(OmegaConf.select(cfg, key)) for key in _NORM_KEYS)
    )
    requests = [r for r in _sync_requests(cfg) if converted or not r.startswith("trainer.")]
    if requests:
        raise ConfigError(
            f"compile=true with {' and '.join(requests)} in {world_size(cfg.trainer)} processes: "
            "synchronised batch statistics are a collective that torch.compile cannot trace "
            "without a graph break; use compile=false or a norm that does not sync"
        )


# -- library errors named by their config key -----------------------------------------------------

_Result = TypeVar("_Result")


def name_config_keys(run: Callable[[DictConfig], _Result]) -> Callable[[DictConfig], _Result]:
    """Wrap an entry point so that an :class:`~normlab.ranges.ArgumentError` raised under it
    (``gn: 24 channels are not divisible by num_groups=7``) names the config key that set the
    argument (``model.head_norm.num_groups=7``), which the code that raised it cannot know."""

    @functools.wraps(run)
    def named(cfg: DictConfig) -> _Result:
        with config_keys_named(cfg):
            return run(cfg)

    return named
