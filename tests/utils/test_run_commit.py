"""The commit a run records: '-dirty' for changed code, not for results a study wrote."""

from __future__ import annotations

import subprocess
from pathlib import Path

from normlab.utils.run_info import git_sha


def _git(repo: Path, *args: str) -> str:
    return subprocess.run(
        ["git", "-C", str(repo), *args], capture_output=True, text=True, check=True
    ).stdout.strip()


def test_study_outputs_leave_the_commit_clean_and_code_changes_do_not(tmp_path):
    repo = tmp_path / "repo"
    files = {
        "src/pkg/model.py": "x = 1\n",
        "experiments/study/results.md": "old\n",
        "experiments/study/runs.csv": "run\n",
        "experiments/study/plot.png": "png\n",
        "experiments/bench/norm_cost.md": "old\n",
        "experiments/study/run.py": "y = 1\n",
    }
    for name, text in files.items():
        (repo / name).parent.mkdir(parents=True, exist_ok=True)
        (repo / name).write_text(text)
    _git(tmp_path, "init", "-q", str(repo))
    _git(repo, "add", ".")
    _git(repo, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "init")
    sha = _git(repo, "rev-parse", "HEAD")
    inside = repo / "src" / "pkg"  # git_sha runs from inside the package, not the top
    for name in list(files)[1:5]:
        (repo / name).write_text("new results\n")
    assert git_sha(inside) == sha
    (repo / "experiments/study/run.py").write_text("y = 2\n")  # a study script is code
    assert git_sha(inside) == f"{sha}-dirty"
    _git(repo, "checkout", "--", "experiments/study/run.py")
    (repo / "src/pkg/model.py").write_text("x = 2\n")
    assert git_sha(inside) == f"{sha}-dirty"
