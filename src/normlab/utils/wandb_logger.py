"""The wandb logger of ``logger=wandb`` (Lightning's, less one setting that only makes noise), and
the run id that lets a resumed run continue its wandb run."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.loggers import WandbLogger as LightningWandbLogger
from omegaconf import DictConfig, open_dict


class WandbLogger(LightningWandbLogger):
    """Lightning's ``WandbLogger``, except that it does not pass ``anonymous`` on to
    ``wandb.init`` unless asked to: Lightning always passes it, and wandb (>= 0.19) ignores the
    setting and prints "The anonymous setting has no effect" for every run."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if self._wandb_init.get("anonymous") is None:
            del self._wandb_init["anonymous"]


def attach_wandb_run(
    cfg: DictConfig, output_dir: Path, resume_from: Path | None, *, write: bool = True
) -> str:
    """Give the run's wandb logger (if any) a run id and return it: the id stored in the resumed
    checkpoint or in ``<run dir>/wandb_id.txt`` when continuing a run (so wandb continues that
    run), else a new one, which is written there (``write``: rank 0 only)."""
    id_file = output_dir / "wandb_id.txt"
    run_id = None
    if resume_from is not None:
        # mmap: only the small "normlab" entry is read, not the weights Lightning loads next.
        checkpoint = torch.load(resume_from, map_location="cpu", weights_only=True, mmap=True)
        stored = checkpoint.get("normlab", {})
        run_id = stored.get("wandb_id")
        if run_id is None and id_file.is_file():
            run_id = id_file.read_text().strip()
    run_id = run_id or uuid.uuid4().hex[:12]  # wandb ids: letters and digits, unique per project
    if write:
        output_dir.mkdir(parents=True, exist_ok=True)
        id_file.write_text(run_id + "\n")
    for node in (cfg.get("logger") or {}).values():
        if node and str(node.get("_target_", "")).endswith("WandbLogger"):
            with open_dict(node):
                node.id = run_id
                node.resume = "allow" if resume_from is not None else None
    return run_id
