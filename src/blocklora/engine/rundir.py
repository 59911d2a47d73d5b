"""A run directory: the only code that knows its file names and the rules for creating, reusing and clearing it.

    DIR/.blocklora      marker: blocklora made this folder (ownership.py)
    DIR/.lock           flock-ed by the run writing to DIR
    DIR/config.json     the resolved configuration        DIR/split.json     the K-shot split (verbatim if given)
    DIR/metrics.jsonl   one line per training step        DIR/train.log      the run's log
    DIR/checkpoint.pt   resumable state (removed once the run is complete)
    DIR/adapter/        the trained adapter               DIR/results.json   written last: the run is complete
    DIR/examples/, DIR/demo.png                           the demo's extras (its example images and plot)
    DIR/tensorboard/    TensorBoard scalars (train.log=tensorboard; engine/tensorboard.py)

Rules (`RunDir.open_for`): a new path is created; an existing one is reused only with --resume or --overwrite, only
when it is a run directory blocklora made (its marker) and only when it neither is, contains nor lies inside one of
the run's inputs. --resume on an existing folder that is not a run directory is an error. --overwrite removes only
the files named above (a user's own files in the folder stay). Directories written by blocklora before the marker
existed still load for reading (eval, predict, export, summarize) but are never resumed or cleared: the user
deletes them. Temporary files of a killed write are removed when the run takes the lock.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from ..errors import BlockLoRAError
from ..ownership import MARKER, Protected, check_deletable, fix_mode, mark, marker_kind, remove_stale_temps
from ..reading import loads, not_regular, read_json, read_text, reason
from .results import RunResult

log = logging.getLogger("blocklora")

KIND = "run"


class RunDir:
    """File names, ownership, lock and clearing of one run directory."""

    RESULTS, CONFIG, SPLIT, METRICS, LOG = "results.json", "config.json", "split.json", "metrics.jsonl", "train.log"
    CHECKPOINT, ADAPTER, EXAMPLES, PLOT, LOCK = "checkpoint.pt", "adapter", "examples", "demo.png", ".lock"
    TENSORBOARD = "tensorboard"
    # what --overwrite may remove: every file above that a run writes (the lock stays: see lock())
    OWNED_FILES = (RESULTS, CONFIG, SPLIT, METRICS, LOG, CHECKPOINT, PLOT)
    OWNED_DIRS = {ADAPTER: "adapter", EXAMPLES: "examples", TENSORBOARD: "tensorboard"}  # name -> its marker's kind

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)

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
    def open_for(self, overwrite: bool, resume: bool, inputs: Iterable[Protected]) -> str:
        """Decide how a run uses this path, or refuse on one line: "new", "overwrite", "resume" or "fresh" (an
        existing run directory started over). Nothing is written here."""
        p = self.path
        if not p.exists() and not p.is_symlink():
            return "new"
        if not p.is_dir():
            raise BlockLoRAError(f"--output {p} is a file: choose a directory path")
        if not (overwrite or resume):
            raise BlockLoRAError(f"{p} already exists: choose another --output, --resume it, or --overwrite")
        check_deletable(p, list(inputs), "--output")
        empty = not any(os.scandir(p))
        if empty:
            return "new" if not resume else "fresh"
        if self.legacy:
            raise BlockLoRAError(f"{p} was written by an earlier blocklora version, which did not mark the folders it "
                                 f"made ({MARKER}): it is read-only for this version; delete it yourself or choose "
                                 "another --output")
        if not self.made_by_blocklora:
            flag = "--resume" if resume else "--overwrite"
            raise BlockLoRAError(f"{p} is not a blocklora run directory (no {MARKER} marker): {flag} only reuses "
                                 "folders blocklora made; choose another --output")
        if resume:
            return "resume" if self.config.exists() else "fresh"
        return "overwrite"

    def create(self) -> bool:
        """Make the folder (and parents) with its marker; True if this call created it."""
        created = not self.path.exists()
        self.path.mkdir(parents=True, exist_ok=True)
        if marker_kind(self.path) != KIND:
            mark(self.path, KIND)
        if created:
            fix_mode(self.path)
        return created

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """Exclusive lock: a second run into the same directory refuses instead of interleaving.

        flock on DIR/.lock: the kernel drops it when the holder exits, even on kill -9. The file itself stays (deleting
        it would let a third process lock a fresh inode while the first still runs). Holding it, every temporary
        file in DIR is a leftover of a killed write: they go.
        """
        import fcntl

        fh = _open_lock(self.path / self.LOCK)
        try:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise BlockLoRAError(f"another blocklora run is writing to {self.path} right now: wait for it or "
                                     "choose another --output") from None
            remove_stale_temps(self.path, every=True)
            yield
        finally:
            fh.close()

    def clear(self) -> list[str]:
        """Remove what a run writes here (see OWNED_FILES / OWNED_DIRS); call with the lock held, after open_for
        said "overwrite". Returns the names of other files, which are kept."""
        kept = []
        for entry in sorted(os.scandir(self.path), key=lambda e: e.name):
            name = entry.name
            if name in (MARKER, self.LOCK):
                continue
            if name in self.OWNED_FILES and entry.is_file(follow_symlinks=False):
                os.unlink(entry.path)
            elif name in self.OWNED_DIRS and entry.is_dir(follow_symlinks=False) and \
                    marker_kind(entry.path) == self.OWNED_DIRS[name]:
                shutil.rmtree(entry.path)
            else:
                kept.append(name)
        return kept

    @contextlib.contextmanager
    def session(self, main: bool, clear: bool, barrier: Callable[[], None] = lambda: None,
                keep: tuple[type[BaseException], ...] = ()) -> Iterator[None]:
        """A run writing here: the folder is created with its marker (rank `main`), locked (lock()) and, for
        --overwrite (`clear`), cleared (clear()) once the lock is held, never under a run still writing. On a user
        error (BlockLoRAError) other than the `keep` kinds, a folder this call created is removed unless it holds a
        checkpoint worth resuming. `barrier` synchronises the ranks of a distributed run around the creation."""
        barrier()  # every rank has looked at the path before rank 0 creates it
        created = self.create() if main else False
        barrier()
        try:
            with self.lock() if main else contextlib.nullcontext():
                if main and clear:
                    kept = self.clear()
                    if kept:
                        log.info("kept %d file(s) blocklora did not write in %s: %s", len(kept), self.path,
                                 ", ".join(kept))
                yield
        except BlockLoRAError as e:
            if main and created and not isinstance(e, keep) and not self.checkpoint.exists():
                self.discard()
            raise

    def discard(self) -> None:
        """Remove a directory this process created and that holds nothing worth keeping (a failed start)."""
        if self.made_by_blocklora:
            shutil.rmtree(self.path, ignore_errors=True)


def _open_lock(path: Path):
    """The lock file, opened for appending (never truncate a file another run holds) when it is a regular file,
    checked before and after a non-blocking open: a FIFO named .lock is an error, not a hang (open() for writing
    waits for a reader)."""
    def refuse(why: str) -> BlockLoRAError:
        return BlockLoRAError(f"cannot use the run's lock file {path} ({why}): remove it")

    try:
        why = not_regular(os.stat(path).st_mode) if os.path.lexists(path) else None
        if why:
            raise refuse(why)
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0),
                     0o666)
    except OSError as e:
        raise refuse(reason(e)) from None
    why = not_regular(os.fstat(fd).st_mode)
    if why:
        os.close(fd)
        raise refuse(why)
    os.set_blocking(fd, True)
    return os.fdopen(fd, "a")


def _read_json(path: Path, what: str) -> dict[str, Any]:
    """A run's JSON file (reading.read_json: a regular file, UTF-8, valid, nesting bounded) holding an object."""
    if not os.path.lexists(path):
        raise BlockLoRAError(f"{path} is missing: not a complete blocklora run")
    data = read_json(path, what, BlockLoRAError, "the file is damaged")
    if not isinstance(data, dict):
        raise BlockLoRAError(f"{what} {path} is not a JSON object: the file is damaged")
    return data
