"""What the entry points (train, eval, export) share: building a run's parts from its config,
reading a normlab checkpoint back, and reporting a failed run in one line."""

from __future__ import annotations

import functools
import importlib
import logging
import pickle
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from hydra.utils import get_class, instantiate
from lightning.pytorch.core.saving import CHECKPOINT_PAST_HPARAMS_KEYS
from omegaconf import DictConfig, OmegaConf

import normlab.data
import normlab.models
import normlab.tasks
from normlab.errors import ConfigError, TrainingError
from normlab.norm.registry import NORMS, DeferredClass
from normlab.ranges import check_choice
from normlab.tasks.base import Task
from normlab.utils.config_keys import config_keys_named
from normlab.utils.hydra_run import CONFIG_DIR
from normlab.utils.run_identity import missing_keys
from normlab.utils.secrets import mask_secrets

log = logging.getLogger(__name__)

# -- a run's parts from its config -----------------------------------------------------------------


def instantiate_group(group: DictConfig | None) -> list:
    """Instantiate every ``_target_`` entry of a config group such as ``callbacks`` or ``logger``."""
    if not group:
        return []
    return [instantiate(node) for node in group.values() if node and "_target_" in node]


def instantiate_data(data_cfg: DictConfig) -> pl.LightningDataModule:
    """The data module of a ``data`` config (``global_batch_size`` is the entry point's, not the
    module's: :func:`~normlab.utils.distributed.split_global_batch` turns it into batch_size)."""
    plain = OmegaConf.to_container(data_cfg, resolve=True)
    plain.pop("global_batch_size", None)
    # The module names its argument (batch_size); the key is data.batch_size, also where the data
    # config came from a checkpoint and the entry point's config does not hold it.
    with config_keys_named(data_cfg, "data"):
        return instantiate(plain)


def import_user_modules(modules: list[str] | None) -> None:
    """Import ``imports=[pkg.module, ...]`` so their ``@register_norm`` (etc.) calls run first."""
    for name in modules or []:
        try:
            importlib.import_module(name)
        except ImportError as error:
            raise ConfigError(f"imports: cannot import {name!r} ({error})") from error


# Model fields that the data module fills in (see fill_from_datamodule).
_FROM_DATA = {"model.num_classes", "model.in_channels"}


def check_required(cfg: DictConfig) -> None:
    """Every ``???`` value must be given before anything runs (the data module's excepted)."""
    missing = sorted(set(missing_keys(cfg)) - _FROM_DATA)
    if missing:
        raise ConfigError(
            f"{', '.join(missing)} must be set, on the command line ({missing[0]}=...) "
            "or in an experiment file"
        )


def fill_from_datamodule(cfg: DictConfig, datamodule: pl.LightningDataModule) -> None:
    """Model fields marked ``???`` (class count, input channels) come from the data."""
    for name in _FROM_DATA:
        key = name.removeprefix("model.")
        if OmegaConf.is_missing(cfg.model, key):
            cfg.model[key] = getattr(datamodule, key)


# -- what a checkpoint may make eval and export build ----------------------------------------------
#
# A checkpoint loads with torch.load(weights_only=True), but the configs it stores name _target_
# callables that Hydra imports and calls: builtins.open or torch.hub.load would run whatever the
# file's author chose. So every target in the stored config and in the hyperparameters Lightning
# rebuilds the task from is checked before anything is built, against what normlab registers (the
# tasks, models and data modules its packages export, the norm registry's factories), the targets
# normlab's own conf/ names, and anything inside a package the user names with imports=[...].


def _dotted_name(obj: Any) -> str:
    if isinstance(obj, DeferredClass):
        return obj.path
    return f"{obj.__module__}.{obj.__qualname__}"


# Keys whose value names a callable to import and call: Hydra's, and the one Lightning's
# load_from_checkpoint reads from the hyperparameters.
TARGET_KEYS = ("_target_", "_instantiator")


