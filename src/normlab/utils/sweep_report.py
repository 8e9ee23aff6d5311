"""What became of each job of a multirun, and one summary when the sweep ends.

A Hydra callback (``hydra.callbacks.sweep_report`` in conf/hydra/default.yaml). Each job writes
its outcome into ``<job dir>/job_outcome.json`` where it ran (in the sweeping process, or in a
process of its own with submitit, possibly on another machine), so the summary reads them back
from the sweep dir rather than from memory. A resumed Optuna study keeps the trials of earlier
invocations in the same sweep dir: the outcomes carry an id of the invocation that ran them.
"""

from __future__ import annotations

import json
import logging
import sys
import uuid
from pathlib import Path
from typing import Any

from hydra.core.utils import JobReturn, JobStatus
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig

from normlab.utils.secrets import mask_secrets

log = logging.getLogger(__name__)

OUTCOME_FILE = "job_outcome.json"


def _failure_line(job_return: JobReturn) -> str:
    # JobReturn.return_value re-raises a failed job's exception; the exception itself is kept in
    # the field behind it.
    error = job_return._return_value
    return str(error) if error is not None else "failed"


class SweepReport(Callback):
    """Records every multirun job as completed or failed (with its one error line) and, when the
    sweep ends, lists the failed jobs and exits with code 1 if there are any."""

    def __init__(self) -> None:
        self.sweep_id = ""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        # Set before the launcher sends this object (pickled) to the jobs' processes.
        self.sweep_id = uuid.uuid4().hex

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs: Any) -> None:
        if config.hydra.mode != RunMode.MULTIRUN:
            return
        failed = job_return.status != JobStatus.COMPLETED
        metric = config.get("optimized_metric")
        # A completed grid job that ended before its first validation returns no value.
        lacks_metric = bool(metric) and not failed and job_return.return_value is None
        outcome = {
            "sweep_id": self.sweep_id,
            "job": int(config.hydra.job.num),
            "overrides": list(config.hydra.overrides.task),
            "status": "failed" if failed else "completed",
            "error": _failure_line(job_return) if failed else None,
            "missing_metric": metric if lacks_metric else None,
        }
        job_dir = Path(config.hydra.runtime.output_dir)
        # The error may quote a value read from a secret; an override may be one.
        (job_dir / OUTCOME_FILE).write_text(json.dumps(mask_secrets(outcome), indent=1) + "\n")

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        outcomes = sorted(
            (o for o in _read_outcomes(sweep_dir) if o["sweep_id"] == self.sweep_id),
            key=lambda outcome: outcome["job"],
        )
        failed = [outcome for outcome in outcomes if outcome["status"] == "failed"]
        _report_missing_metrics(outcomes)
        if not failed:
            log.info("sweep finished: %d of %d jobs completed", len(outcomes), len(outcomes))
            return
        lines = [
            f"normlab: sweep {sweep_dir}: {len(failed)} of {len(outcomes)} jobs failed "
            f"(each job's {OUTCOME_FILE} and log say more):"
        ]
        # What tells the jobs apart: the overrides that not every job of the sweep shares.
        shared = set.intersection(*(set(o["overrides"]) for o in outcomes))
        if len(outcomes) == 1:
            shared = set()
        for outcome in failed:
            own = " ".join(o for o in outcome["overrides"] if o not in shared)
            lines.append(f"normlab:   job {outcome['job']} ({own}): {outcome['error']}")
        print("\n".join(lines), file=sys.stderr)
        sys.exit(1)


def _report_missing_metrics(outcomes: list[dict[str, Any]]) -> None:
    """One warning per metric that completed jobs did not log (``optimized_metric``, which a grid
    does not need), naming the jobs."""
    missing: dict[str, list[str]] = {}
    for outcome in outcomes:
        if outcome.get("missing_metric"):
            missing.setdefault(outcome["missing_metric"], []).append(str(outcome["job"]))
    for metric, jobs in missing.items():
        log.warning(
            "sweep: job%s %s did not log %s (a job that ends before its first validation has none)",
            "s" if len(jobs) > 1 else "",
            ", ".join(jobs),
            metric,
        )


def _read_outcomes(sweep_dir: Path) -> list[dict[str, Any]]:
    outcomes = []
    for path in sweep_dir.rglob(OUTCOME_FILE):
        try:
            outcomes.append(json.loads(path.read_text()))
        except (OSError, ValueError):
            log.warning("unreadable job outcome %s: left out of the summary", path)
    return outcomes
