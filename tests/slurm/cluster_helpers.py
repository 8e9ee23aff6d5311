"""Helpers of the Slurm tests: the local cluster script and its client commands (the entry
point runs through tests/cli.py)."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from cli import REPO_ROOT, offline_env

SCRIPT = REPO_ROOT / "scripts" / "local_slurm.py"


def local_slurm(action: str, directory: Path, env: dict[str, str] | None = None):
    return subprocess.run(
        [sys.executable, str(SCRIPT), action, "--dir", str(directory)],
        capture_output=True,
        text=True,
        timeout=180,
        env=env,
    )


@dataclass
class Cluster:
    directory: Path

    @property
    def conf(self) -> Path:
        return self.directory / "slurm.conf"

    def env(self, **extra: str) -> dict[str, str]:
        return offline_env(SLURM_CONF=str(self.conf), **extra)

    def command(self, *args: str) -> str:
        """A Slurm client command against this cluster; its stdout."""
        result = subprocess.run(
            list(args), env=self.env(), capture_output=True, text=True, timeout=60
        )
        assert result.returncode == 0, result.stderr
        return result.stdout

    def job_states(self, job: str) -> dict[str, str]:
        """``{array task id: state}`` as the scheduler reports them now."""
        listing = self.command(
            "squeue", "--noheader", "--array", "--states=all", "--format=%i|%T", f"--jobs={job}"
        )
        return dict(line.split("|") for line in listing.split())

    def job_field(self, job: str, name: str) -> str:
        text = self.command("scontrol", "show", "job", "--oneliner", job)
        fields = dict(item.split("=", 1) for item in text.split() if "=" in item)
        return fields[name]
