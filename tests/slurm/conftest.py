"""Tests against a live Slurm scheduler: a one-node cluster on this machine
(scripts/local_slurm.py), brought up once for the session and stopped at its end.

Every module here is marked ``slurm`` and run by ``make test-slurm`` (as root, with Debian's
slurm-wlm and munge), never by ``make test``.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from cluster_helpers import Cluster, local_slurm


@pytest.fixture(scope="session")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    directory = tmp_path_factory.mktemp("slurm")
    up = local_slurm("up", directory)
    assert up.returncode == 0, up.stdout + up.stderr
    yield Cluster(directory)
    down = local_slurm("down", directory)
    assert down.returncode == 0, down.stdout + down.stderr
