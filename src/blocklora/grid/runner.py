"""The sweep's runner: cells (one `blocklora train` process each) on slots (devices or CPU workers), with a lock per
cell so that sweeps on the same folder share the work; one line per outcome in the manifest. See sweep.py."""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from ..errors import BlockLoRAError

MANIFEST, LOGS, LOCKS = "sweep.jsonl", "logs", ".locks"


@dataclass(frozen=True)
class Cell:
    """One run of the grid. `axes`: the (config key, value as given) pairs of the sweep's method and hyper-parameter
    axes that this cell takes (passed to its train process as key=value); `folder`: their readable name
    ("method=lora,n_blocks=4", sweep.variant_folder), "" for a sweep without such axes."""

    dataset: str
    shots: int
    seed: int
    axes: tuple[tuple[str, str], ...] = ()
    folder: str = ""

    @property
    def name(self) -> str:
        return (f"{self.folder}_" if self.folder else "") + f"{self.dataset}_shots{self.shots}_seed{self.seed}"

    @property
    def label(self) -> str:
        return f"{self.dataset} shots{self.shots} seed{self.seed}" + (f" [{self.folder}]" if self.folder else "")

    def run_dir(self, out: Path) -> Path:
        base = out / self.folder if self.folder else out
        return base / self.dataset / f"shots{self.shots}" / f"seed{self.seed}"


@dataclass(frozen=True)
class Slot:
    name: str  # "gpu 0", "cpu 1"
    env: dict[str, str] = field(default_factory=dict)
    argv: tuple[str, ...] = ()  # extra train options (--device cpu)


@dataclass
class Outcome:
    cell: Cell
    status: str  # done | failed | skipped | busy (another sweep held it until this one stopped) | interrupted
    action: str = ""  # start | resume | overwrite; a skipped cell: waited (another sweep finished it meanwhile)
    returncode: int | None = None
    seconds: float = 0.0
    slot: str = ""
    log: str = ""
    top1: float | None = None
    error: str = ""

def cell_action(run_dir: Path) -> str:
    """skip (finished), start (new), resume (has a checkpoint) or overwrite (leftovers without a checkpoint; train
    clears them only if blocklora made the folder, and names the problem otherwise)."""
    from ..engine.rundir import RunDir  # lazily: engine imports torch, which a sweep itself never needs

    return {"complete": "skip", "absent": "start", "resumable": "resume", "leftover": "overwrite",
            "other": "start"}[RunDir(run_dir).state()]  # "other" (a file there): train names the problem


