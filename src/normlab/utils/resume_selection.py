"""Which checkpoint a run starts from (``ckpt_path``, ``resume``) and what it takes from it
(``resume_mode``)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from normlab.errors import ConfigError

log = logging.getLogger(__name__)

# resume=...: whether a run continues from its run dir's newest checkpoint by itself.
RESUME_OPTIONS = ("auto", "never")
# resume_mode=...: what a run takes from the checkpoint it resumes from.
RESUME_MODES = ("continue", "weights")


class UnreadableCheckpoint(ConfigError):
    """A checkpoint file that ``torch.load`` cannot read (truncated, not a checkpoint)."""


def recorded_step(path: Path) -> int:
    """The global step stored in the checkpoint ``path``; UnreadableCheckpoint naming the file if
    it cannot be read. Only the small entries are read (mmap), not the weights."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        return int(checkpoint["global_step"])
    except Exception as error:  # torch raises RuntimeError, EOFError, UnpicklingError, ...
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0][:160]
        raise UnreadableCheckpoint(f"{path} is not a readable checkpoint ({reason})") from error


def newest_checkpoint(candidates: list[Path]) -> tuple[Path, int] | None:
    """The readable checkpoint of ``candidates`` with the highest recorded step (``last.ckpt`` on a
    tie), or None; unreadable files are skipped with a warning. File times are not used: a copied
    run dir has new ones."""
    readable = []
    for path in candidates:
        try:
            readable.append((recorded_step(path), path.name == "last.ckpt", path))
        except UnreadableCheckpoint as error:
            log.warning("%s; skipping it", error)
    if not readable:
        return None
    step, _, path = max(readable)
    return path, step


@dataclass(frozen=True)
class Resume:
    """Where a run starts from: ``path`` (a checkpoint at global ``step``) taken as ``mode``."""

    path: Path
    step: int
    mode: str


def resume_checkpoint(
    ckpt_path: str | None, resume: str | None, run_dir: Path, mode: str = "continue"
) -> Resume | None:
    """The checkpoint a run starts from, or None for a fresh start.

    - ``ckpt_path=<file>``: that file.
    - ``ckpt_path=last``: ``<run dir>/checkpoints/last.ckpt`` (of ``last.ckpt`` and the
      ``last-vN.ckpt`` older versions wrote beside it, the one with the highest step); the run dir
      must be the one to continue (``hydra.run.dir=...``). Unlike Lightning, which starts from
      scratch when it finds no ``last.ckpt``, a missing or unreadable one is an error.
    - ``resume=auto``: the run dir's checkpoint with the highest recorded step, skipping (with a
      warning) any that cannot be read, else a fresh start: one command for a first start and
      every restart (SLURM requeues). Whether that checkpoint is this run's (the same config) is
      checked by the entry point (:func:`normlab.utils.run_identity.check_same_run`).
    - neither: a fresh start, refused in a run dir that already holds checkpoints (another run's
      state, which the new run would mix with its own).

    ``mode``: ``continue`` (the exact state: weights, optimizer, schedule, loops, RNG) or
    ``weights`` (the model's weights and norm buffers only, for a new run in its own dir; needs
    ``ckpt_path``; with ``resume=auto`` a restart continues that new run's own checkpoints).
    """
    checkpoints = run_dir / "checkpoints"
    if resume not in (None, *RESUME_OPTIONS):
        raise ConfigError(f"resume={resume!r} is not one of {', '.join(RESUME_OPTIONS)} (or null)")
    if mode not in RESUME_MODES:
        raise ConfigError(f"resume_mode={mode!r} is not one of {', '.join(RESUME_MODES)}")
    if mode == "weights" and ckpt_path is None:
        raise ConfigError(
            "resume_mode=weights needs ckpt_path=<checkpoint file> (or last): the weights to start "
            "from; resume=auto continues a run with resume_mode=continue"
        )
    if mode == "weights":
        if resume == "auto" and (own := newest_checkpoint(sorted(checkpoints.glob("*.ckpt")))):
            # A restart of a run that began from other weights: it continues its own state.
            log.info("resume=auto: continuing from %s (step %d)", *own)
            return Resume(*own, "continue")
        if any(checkpoints.glob("*.ckpt")):
            raise ConfigError(
                f"resume_mode=weights starts a new run at step 0, but {checkpoints} already holds "
                "a run's checkpoints: give the new run its own dir (another hydra.run.dir, or "
                "none) and ckpt_path=<the old run dir>/checkpoints/last.ckpt"
            )
    if ckpt_path == "last":
        last = checkpoints / "last.ckpt"
        if not last.is_file():
            raise ConfigError(
                f"ckpt_path=last: there is no {last}; continue a run with "
                "hydra.run.dir=<its run dir> ckpt_path=last, or give ckpt_path=<checkpoint file>"
            )
        try:
            recorded_step(last)
        except UnreadableCheckpoint as error:
            raise ConfigError(
                f"ckpt_path=last: {error}; resume=auto (without ckpt_path) continues from the "
                "newest readable checkpoint of the run dir"
            ) from error
        found = newest_checkpoint([last, *checkpoints.glob("last-v*.ckpt")])
        assert found is not None  # last.ckpt itself is readable
        return Resume(*found, mode)
    if ckpt_path is not None:
        path = Path(ckpt_path)
        if not path.is_file():
            raise ConfigError(f"ckpt_path={ckpt_path}: no such checkpoint file")
        try:
            return Resume(path, recorded_step(path), mode)
        except UnreadableCheckpoint as error:
            raise ConfigError(f"ckpt_path={ckpt_path}: {error}") from error
    if resume == "auto":
        found = newest_checkpoint(sorted(checkpoints.glob("*.ckpt")))
        if found is None:
            log.info("resume=auto: no readable checkpoint in %s: starting fresh", checkpoints)
            return None
        log.info("resume=auto: continuing from %s (step %d)", *found)
        return Resume(*found, mode)
    if any(checkpoints.glob("*.ckpt")):
        raise ConfigError(
            f"this command starts a new run, but {checkpoints} already holds a run's checkpoints: "
            "continue that run with resume=auto (or ckpt_path=last), or give the new run its own "
            "dir (another hydra.run.dir, or none)"
        )
    return None


def load_weights(module: torch.nn.Module, path: Path) -> None:
    """Load the weights and buffers (norm running statistics) of the checkpoint ``path`` into
    ``module``, nothing else: ``resume_mode=weights``. A checkpoint of a run with a weight EMA
    (``callbacks=ema``) holds the averaged model in ``state_dict`` and the trained one in
    ``current_model_state``: training goes on from the trained (raw) weights."""
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    raw = "current_model_state" in checkpoint
    try:
        module.load_state_dict(checkpoint["current_model_state" if raw else "state_dict"])
    except (KeyError, RuntimeError) as error:
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0][:200]
        raise ConfigError(
            f"resume_mode=weights: the weights in {path} do not fit this model ({reason})"
        ) from error
    which = (
        "the raw (trained, not averaged) weights and norm buffers, to continue training; its "
        "averaged (EMA) weights are not loaded, a weight EMA of this run starts from the raw ones"
        if raw
        else "the weights and norm buffers"
    )
    log.info(
        "resume_mode=weights: loaded %s of %s; optimizer and schedule start fresh", which, path
    )
