"""Read an offline wandb run back from disk: config, history rows, summary and media files.

wandb no longer ships a Python reader for its ``run-<id>.wandb`` transaction log. The file is a
7-byte W&B header followed by LevelDB-style log blocks of 32 KiB; each chunk has a 7-byte header
(masked CRC32C, little-endian length, type) and whole records are protobuf ``Record`` messages,
possibly split across blocks as FIRST/MIDDLE/LAST chunks.

``python -m normlab.collect`` reads offline runs with it, and the tests read back what a run
logged.
"""

from __future__ import annotations

import json
import struct
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from wandb.proto import wandb_internal_pb2

_FILE_HEADER = 7
_BLOCK = 32 * 1024
_CHUNK_HEADER = 7
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


@dataclass
class OfflineRun:
    directory: Path
    config: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)
    tags: list[str] = field(default_factory=list)
    group: str = ""
    name: str = ""
    job_type: str = ""
    # True once the run's final `exit` record is on disk: wandb's core process writes the log
    # asynchronously, and may still be writing after `wandb.finish()` has returned.
    complete: bool = False
    # The exit record's code: 0 for a run that ended normally.
    exit_code: int | None = None

    @property
    def history_keys(self) -> set[str]:
        return {key for row in self.history for key in row}

    @property
    def media(self) -> list[Path]:
        return sorted((self.directory / "files" / "media").rglob("*.*"))


def _records(path: Path):
    data = path.read_bytes()
    if not data.startswith(b":W&B"):
        raise ValueError(f"{path} is not a wandb transaction log")
    position, pending = _FILE_HEADER, b""
    while position + _CHUNK_HEADER <= len(data):
        block_left = _BLOCK - (position % _BLOCK)
        if block_left < _CHUNK_HEADER:  # block trailer padding
            position += block_left
            continue
        length, kind = struct.unpack_from("<HB", data, position + 4)
        if position + _CHUNK_HEADER + length > len(data):  # still being written
            return
        payload = data[position + _CHUNK_HEADER : position + _CHUNK_HEADER + length]
        position += _CHUNK_HEADER + length
        if kind == 0 and length == 0:  # zero fill at the end of a block or file
            continue
        if kind == _FULL:
            yield payload
        elif kind == _FIRST:
            pending = payload
        elif kind == _MIDDLE:
            pending += payload
        elif kind == _LAST:
            yield pending + payload
            pending = b""


def _item_key(item) -> str:
    return item.key or "/".join(item.nested_key)


def read_offline_run(run_dir: Path | str, wait: float = 0.0) -> OfflineRun:
    """Parse ``offline-run-*/run-*.wandb`` under ``run_dir`` (the run folder itself or a parent).

    ``wait``: seconds to keep re-reading until the run is complete (its exit record written).
    """
    deadline = time.monotonic() + wait
    while True:
        run = _read_once(Path(run_dir))
        if run.complete or time.monotonic() >= deadline:
            return run
        time.sleep(0.2)


def _read_once(run_dir: Path) -> OfflineRun:
    logs = [run_dir] if run_dir.suffix == ".wandb" else sorted(run_dir.rglob("run-*.wandb"))
    if len(logs) != 1:
        raise FileNotFoundError(f"expected one wandb run under {run_dir}, found {len(logs)}")
    run = OfflineRun(directory=logs[0].parent)
    for raw in _records(logs[0]):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(raw)
        kind = record.WhichOneof("record_type")
        if kind == "history":
            run.history.append(
                {_item_key(i): json.loads(i.value_json) for i in record.history.item}
            )
        elif kind == "config":
            for item in record.config.update:
                run.config[_item_key(item)] = json.loads(item.value_json)
        elif kind == "summary":
            for item in record.summary.update:
                run.summary[_item_key(item)] = json.loads(item.value_json)
        elif kind == "run":
            for item in record.run.config.update:
                run.config[_item_key(item)] = json.loads(item.value_json)
            run.tags = list(record.run.tags)
            run.group = record.run.run_group
            run.name = record.run.display_name
            run.job_type = record.run.job_type
        elif kind == "exit":
            run.complete = True
            run.exit_code = record.exit.exit_code
    return run