# -- locks -----------------------------------------------------------------------------------------------------------
def try_lock(path: Path) -> int | None:
    """An fd holding an exclusive flock on `path`, or None when another process (or open file) holds it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)  # never through a link
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    os.ftruncate(fd, 0)
    os.write(fd, f"{socket.gethostname()} {os.getpid()}\n".encode())
    return fd


class Sweep:
    """Runs cells on slots (one thread per slot, each waiting on its train process).

    A cell another sweep holds (its lock is taken) is put back and taken again once every other cell is done: then
    its slot waits for the lock, and finds the cell finished (skipped) or, when the other sweep stopped without
    finishing it, runs it. So every sweep on a folder ends only when the whole grid is finished or has failed, and
    its exit status says so (sweep._report). A problem of the sweep itself (its manifest cannot be written) stops it:
    no new cell starts, the running ones finish, and `errors` names the problem."""

    def __init__(self, cells: Sequence[Cell], slots: Sequence[Slot], out: Path,
                 argv: Callable[[Cell, str, Slot], list[str]], program: Sequence[str] | None = None,
                 manifest: IO[bytes] | None = None, poll: float = 0.5) -> None:
        self.cells, self.slots, self.out, self.argv = list(cells), list(slots), out, argv
        self.program = list(program or [sys.executable, "-m", "blocklora"])
        self.manifest, self.poll = manifest, poll
        self.queue = list(self.cells)  # cells not yet taken; a busy cell goes back to its end
        self.waiting: set[Cell] = set()  # cells found busy once: the next take waits for their lock
        self.outcomes: list[Outcome] = []
        self.errors: list[str] = []  # what stopped the sweep itself (not a cell's own failure)
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.all_done = threading.Event()
        self.left = 0
        self.running: dict[str, subprocess.Popen] = {}
        self.started = time.monotonic()
        self.interrupted = 0  # the exit status an interrupt asks for (130 Ctrl-C, 143 SIGTERM), 0 when none

    def run(self) -> list[Outcome]:
        threads = [threading.Thread(target=self._worker, args=(slot,), name=slot.name, daemon=True)
                   for slot in self.slots]
        self.left = len(threads)
        try:
            for t in threads:
                t.start()
            # An Event, not Thread.join: an interrupted join can mark a live thread as finished (CPython 3.11).
            while not self.all_done.wait(0.2):
                pass
        except KeyboardInterrupt as e:  # Ctrl-C, or a job scheduler's SIGTERM (signals.py)
            from ..cli.signals import exit_code

            self.interrupted = exit_code(e)
            self.stop.set()
            with self.lock:
                for proc in self.running.values():
                    with contextlib.suppress(ProcessLookupError):
                        proc.send_signal(signal.SIGINT)  # train stops cleanly; its checkpoint is kept
            with contextlib.suppress(KeyboardInterrupt):  # a second Ctrl-C: report now
                while not self.all_done.wait(0.2):
                    pass
        return self.outcomes

    def _take(self) -> Cell | None:
        with self.lock:
            if self.stop.is_set() or not self.queue:
                return None
            return self.queue.pop(0)

    def _worker(self, slot: Slot) -> None:
        try:
            while (cell := self._take()) is not None:
                try:
                    outcome = self._run_cell(cell, slot)
                    if outcome is not None:
                        self._finish(outcome)
                except Exception as e:  # noqa: BLE001 - the sweep's own failure: stop it, never lose the thread
                    self._fail(cell, e)
        finally:
            with self.lock:
                self.left -= 1
                if not self.left:
                    self.all_done.set()

    def _fail(self, cell: Cell, e: Exception) -> None:
        where = f": {e.filename}" if isinstance(e, OSError) and getattr(e, "filename", None) else ""
        text = f"{e.strerror or e}{where}" if isinstance(e, OSError) else f"{type(e).__name__}: {e}"
        with self.lock:
            self.errors.append(f"{cell.label}: {text}")
            self.stop.set()  # no new cell: the problem (a full disk, an unwritable manifest) would hit every one

    def _lock_cell(self, cell: Cell) -> int | None:
        """The cell's lock; None when another sweep holds it. A cell found busy before is waited for (polling, so
        that an interrupt or a stopped sweep still ends the wait)."""
        path = self.out / LOCKS / f"{cell.name}.lock"
        fd = try_lock(path)
        if fd is not None or cell not in self.waiting:
            return fd
        print(f"waiting     {cell.label}  (another sweep is running it)", flush=True)
        while fd is None and not self.stop.is_set():
            time.sleep(self.poll)
            fd = try_lock(path)
        return fd

    def _run_cell(self, cell: Cell, slot: Slot) -> Outcome | None:
        run_dir = cell.run_dir(self.out)
        if cell_action(run_dir) == "skip":
            return Outcome(cell, "skipped", top1=_top1(run_dir))
        fd = self._lock_cell(cell)
        if fd is None:
            if cell in self.waiting:  # the sweep stopped while another one held this cell
                return Outcome(cell, "busy")
            with self.lock:  # taken again once the other cells are done
                self.waiting.add(cell)
                self.queue.append(cell)
            return None
        try:
            action = cell_action(run_dir)  # again, under the lock: another sweep may have just finished it
            if action == "skip":
                # "waited": finished by the sweep that held it while this one waited
                return Outcome(cell, "skipped", "waited" if cell in self.waiting else "", top1=_top1(run_dir))
            log_path = self.out / LOGS / f"{cell.name}.log"
            log_path.parent.mkdir(parents=True, exist_ok=True)
            cmd = [*self.program, *self.argv(cell, action, slot)]
            env = {**os.environ, **slot.env, "PYTHONUNBUFFERED": "1", "TQDM_MININTERVAL": "30"}
            t0 = time.monotonic()
            # a regular file only, never through a link (a FIFO there: ENXIO, not a hang); the sweep stops, named
            flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK
            with os.fdopen(os.open(log_path, flags, 0o666), "a") as log:
                log.write(f"=== {_now()} {socket.gethostname()} {slot.name}: {' '.join(cmd)}\n")
                log.flush()
                proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                        pass_fds=(fd,))  # the train process holds the cell's lock too
                with self.lock:
                    self.running[cell.name] = proc
                code = proc.wait()
                with self.lock:
                    self.running.pop(cell.name, None)
            seconds = time.monotonic() - t0
            if code == 0:
                return Outcome(cell, "done", action, code, seconds, slot.name, str(log_path), _top1(run_dir))
            status = "interrupted" if self.stop.is_set() and self.interrupted else "failed"
            return Outcome(cell, status, action, code, seconds, slot.name, str(log_path), error=_last_error(log_path))
        finally:
            os.close(fd)

    def _finish(self, o: Outcome) -> None:
        record = {"time": _now(), "cell": o.cell.name, "dataset": o.cell.dataset, "shots": o.cell.shots,
                  "seed": o.cell.seed, "axes": dict(o.cell.axes), "run_dir": str(o.cell.run_dir(self.out)),
                  "status": o.status, "action": o.action, "returncode": o.returncode, "seconds": round(o.seconds, 1),
                  "slot": o.slot, "log": o.log, "top1": o.top1, "error": o.error, "host": socket.gethostname(),
                  "pid": os.getpid()}
        with self.lock:
            self.outcomes.append(o)
            n = len(self.outcomes)
            print(f"[{n:>{len(str(len(self.cells)))}}/{len(self.cells)}] {_progress(o)}", flush=True)
            # one short line per write, flushed at once: appends of concurrent sweeps do not interleave. An error
            # here (disk full) reaches _worker, which stops the sweep with it.
            line = (json.dumps(record) + "\n").encode()
            if self.manifest is not None:
                self.manifest.write(line)  # unbuffered: one write(2) per line, nothing left to flush at close
            else:
                with open(self.out / MANIFEST, "ab") as fh:
                    fh.write(line)


def _now() -> str:
    return dt.datetime.now().isoformat(timespec="seconds")


def _top1(run_dir: Path) -> float | None:
    from ..engine.rundir import RunDir

    try:
        return float(RunDir(run_dir).read_results().top1)
    except BlockLoRAError:
        return None


def _last_error(log_path: Path) -> str:
    """The train process's one-line error (or its last line) from the end of the log."""
    try:
        with open(log_path, "rb") as fh:
            fh.seek(max(0, fh.seek(0, os.SEEK_END) - 8192))
            lines = [ln.strip() for ln in fh.read().decode(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return ""
    errors = [ln for ln in lines if ln.startswith("error:")]
    return (errors or lines or [""])[-1][:300]


def duration(seconds: float) -> str:
    m, s = divmod(int(round(seconds)), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s" if m else f"{s}s"


def _progress(o: Outcome) -> str:
    head = f"{o.status:<11} {o.cell.label}"
    if o.status == "done":
        how = "" if o.action == "start" else f", {o.action}"
        top1 = f"top-1 {o.top1:.2f}%" if o.top1 is not None else "results.json unreadable"
        return f"{head}  {top1}  ({duration(o.seconds)}, {o.slot}{how})"
    if o.status == "skipped":
        return f"{head}  (finished {'by another sweep' if o.action == 'waited' else 'before'})"
    if o.status == "busy":
        return f"{head}  (another sweep still holds it)"
    return f"{head}  exit {o.returncode}: {o.error or '?'} (log: {o.log})"
