"""Ctrl-C and SIGTERM: one line and exit 130 / 143 (128 + the signal), never a traceback, at any moment.

The first signal raises Interrupted (a KeyboardInterrupt) in the main thread: `finally` blocks close files and
release the run lock on the way out, and the CLI prints one line. Writes are atomic (a temporary file renamed over
the old one), so whatever the moment, the last checkpoint is intact; leftover temporary files are removed the next
time the directory is used. A second signal while the first unwinds (an impatient user, or a job scheduler that
follows SIGTERM with another) exits at once, with the same single line.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading

MESSAGE = "error: interrupted (a run with checkpoints continues with --resume)"


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM received; `exit_code` is 128 + the signal number (130, 143)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


_first: int | None = None
_reported = False


def install() -> dict[int, object]:
    """Handle SIGINT and SIGTERM in this (main) thread; returns the handlers they replace (see restore). A SIGINT
    ignored at start-up (nohup, `cmd &` in a script) stays ignored, as Python itself does."""
    global _first, _reported
    _first, _reported = None, False
    if threading.current_thread() is not threading.main_thread():
        return {}  # only the main thread may set handlers; Python's default KeyboardInterrupt applies there
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    for sig, handler in previous.items():
        if handler is not signal.SIG_IGN or sig == signal.SIGTERM:
            signal.signal(sig, _handler)
    return previous


def restore(previous: dict[int, object]) -> None:
    """Put back the handlers install() replaced (for a program that calls the CLI's main in process)."""
    for sig, handler in previous.items():
        signal.signal(sig, handler)


def _handler(signum: int, frame: object) -> None:
    global _first
    if _first is None:
        _first = signum
        raise Interrupted(signum)
    report()
    os._exit(128 + _first)


def exit_code(e: KeyboardInterrupt) -> int:
    return e.exit_code if isinstance(e, Interrupted) else 130


def report() -> None:
    """Print the one line, once per process."""
    global _reported
    if not _reported:
        _reported = True
        with contextlib.suppress(OSError, ValueError):  # stderr closed: the exit status still says it
            print(MESSAGE, file=sys.stderr, flush=True)
