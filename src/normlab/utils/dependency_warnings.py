"""Notices from dependencies that users cannot act on or did not ask for, silenced where they
come from."""

from __future__ import annotations

import logging
import warnings


def _not_an_advertisement(record: logging.LogRecord) -> bool:
    return not record.getMessage().startswith("💡 Tip")


def quiet_dependency_warnings() -> None:
    """Silence notices from dependencies that users cannot act on or did not ask for."""
    # Lightning advertises its cloud services (litlogger, litmodels) at the start of every fit,
    # through the logger that lightning.pytorch (or, alone, lightning.fabric) sets up.
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        logging.getLogger(name).addFilter(_not_an_advertisement)
    # Lightning's hint to prepend `srun`, given on any machine with Slurm's client tools: a run
    # started without srun here is meant to run in this process (hydra/launcher=slurm starts
    # Slurm jobs itself, and Lightning finds their tasks without the hint).
    warnings.filterwarnings("ignore", message=r"The `srun` command is available on your system")
    # torch's ONNX exporter runs onnxscript's graph passes, which log each rewrite at INFO (~18
    # lines per export that say nothing about the exported file).
    for name in ("onnxscript", "onnx_ir"):
        logging.getLogger(name).setLevel(logging.WARNING)
    # Lightning 2.6's pytree helper trips a torch>=2.10 deprecation on every run.
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")
    # faster-coco-eval prints COCO's whole 12-line summary at INFO after every evaluation; the
    # numbers are logged as metrics anyway.
    logging.getLogger("faster_coco_eval").setLevel(logging.WARNING)
