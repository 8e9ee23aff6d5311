"""Notices from dependencies that users cannot act on or did not ask for, silenced where they
come from."""

from __future__ import annotations

import logging
import os
import warnings

# Lightning's INFO lines that say nothing a normlab user needs: its cloud advertisements, that our
# configured RichModelSummary replaces its default, the accelerators it looked for (the trainer
# config names the one used; a GPU left unused is a warning, which stays), and that it reads the
# loader's length for the schedule.
_UNINFORMATIVE = (
    "💡 Tip",
    "Trainer already configured with model summary callbacks",
    "GPU available: ",
    "TPU available: ",
    "Loading `train_dataloader` to estimate number of stepping batches",
)


def _informative(record: logging.LogRecord) -> bool:
    return not record.getMessage().startswith(_UNINFORMATIVE)


def quiet_dependency_warnings() -> None:
    """Silence notices from dependencies that users cannot act on or did not ask for."""
    # wandb's banners (version, where the offline run is, how to sync it: README.md says how) on
    # every run; WANDB_SILENT=false in the environment brings them back.
    os.environ.setdefault("WANDB_SILENT", "true")
    # Through the logger that lightning.pytorch (or, alone, lightning.fabric) sets up.
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        logging.getLogger(name).addFilter(_informative)
    # Lightning's hint to prepend `srun`, given on any machine with Slurm's client tools: a run
    # started without srun here is meant to run in this process (hydra/launcher=slurm starts
    # Slurm jobs itself, and Lightning finds their tasks without the hint).
    warnings.filterwarnings("ignore", message=r"The `srun` command is available on your system")
    # The model summary's size estimate under 16-mixed / bf16-mixed: it says the size is inexact
    # and counts 32 bits a parameter, which is exact, since mixed precision keeps the parameters
    # in float32 (bf16-true and 16-true, which do not, are in its table and not warned about).
    warnings.filterwarnings(
        "ignore", message=r"Precision (bf)?16-mixed is not supported by the model summary"
    )
    # torch's ONNX exporter runs onnxscript's graph passes, which log each rewrite at INFO (~18
    # lines per export that say nothing about the exported file).
    for name in ("onnxscript", "onnx_ir"):
        logging.getLogger(name).setLevel(logging.WARNING)
    # Lightning 2.6's pytree helper trips a torch>=2.10 deprecation on every run.
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")
    # faster-coco-eval prints COCO's whole 12-line summary at INFO after every evaluation; the
    # numbers are logged as metrics anyway.
    logging.getLogger("faster_coco_eval").setLevel(logging.WARNING)