def _targets_in(node: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """``(key, target)`` for every target key in a nest of mappings and lists, keys dotted from
    ``prefix`` (``model.norm._target_``)."""
    if isinstance(node, Mapping):
        for key, value in node.items():
            path = f"{prefix}{key}"
            if key in TARGET_KEYS:
                yield path, value
            else:
                yield from _targets_in(value, f"{path}.")
    elif isinstance(node, list | tuple):
        for index, item in enumerate(node):
            yield from _targets_in(item, f"{prefix}{index}.")


@functools.cache
def _conf_targets() -> frozenset[str]:
    targets = set()
    for path in Path(CONFIG_DIR).rglob("*.yaml"):
        stored = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
        targets.update(str(target) for _, target in _targets_in(stored))
    return frozenset(targets)


def normlab_targets() -> frozenset[str]:
    """Every ``_target_`` a checkpoint may name without ``imports=``: the exports of
    ``normlab.tasks``, ``normlab.models`` and ``normlab.data`` (by their package's name and
    their own module's), the registered norm factories and the targets in ``conf/``."""
    targets = set(_conf_targets())
    for package in (normlab.tasks, normlab.models, normlab.data):
        for name in package.__all__:
            targets |= {f"{package.__name__}.{name}", _dotted_name(getattr(package, name))}
    targets.update(_dotted_name(factory) for factory in NORMS.values())
    return frozenset(targets)


def check_targets(
    where: str, *nodes: tuple[str, Any], imports: list[str] | tuple[str, ...] = ()
) -> None:
    """Refuse, naming ``where`` and the key, the first ``_target_`` in ``nodes`` (``(key prefix,
    config)`` pairs) that is neither a normlab target nor inside a package of ``imports``."""
    allowed = normlab_targets()
    packages = tuple(f"{name}." for name in imports)
    for prefix, node in nodes:
        for key, target in _targets_in(node, prefix):
            if isinstance(target, str) and (target in allowed or target.startswith(packages)):
                continue
            raise ConfigError(
                f"{where} {key}={target} is not a normlab target; a checkpoint may build only "
                "normlab's tasks, models, norms and data modules and the targets in its conf/, "
                "or those of a package you name with imports=[...]"
            )


# -- reading a checkpoint back ---------------------------------------------------------------------


# The weights a checkpoint may hold: Lightning's weight-averaging callbacks (EMA) write the
# averaged weights as its state_dict and the trained ones under this key.
WEIGHTS = ("ema", "raw")
RAW_WEIGHTS_KEY = "current_model_state"


# torch.save has written zip archives since torch 1.6; a file that starts like one but does not
# load was cut short or damaged.
_ZIP_MAGIC = b"PK\x03\x04"


def _why_unreadable(path: Path, error: Exception) -> str:
    if path.stat().st_size == 0:
        return "the file is empty"
    if isinstance(error, pickle.UnpicklingError) and "weights_only" in str(error):
        return (
            "it holds objects other than tensors and plain containers, which "
            "torch.load(weights_only=True) refuses to unpickle"
        )
    with path.open("rb") as handle:
        if handle.read(4) != _ZIP_MAGIC:
            return "not a checkpoint written by torch.save"
    first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
    return f"truncated or corrupt ({first_line})"


def _check_trained_imports(ckpt_path: str, trained: Any, imports: list[str]) -> None:
    """A checkpoint never imports code by itself: the packages it was trained with must be named
    again on the command line."""
    trained = trained or []
    if not isinstance(trained, list) or not all(isinstance(name, str) for name in trained):
        raise ConfigError(f"ckpt_path={ckpt_path} stores imports={trained!r}, not a list of names")
    if any(name not in imports for name in trained):
        names = ",".join(dict.fromkeys([*imports, *trained]))
        raise ConfigError(
            f"ckpt_path={ckpt_path} was trained with imports=[{','.join(trained)}], and a "
            f"checkpoint never imports code by itself: name them, imports=[{names}]"
        )


def _read_checkpoint(ckpt_path: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """The whole checkpoint and its normlab record, read without running code."""
    path = Path(ckpt_path)
    if not path.is_file():
        raise ConfigError(f"ckpt_path={ckpt_path} does not exist")
    try:
        # Tensors and plain containers only: unpickling runs no code.
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch reports a bad file as whatever its unpickler hit
        raise ConfigError(
            f"ckpt_path={ckpt_path} cannot be read: {_why_unreadable(path, error)}"
        ) from None
    record = checkpoint.get("normlab") if isinstance(checkpoint, dict) else None
    if not isinstance(record, dict) or not isinstance(record.get("config"), dict):
        raise ConfigError(f"ckpt_path={ckpt_path} was not written by normlab.train (no run config)")
    position = {key: checkpoint.get(key, 0) for key in ("global_step", "epoch")}
    return checkpoint, {**record, **position, "ema_weights": RAW_WEIGHTS_KEY in checkpoint}


def _check_raw_weights(ckpt_path: str, checkpoint: dict[str, Any]) -> None:
    """The trained weights of an EMA checkpoint are loaded into the model: they must be tensors
    by name and nothing else."""
    raw = checkpoint.get(RAW_WEIGHTS_KEY, {})
    if not isinstance(raw, Mapping):
        found = f"a {type(raw).__name__}"
    else:
        bad = [(key, value) for key, value in raw.items() if not isinstance(value, torch.Tensor)]
        bad += [(key, key) for key in raw if not isinstance(key, str)]
        if not bad:
            return
        found = f"{bad[0][0]!r}: a {type(bad[0][1]).__name__}"
    raise ConfigError(
        f"ckpt_path={ckpt_path} {RAW_WEIGHTS_KEY} holds {found}, where only tensors named by "
        "their parameter may be: not a checkpoint normlab.train wrote, refused"
    )


def read_run_record(ckpt_path: str) -> dict[str, Any]:
    """The resolved training config and git SHA stored in a normlab checkpoint, with its
    ``global_step``, ``epoch`` and ``ema_weights`` (whether it holds EMA weights); for comparing it with a config, never for building from it
    (that is :func:`load_run_info`). A ConfigError naming the file when it is missing,
    unreadable or not one of ours."""
    return _read_checkpoint(ckpt_path)[1]


def load_run_info(ckpt_path: str, imports: list[str] | None = None) -> dict[str, Any]:
    """:func:`read_run_record`, once every ``_target_`` it could make eval or export build is
    known to be normlab's or in a package of ``imports`` (imported here; see
    :func:`normlab_targets`); a ConfigError naming the file when it names anything else."""
    imports = list(imports or [])
    checkpoint, record = _read_checkpoint(ckpt_path)
    _check_raw_weights(ckpt_path, checkpoint)
    _check_trained_imports(ckpt_path, record["config"].get("imports"), imports)
    import_user_modules(imports)
    # The stored config, and the hyperparameters load_from_checkpoint rebuilds the task from
    # (under their current and past keys).
    hparams_keys = (pl.LightningModule.CHECKPOINT_HYPER_PARAMS_KEY, *CHECKPOINT_PAST_HPARAMS_KEYS)
    check_targets(
        f"ckpt_path={ckpt_path}",
        ("", record["config"]),
        *((f"{key}.", checkpoint.get(key)) for key in hparams_keys),
        imports=imports,
    )
    return record


# What a model takes from its data, and where the trained config holds it (model.* where the
# model was given it, data.* otherwise).
_DATA_PROPERTIES = {
    "num_classes": "classes",
    "in_channels": "input channels",
    "out_channels": "output channels",
    "image_size": "image size",
}


def _trained_value(trained: DictConfig, name: str) -> Any:
    data_key, data_target = name, OmegaConf.select(trained, "data._target_", default=None)
    if name == "image_size" and data_target:
        # The data module's argument that sets its image size (an aligned module's crop_size).
        data_key = getattr(get_class(data_target), "image_size_option", name)
    for key in (f"model.{name}", f"data.{data_key}"):
        value = OmegaConf.select(trained, key, default=None, throw_on_missing=False)
        if value is not None:
            return value
    return None


def _option_target(path: Path) -> str | None:
    """The ``_target_`` of a group option's file, or of the option of the same group it extends
    (``defaults: [aligned, _self_]``)."""
    node = OmegaConf.load(path)
    if "_target_" in node:
        return node._target_
    for entry in node.get("defaults", []):
        if isinstance(entry, str) and (path.parent / f"{entry}.yaml").is_file():
            return _option_target(path.parent / f"{entry}.yaml")
    return None


def _data_options_giving(batch_format: str) -> list[str]:
    """The ``data=`` options of conf/data/ whose module gives batches of ``batch_format``."""
    options = []
    for path in sorted((CONFIG_DIR / "data").glob("*.yaml")):
        target = _option_target(path)
        if target and getattr(get_class(target), "batch_format", None) == batch_format:
            options.append(path.stem)
    return options


def _check_batch_format(ckpt_path: str, trained: DictConfig, datamodule: object) -> None:
    task = get_class(trained.task._target_)
    takes = getattr(task, "batch_format", None)
    gives = getattr(datamodule, "batch_format", None)
    if takes and gives and takes != gives:
        fitting = "|".join(_data_options_giving(takes))
        raise ConfigError(
            f"ckpt_path={ckpt_path} does not fit the data: its task ({task.__name__}) takes "
            f"{takes}, the data ({type(datamodule).__name__}) gives {gives}; data of its kind: "
            f"data={fitting}"
        )


def check_data_fits(ckpt_path: str, trained: DictConfig, datamodule: object) -> None:
    """Refuse data the checkpoint's model was not trained for (batches of another kind than its
    task takes, another channel count, class count or image size): a model evaluated on it fails
    with a shape error deep inside the network, or worse, runs and reports the accuracy of
    labels it never learned."""
    _check_batch_format(ckpt_path, trained, datamodule)
    for name, what in _DATA_PROPERTIES.items():
        want, got = _trained_value(trained, name), getattr(datamodule, name, None)
        if want is None or got is None or want == got:
            continue
        data = type(datamodule).__name__
        if name == "num_classes" and getattr(datamodule, "class_names", None):
            names = list(datamodule.class_names)
            got = f"{got} ({', '.join(map(str, names[:5]))}{', ...' if len(names) > 5 else ''})"
        hint = ""
        if name == "image_size":
            option = getattr(datamodule, "image_size_option", "image_size")
            hint = f"; set data.{option}={want}"
        raise ConfigError(
            f"ckpt_path={ckpt_path} does not fit the data: its model was trained with {what} "
            f"{want}, the data ({data}) has {what} {got}{hint}"
        )


def chosen_weights(ckpt_path: str, info: dict[str, Any], weights: str | None) -> str:
    """``weights`` (``ema`` or ``raw``) checked against what the checkpoint of ``info``
    (:func:`load_run_info`) holds, and logged; None: ``ema`` where it holds EMA weights, else
    ``raw``."""
    if weights is not None:
        check_choice("weights", weights, WEIGHTS)
    if weights == "ema" and not info["ema_weights"]:
        raise ConfigError(
            f"weights=ema: ckpt_path={ckpt_path} holds no EMA weights (it was trained without "
            "weight averaging); use weights=raw, or leave weights unset"
        )
    if not info["ema_weights"]:
        log.info("weights: raw (the checkpoint holds no EMA weights)")
        return "raw"
    weights = weights or "ema"
    other = "raw" if weights == "ema" else "ema"
    log.info(
        "weights: %s (the checkpoint holds EMA and raw weights; weights=%s for the other)",
        weights,
        other,
    )
    return weights


def load_trained_module(ckpt_path: str, trained: DictConfig, weights: str = "ema") -> Task:
    """The task module of a checkpoint, of the class its training config names, on the CPU;
    ``weights=raw`` loads the trained weights of a checkpoint that holds EMA ones too
    (:func:`chosen_weights`)."""
    module_class = get_class(trained.task._target_)
    if not (isinstance(module_class, type) and issubclass(module_class, Task)):
        raise ConfigError(
            f"ckpt_path={ckpt_path} task._target_={trained.task._target_} is not a normlab task"
        )
    # Its state_dict holds the EMA weights where it holds any, so that is what this loads.
    module = module_class.load_from_checkpoint(ckpt_path, map_location="cpu", weights_only=True)
    if weights == "raw":
        # Only tensors by name (load_run_info checked).
        checkpoint = torch.load(ckpt_path, map_location="cpu", weights_only=True, mmap=True)
        if RAW_WEIGHTS_KEY in checkpoint:
            module.load_state_dict(checkpoint[RAW_WEIGHTS_KEY])
    return module


# -- reporting a failed run ------------------------------------------------------------------------


def reported_error(error: BaseException | None) -> ConfigError | TrainingError | None:
    """The error behind an exception that the user should see as one line (Hydra's instantiate
    wraps what targets raise)."""
    while error is not None:
        if isinstance(error, ConfigError | TrainingError):
            return error
        error = error.__cause__ or error.__context__
    return None


def one_line(reported: ConfigError | TrainingError) -> str:
    """What the user reads for ``reported``: the kind of failure, then the error's message."""
    kind = "training stopped" if isinstance(reported, TrainingError) else "configuration error"
    # A message may quote a config value that came from a secret (data.root=${oc.env:...}).
    return mask_secrets(f"{kind}: {reported}")


def exit_on_config_error(error: Exception) -> None:
    """Report a configuration mistake as one line and exit 2 (a run that had to stop, e.g. on a
    non-finite loss: exit 3); re-raise anything else."""
    reported = reported_error(error)
    if reported is None:
        raise error
    # One line naming the key and what is allowed (or where the run stopped); a traceback
    # would bury it.
    print(f"normlab: {one_line(reported)}", file=sys.stderr)
    sys.exit(3 if isinstance(reported, TrainingError) else 2)
