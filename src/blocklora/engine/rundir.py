"""A run directory: the only code that knows its file names and the rules for creating, reusing and clearing it.

    DIR/.blocklora      marker: blocklora made this folder (ownership.py)
    DIR/.lock           flock-ed by the run writing to DIR; holds who that is (pid, command, start)
    DIR/config.json     the resolved configuration        DIR/split.json     the K-shot split (verbatim if given)
    DIR/metrics.jsonl   one line per training step        DIR/train.log      the run's log
    DIR/checkpoint.pt   resumable state (removed once the run is complete)
    DIR/adapter/        the trained adapter               DIR/results.json   written last: the run is complete
    DIR/predictions.csv, DIR/confusion.png, DIR/curve.png   per-image test predictions, confusion matrix and
                        training curve (engine/predictions.py; the plots need matplotlib)
    DIR/examples/, DIR/demo.png                           the demo's extras (its example images and plot)
    DIR/tensorboard/    TensorBoard scalars (train.log=tensorboard; engine/tensorboard.py)

Rules (`RunDir.open_for`, which writes nothing): a new path is created, never inside one of the run's inputs (a run
folder inside the dataset root would become a class of it); an existing one is reused only with --resume or
--overwrite, only when it is a run directory blocklora made (its marker) and only when it neither is, contains nor
lies inside one of the run's inputs. --resume on an existing folder that is not a run directory is an error. Every
name the run will write must be free or hold what blocklora wrote there: a symbolic link under a run file's name is
refused (blocklora never writes through a link it did not make), and so is a user's file or folder where the run
writes its own (a file named `tensorboard` with --log tensorboard), before anything is cleared. --overwrite removes
only the files named above (a user's own files in the folder stay). Directories written by blocklora before the
marker existed still load for reading (eval, predict, export, summarize) but are never resumed or cleared: the user
deletes them. Temporary files of a killed write are removed when the run takes the lock.

Two commands at once (`RunDir.session`): a path open_for found free is created exclusively (mkdir fails when another
command made it meanwhile: this one refuses, naming it), and an existing folder must be as open_for found it once
the lock is held (else another command wrote it meanwhile: refused). A run that fails before its first checkpoint
leaves nothing behind: a folder it created is removed, and --overwrite puts the previous run back (its files are
moved aside, not deleted, until the new run has a checkpoint or is complete).
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import shutil
import stat
import sys
import tempfile
import time
from collections.abc import Callable, Collection, Iterable, Iterator
from pathlib import Path
from typing import Any

from ..errors import BlockLoRAError
from ..ownership import (
    MARKER,
    TEMP_SUFFIX,
    Protected,
    check_creatable,
    check_deletable,
    fix_mode,
    is_temp,
    mark,
    marker_kind,
    remove_stale_temps,
    temp_prefix,
)
from ..reading import loads, read_json, read_text
from .results import RunResult

log = logging.getLogger("blocklora")

KIND = "run"


class RunDir:
    """File names, ownership, lock and clearing of one run directory."""

    RESULTS, CONFIG, SPLIT, METRICS, LOG = "results.json", "config.json", "split.json", "metrics.jsonl", "train.log"
    CHECKPOINT, ADAPTER, EXAMPLES, PLOT, LOCK = "checkpoint.pt", "adapter", "examples", "demo.png", ".lock"
    TENSORBOARD = "tensorboard"
    PREDICTIONS, CONFUSION, CURVE = "predictions.csv", "confusion.png", "curve.png"
    # what --overwrite may remove: every file above that a run writes (the lock stays: see lock())
    OWNED_FILES = (RESULTS, CONFIG, SPLIT, METRICS, LOG, CHECKPOINT, PLOT, PREDICTIONS, CONFUSION, CURVE)
    OWNED_DIRS = {ADAPTER: "adapter", EXAMPLES: "examples", TENSORBOARD: "tensorboard"}  # name -> its marker's kind

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self._absent = False  # open_for found the path free: session creates it exclusively
        self._seen: list[tuple[Any, ...]] | None = None  # the folder as open_for found it (session compares)

    @classmethod
    def written(cls, tensorboard: bool = False, demo: bool = False) -> set[str]:
        """The names a run writes: its files and adapter/, tensorboard/ with --log tensorboard, the demo's extras."""
        names = {cls.RESULTS, cls.CONFIG, cls.SPLIT, cls.METRICS, cls.LOG, cls.CHECKPOINT, cls.ADAPTER,
                 cls.PREDICTIONS, cls.CONFUSION, cls.CURVE}
        return names | ({cls.TENSORBOARD} if tensorboard else set()) | ({cls.EXAMPLES, cls.PLOT} if demo else set())

    def __truediv__(self, name: str) -> Path:
        return self.path / name

    # -- paths ---------------------------------------------------------------------------------------------------
    results = property(lambda self: self.path / self.RESULTS)
    config = property(lambda self: self.path / self.CONFIG)
    split = property(lambda self: self.path / self.SPLIT)
    metrics = property(lambda self: self.path / self.METRICS)
    log = property(lambda self: self.path / self.LOG)
    checkpoint = property(lambda self: self.path / self.CHECKPOINT)
    adapter = property(lambda self: self.path / self.ADAPTER)
    examples = property(lambda self: self.path / self.EXAMPLES)
    plot = property(lambda self: self.path / self.PLOT)
    tensorboard = property(lambda self: self.path / self.TENSORBOARD)

    # -- state ---------------------------------------------------------------------------------------------------
    @property
    def made_by_blocklora(self) -> bool:
        return self.path.is_dir() and marker_kind(self.path) == KIND  # a link to a run folder is that folder

    @property
    def legacy(self) -> bool:
        """A run directory of a blocklora older than the marker: its config.json says so."""
        if marker_kind(self.path) is not None or not self.config.is_file():
            return False
        try:
            return "blocklora_version" in loads(read_text(self.config))
        except (OSError, ValueError, TypeError):
            return False

    @property
    def complete(self) -> bool:
        return self.results.is_file()

    def state(self) -> str:
        """absent | complete | resumable (a checkpoint) | leftover (started, no checkpoint) | other (not a run)."""
        if not self.path.exists() and not self.path.is_symlink():
            return "absent"
        if self.complete:
            return "complete"
        if not self.path.is_dir():
            return "other"
        if self.checkpoint.exists():
            return "resumable"
        return "leftover"

    def read_results(self) -> RunResult:
        """results.json as a RunResult; BlockLoRAError when it is missing, damaged or not a run's results."""
        return RunResult.from_json(_read_json(self.results, "results file"), str(self.results))

    def write_results(self, result: RunResult) -> None:
        """Written last: from here on the run is complete."""
        from .files import write_json  # lazily: files imports torch, which reading a run folder never needs

        write_json(self.results, result.to_json())

    def read_config(self) -> dict[str, Any]:
        return _read_json(self.config, "run configuration")

    # -- opening -------------------------------------------------------------------------------------------------
    def open_for(self, overwrite: bool, resume: bool, inputs: Iterable[Protected],
                 writes: Collection[str] | None = None) -> str:
        """Decide how a run uses this path, or refuse on one line: "new", "overwrite", "resume" or "fresh" (an
        existing run directory started over). `writes`: the names the run will write (written(); None: every run
        name). Nothing is written here."""
        p = self.path
        inputs = list(inputs)
        if not p.exists() and not p.is_symlink():
            check_creatable(p, inputs, "--output")
            self._absent = True
            return "new"
        if not p.is_dir():
            raise BlockLoRAError(f"--output {p} is a file: choose a directory path")
        if not (overwrite or resume):
            raise BlockLoRAError(f"{p} already exists: choose another --output, --resume it, or --overwrite")
        check_deletable(p, inputs, "--output")
        empty = not any(os.scandir(p))
        if empty:
            self._seen = self._snapshot()
            return "new" if not resume else "fresh"
        if self.legacy:
            raise BlockLoRAError(f"{p} was written by an earlier blocklora version, which did not mark the folders it "
                                 f"made ({MARKER}): it is read-only for this version; delete it yourself or choose "
                                 "another --output")
        if not self.made_by_blocklora:
            flag = "--resume" if resume else "--overwrite"
            raise BlockLoRAError(f"{p} is not a blocklora run directory (no {MARKER} marker): {flag} only reuses "
                                 "folders blocklora made; choose another --output")
        self._check_names(set(self.written(True, True)) if writes is None else set(writes))
        self._seen = self._snapshot()
        if resume:
            return "resume" if self.config.exists() else "fresh"
        return "overwrite"

    def _check_names(self, writes: set[str]) -> None:
        """Every run name is free or holds what blocklora writes there: never a symbolic link (a write would go
        through it, wherever it points), and, for the names this run writes, a regular file where it writes a file
        and blocklora's own folder where it writes a folder."""
        for name in (self.LOCK, *self.OWNED_FILES, *self.OWNED_DIRS):
            path = self.path / name
            try:
                mode = os.lstat(path).st_mode
            except FileNotFoundError:
                continue
            if stat.S_ISLNK(mode):
                raise BlockLoRAError(f"{path} is a symbolic link (to {os.readlink(path)}) under a name the run writes: "
                                     "blocklora never writes through a link it did not make; remove the link or "
                                     "choose another --output")
            if name in self.OWNED_DIRS:
                if name in writes and not (stat.S_ISDIR(mode) and marker_kind(path) == self.OWNED_DIRS[name]):
                    what = "a file" if not stat.S_ISDIR(mode) else f"a folder blocklora did not write (no {MARKER})"
                    raise BlockLoRAError(f"{path} is {what}, where this run writes its {name} folder: move it "
                                         "away or choose another --output")
            elif (name in writes or name == self.LOCK) and not stat.S_ISREG(mode):
                raise BlockLoRAError(f"{path} is {_kind(mode)}, where this run writes its {name} file: move it away "
                                     "or choose another --output")

    def _snapshot(self) -> list[tuple[Any, ...]]:
        """What is in the folder (names, inodes, sizes, times; the lock and temporary files aside): a command that
        wrote here in between changes it."""
        out = []
        with os.scandir(self.path) as it:
            for e in it:
                if e.name == self.LOCK or is_temp(e.name):
                    continue
                st = e.stat(follow_symlinks=False)
                out.append((e.name, st.st_mode, st.st_ino, st.st_size, st.st_mtime_ns))
        return sorted(out)

    def create(self) -> bool:
        """Make the folder (and parents) with its marker; True if this call created it. The folder itself is made
        exclusively: when another command made it since open_for found the path free, this one refuses, naming it.
        An existing folder is left as it is (session marks it under the lock)."""
        if self.path.exists() and not self._absent:
            return False
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.mkdir(self.path)
        except FileExistsError:
            raise BlockLoRAError(f"{self.path} was created by another blocklora command ({self.holder(wait=2.0)}) "
                                 "after this command found the path free: two commands were given the same --output; "
                                 "choose another --output, or --overwrite / --resume it once that command is done"
                                 ) from None
        fix_mode(self.path)
        mark(self.path, KIND)
        return True

    def holder(self, wait: float = 0.0) -> str:
        """Who holds (or last held) the lock, from what it recorded there: "pid N: blocklora train ..., started
        T", or "unknown" when nothing readable is recorded. `wait`: seconds to wait for a command that has just
        created the folder to record itself."""
        deadline = time.monotonic() + wait
        while True:
            info = _read_record(self.path / self.LOCK)
            if info is not None:
                return f"pid {info['pid']}: {str(info.get('command', ''))[:160]}, started {info.get('started', '?')}"
            if time.monotonic() >= deadline:
                return "unknown"
            time.sleep(0.05)

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """Exclusive lock: a second run into the same directory refuses instead of interleaving.

        flock on DIR/.lock: the kernel drops it when the holder exits, even on kill -9. The file itself stays (deleting
        it would let a third process lock a fresh inode while the first still runs); the holder records itself in it
        (pid, command, start), which a refused command names. Opened without following a link or blocking on a
        FIFO, and only a regular file is locked. Holding it, every temporary file in DIR is a leftover of a killed
        write: they go.
        """
        import fcntl

        flags = os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0) | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)
        try:
            fd = os.open(self.path / self.LOCK, flags, 0o666)  # the umask applies
        except OSError as e:
            if e.errno in (errno.ELOOP, errno.ENXIO):  # a link; a FIFO or socket
                raise BlockLoRAError(f"{self.path / self.LOCK} is not blocklora's lock file (a link or special "
                                     "file): remove it or choose another --output") from None
            raise
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise BlockLoRAError(f"{self.path / self.LOCK} is {_kind(os.fstat(fd).st_mode)}, not blocklora's "
                                     "lock file: remove it or choose another --output")
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise BlockLoRAError(f"another blocklora run is writing to {self.path} right now ({self.holder()}): "
                                     "wait for it or choose another --output") from None
            record = json.dumps({"pid": os.getpid(), "command": _command()[:400],
                                 "started": time.strftime("%Y-%m-%d %H:%M:%S")})
            os.ftruncate(fd, 0)
            os.pwrite(fd, record.encode("utf-8", "backslashreplace") + b"\n", 0)
            remove_stale_temps(self.path, every=True)
            yield
        finally:
            os.close(fd)

    def clear(self) -> list[str]:
        """Remove what a run writes here (see OWNED_FILES / OWNED_DIRS: regular files, and folders holding their
        marker; never a link); call with the lock held. Returns the names of other files, which are kept."""
        kept = []
        for name, ours in self._entries():
            if not ours:
                kept.append(name)
            elif name in self.OWNED_DIRS:
                shutil.rmtree(self.path / name)
            else:
                os.unlink(self.path / name)
        return kept

    @contextlib.contextmanager
    def session(self, main: bool, mode: str, barrier: Callable[[], None] = lambda: None) -> Iterator[None]:
        """A run writing here, in the `mode` open_for decided: the folder is created (rank `main`; exclusively when
        open_for found it free), locked (lock()), checked to be as open_for found it, marked, and for "overwrite"
        the previous run's files are moved aside (kept until the new run has a checkpoint or is complete).

        When the body fails (any exception, an interrupt included) before a checkpoint exists, nothing is left
        behind: a folder this call created is removed, the files of a run started in an empty folder are removed,
        and --overwrite puts the previous run back. A resumed run is left as it is. `barrier` synchronises the
        ranks of a distributed run around the creation."""
        barrier()  # every rank has looked at the path before rank 0 creates it
        created = self.create() if main else False
        barrier()
        if not main:
            yield
            return
        with self.lock():
            if not created and self._seen is not None and self._snapshot() != self._seen:
                raise BlockLoRAError(f"{self.path} changed after this command checked it: another blocklora command "
                                     f"({self.holder()}) wrote to it meanwhile; look at it, then run this command "
                                     "again")
            if marker_kind(self.path) != KIND:
                mark(self.path, KIND)
            aside, kept = self._set_aside() if mode == "overwrite" else (None, [])
            if kept:
                log.info("kept %d file(s) blocklora did not write in %s: %s", len(kept), self.path, ", ".join(kept))
            try:
                yield
            except BaseException:
                if not self.checkpoint.exists():  # nothing worth resuming: undo the start
                    if created:
                        shutil.rmtree(self.path, ignore_errors=True)
                    elif mode in ("new", "overwrite"):
                        self.clear()
                        if aside is not None:
                            self._put_back(aside)
                            aside = None
                raise
            finally:
                if aside is not None:
                    shutil.rmtree(aside, ignore_errors=True)

    def _set_aside(self) -> tuple[Path | None, list[str]]:
        """--overwrite: move what a run writes here (see clear) into a temporary folder in DIR; returns the folder
        (None when there was nothing) and the names of other files, which stay."""
        aside, kept = None, []
        for name, ours in self._entries():
            if not ours:
                kept.append(name)
                continue
            if aside is None:
                aside = Path(tempfile.mkdtemp(prefix=temp_prefix("overwritten"), suffix=TEMP_SUFFIX, dir=self.path))
            os.rename(self.path / name, aside / name)
        return aside, kept

    def _put_back(self, aside: Path) -> None:
        """The previous run's files back in place (the failed run's were cleared)."""
        for entry in os.scandir(aside):
            try:
                os.rename(entry.path, self.path / entry.name)
            except OSError as e:
                log.warning("could not put %s back (%s): the previous run is incomplete", entry.name, e)
        shutil.rmtree(aside, ignore_errors=True)

    def _entries(self) -> Iterator[tuple[str, bool]]:
        """(name, whether a run wrote it) for each entry but the marker, the lock and temporary files."""
        for entry in sorted(os.scandir(self.path), key=lambda e: e.name):
            name = entry.name
            if name in (MARKER, self.LOCK) or is_temp(name):
                continue
            ours = (name in self.OWNED_FILES and entry.is_file(follow_symlinks=False)) or \
                (name in self.OWNED_DIRS and entry.is_dir(follow_symlinks=False) and
                 marker_kind(entry.path) == self.OWNED_DIRS[name])
            yield name, ours

    def discard(self) -> None:
        """Remove a directory this process created and that holds nothing worth keeping (a failed start)."""
        if self.made_by_blocklora:
            shutil.rmtree(self.path, ignore_errors=True)


