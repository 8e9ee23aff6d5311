"""Which config keys make a run the run it is, and which may change when it is continued.

A resumed run (``resume_mode=continue``) and a resumed Optuna study must be the run or study
they claim to be: the same model, norm, data, task, optimizer, schedule, seed and batch. The
keys that may differ between the first command and a later one are listed in
:data:`TRAJECTORY_NEUTRAL`, an allow-list: any other key, a new one included, counts as changing
the run. A neutral key changes what is logged, where files go, how often a checkpoint is written
or how far the run goes, never the weights it reaches at a given step.
"""

from __future__ import annotations

import copy
import fnmatch
import logging
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from normlab.errors import ConfigError
from normlab.utils.secrets import mask_secrets

log = logging.getLogger(__name__)

# Patterns over dotted config keys (fnmatch); a key is neutral when it or a key above it matches.
TRAJECTORY_NEUTRAL: tuple[str, ...] = (
    # How this command was started, and what it is called.
    "ckpt_path",
    "resume",
    "resume_mode",
    "experiment_name",
    "task_name",
    "tags",
    "job_type",
    # What is logged and where files go.
    "logger",
    "paths",
    "trainer.default_root_dir",
    "callbacks.*.dirpath",
    "trainer.enable_progress_bar",
    "trainer.log_every_n_steps",
    "callbacks.progress_bar",
    "callbacks.model_summary",
    "callbacks.learning_rate_monitor",
    "callbacks.gradient_norm",
    "task.num_misclassified",
    "callbacks.last_checkpoint.every_n_train_steps",
    # How far the run goes: extending it is allowed where the restored learning-rate schedule
    # was not planned for the old budget (normlab.callbacks.ResumeRecord checks that).
    "trainer.max_epochs",
    "trainer.max_steps",
    # Evaluation and loading: samples look the same with any number of workers
    # (normlab.data.samplers.SeededSamples), and evaluation never changes the weights (with
    # task.eval_norm_statistics=batch the eval batch changes the validation metrics only).
    "train",
    "test",
    "optimized_metric",
    "trainer.num_sanity_val_steps",
    "trainer.limit_test_batches",
    "data.eval_batch_size",
    "data.num_workers",
    "data.pin_memory",
)

# Shown for a key one config has and the other has not.
_ABSENT = "<unset>"


def _neutral_root(key: str) -> str | None:
    """The highest key above (or at) the dotted ``key`` that :data:`TRAJECTORY_NEUTRAL` lists."""
    parts = key.split(".")
    for end in range(1, len(parts) + 1):
        prefix = ".".join(parts[:end])
        if any(fnmatch.fnmatchcase(prefix, pattern) for pattern in TRAJECTORY_NEUTRAL):
            return prefix
    return None


def is_trajectory_neutral(key: str) -> bool:
    """Whether the dotted ``key`` (or a key above it) is on :data:`TRAJECTORY_NEUTRAL`."""
    return _neutral_root(key) is not None


def _leaves(value: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """``(dotted key, value)`` for every non-mapping value under ``value``."""
    if isinstance(value, Mapping) and value:
        for key, item in value.items():
            yield from _leaves(item, f"{prefix}.{key}" if prefix else str(key))
    else:
        yield prefix, value


def changed_keys(before: Mapping[str, Any], after: Mapping[str, Any]) -> dict[str, list[Any]]:
    """``{dotted key: [value before, value after]}`` for every value that differs (``<unset>``
    where one side lacks the key), in key order. A value ``???`` in ``after`` (filled from the
    data later) is not compared."""
    old, new = dict(_leaves(before)), dict(_leaves(after))
    changes = {}
    for key in sorted(old.keys() | new.keys()):
        was, now = old.get(key, _ABSENT), new.get(key, _ABSENT)
        if was != now and now != "???":
            changes[key] = [was, now]
    return changes


def _shown(value: Any) -> str:
    text = value if value == _ABSENT else repr(value)
    return text if len(text) <= 60 else f"{text[:57]}..."


def describe(changes: Mapping[str, list[Any]]) -> str:
    """``key old -> new, ...`` for one line."""
    return ", ".join(f"{key} {_shown(old)} -> {_shown(new)}" for key, (old, new) in changes.items())


def check_same_run(
    stored: Mapping[str, Any], requested: Mapping[str, Any], checkpoint: Path
) -> None:
    """Refuse to continue the run of ``checkpoint`` (whose resolved config is ``stored``) with a
    config ``requested`` that changes its trajectory: a ConfigError listing each changed key.
    Trajectory-neutral changes are logged in one line."""
    changes = changed_keys(stored, requested)
    changing = {key: values for key, values in changes.items() if not is_trajectory_neutral(key)}
    if changing:
        raise ConfigError(
            f"resume_mode=continue: {checkpoint} belongs to a run with another config ("
            f"{describe(changing)}); continue it with the config it started with, or start a new "
            f"run from its weights in its own run dir with resume_mode=weights ckpt_path={checkpoint}"
        )
    if changes:
        log.info("resume: changed, without changing the run: %s", _neutral_summary(changes))


def _neutral_summary(changes: Mapping[str, list[Any]]) -> str:
    """Neutral changes grouped under the allow-listed key they fall under (``logger``: 9 values)."""
    groups: dict[str, list[str]] = {}
    for key in changes:
        groups.setdefault(_neutral_root(key) or key, []).append(key)
    parts = []
    for root, keys in groups.items():
        if keys == [root]:
            parts.append(describe({root: changes[root]}))
        else:
            parts.append(f"{root} ({len(keys)} values)")
    return ", ".join(parts)


def requested_config(cfg: DictConfig, stored: Mapping[str, Any]) -> dict[str, Any]:
    """``cfg`` resolved as a run would record it (secrets masked), before the data module is
    built: the values it leaves to the data (``model.num_classes: ???``) are taken from the
    ``stored`` run record's config, which they were filled into."""
    filled = copy.deepcopy(cfg)
    recorded = OmegaConf.create(stored["config"])
    for key in missing_keys(filled):
        OmegaConf.update(filled, key, OmegaConf.select(recorded, key), merge=False)
    return mask_secrets(OmegaConf.to_container(filled, resolve=True))


def missing_keys(node: DictConfig, prefix: str = "") -> Iterator[str]:
    """Keys holding a literal ``???``, found without resolving interpolations."""
    for key in node:
        path = f"{prefix}{key}"
        if OmegaConf.is_missing(node, key):
            yield path
        elif not OmegaConf.is_interpolation(node, key) and isinstance(node[key], DictConfig):
            yield from missing_keys(node[key], f"{path}.")
