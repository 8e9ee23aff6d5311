"""Ctrl-C before a run has started training: one line and exit code 130, not the traceback of
whichever import or set-up step it interrupted. Standard library only, so that it can be in place
before the seconds of imports that an entry point starts with."""

from __future__ import annotations

import signal
import sys
from typing import Any, NoReturn

EXIT_CODE = 128 + signal.SIGINT


def exit_on_interrupt(where: str = "while starting") -> NoReturn:
    """Say in one line that SIGINT stopped the run ``where``, with nothing saved; exit 130."""
    print(f"normlab: interrupted (SIGINT) {where}: nothing was saved", file=sys.stderr)
    raise SystemExit(EXIT_CODE)


def _on_sigint(signum: int, frame: Any) -> NoReturn:
    exit_on_interrupt()


def exit_quietly_on_sigint() -> None:
    """Install the handler: until something else handles SIGINT, Ctrl-C calls
    :func:`exit_on_interrupt`."""
    signal.signal(signal.SIGINT, _on_sigint)