def _command() -> str:
    """This process's command line, as the user typed it ("blocklora train ..." for the CLI and python -m)."""
    argv = sys.argv or [""]
    prog = os.path.basename(argv[0])
    prog = "blocklora" if prog in ("blocklora", "__main__.py") else (argv[0] or "python")
    return " ".join([prog, *argv[1:]])


def _read_record(path: Path) -> dict[str, Any] | None:
    """The JSON record a lock holder wrote (a regular file only: never blocks on a FIFO), or None."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError:
        return None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        info = json.loads(os.read(fd, 4096).decode("utf-8", "replace"))
    except (OSError, ValueError, RecursionError):
        return None
    finally:
        os.close(fd)
    return info if isinstance(info, dict) and isinstance(info.get("pid"), int) else None


def _kind(mode: int) -> str:
    """What a file of this st_mode is, in words."""
    kinds = {stat.S_IFDIR: "a folder", stat.S_IFIFO: "a FIFO (named pipe)", stat.S_IFSOCK: "a socket",
             stat.S_IFCHR: "a character device", stat.S_IFBLK: "a block device", stat.S_IFLNK: "a symbolic link"}
    return kinds.get(stat.S_IFMT(mode), "a regular file" if stat.S_ISREG(mode) else "a special file")


def _read_json(path: Path, what: str) -> dict[str, Any]:
    """A run's JSON file (reading.read_json: a regular file, UTF-8, valid, nesting bounded) holding an object."""
    if not os.path.lexists(path):
        raise BlockLoRAError(f"{path} is missing: not a complete blocklora run")
    data = read_json(path, what, BlockLoRAError, "the file is damaged")
    if not isinstance(data, dict):
        raise BlockLoRAError(f"{what} {path} is not a JSON object: the file is damaged")
    return data
