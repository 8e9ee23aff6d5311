"""One run at a time in a run dir: an advisory lock on ``<run dir>/.lock``, which holds the
holder's PID and host. Two runs writing one dir would interleave their logs and overwrite each
other's checkpoints."""

from __future__ import annotations

import atexit
import fcntl
import logging
import os
import socket
from pathlib import Path

from normlab.errors import ConfigError

log = logging.getLogger(__name__)

LOCK_FILE = ".lock"


class RunDirLock:
    """The lock of one run dir, held from :meth:`acquire` until :meth:`release` or the end of
    the process (the operating system drops a killed process's ``flock``; its PID stays in the
    file, and the next run says that it takes the lock over)."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir
        self.path = run_dir / LOCK_FILE
        self._fd: int | None = None

    def acquire(self) -> None:
        """Take the lock, or ConfigError naming the dir and the process that holds it."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read(fd) or "another process"
            os.close(fd)
            raise ConfigError(
                f"hydra.run.dir={self.run_dir} is in use by a run that is still going "
                f"({holder}, lock {self.path}); wait for it to end, stop it, or choose another "
                "hydra.run.dir"
            ) from None
        if previous := _read(fd):
            log.info("took over the lock of %s from %s, which has ended", self.run_dir, previous)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        """Empty the file and unlock it (the file stays: deleting a lock file races with a run
        that has just opened it)."""
        if self._fd is None:
            return
        os.ftruncate(self._fd, 0)
        os.close(self._fd)  # drops the flock
        self._fd = None


def _read(fd: int) -> str:
    return os.pread(fd, 256, 0).decode(errors="replace").strip()


# The lock this process holds: a process runs one job at a time (a multirun's jobs one after the
# other, each in its own dir), so taking the lock of a new dir ends the previous job's.
_held: RunDirLock | None = None


def hold_run_dir(run_dir: Path) -> None:
    """Hold ``run_dir``'s lock until this process exits (released then, unless it is killed) or
    takes another run dir's lock (the same dir again, as a resumed run in the same process,
    keeps it)."""
    global _held
    if _held is not None and _held.run_dir.resolve() == run_dir.resolve():
        return
    lock = RunDirLock(run_dir)
    lock.acquire()
    if _held is None:
        atexit.register(_release_held)
    else:
        _held.release()
    _held = lock


def _release_held() -> None:
    if _held is not None:
        _held.release()
