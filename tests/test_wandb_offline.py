"""The offline wandb reader: what a run logged comes back, and a half-written log is not 'complete'."""

from __future__ import annotations

import numpy as np
import wandb

from normlab.collect.wandb_runs import read_offline_run


def test_reads_config_history_media_and_completeness(tmp_path):
    run = wandb.init(
        project="normlab-test",
        dir=tmp_path,
        mode="offline",
        config={"norm": {"name": "gn"}},
        group="sweep-1",
        tags=["norm=gn"],
    )
    run.log({"loss": 2.0})
    run.log({"loss": 1.0, "grid": wandb.Image(np.zeros((8, 8, 3), dtype=np.uint8))})
    run.finish()

    read = read_offline_run(tmp_path, wait=60)
    assert read.complete
    assert read.config["norm"] == {"name": "gn"}
    assert [row["loss"] for row in read.history] == [2.0, 1.0]
    assert "grid/_type" in read.history_keys
    assert read.summary["loss"] == 1.0
    assert read.group == "sweep-1" and read.tags == ["norm=gn"]
    assert [path.suffix for path in read.media] == [".png"]

    # Cut anywhere, the log still parses and never claims to be complete.
    log = next(tmp_path.rglob("run-*.wandb"))
    data = log.read_bytes()
    for cut in range(8, len(data), 5):
        log.write_bytes(data[:cut])
        assert not read_offline_run(log).complete
