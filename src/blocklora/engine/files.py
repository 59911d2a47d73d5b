"""Files that must never be half-written: atomic JSON / torch saves, a run-directory lock, JSONL metrics."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from ..errors import BlockLoRAError


def atomic_write(path: Path, write) -> None:
    """Write to a temporary file in the same directory, fsync, rename over `path` (atomic on POSIX)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    with contextlib.suppress(OSError):  # make the rename itself durable
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)


def write_json(path: str | os.PathLike, data: Any) -> None:
    text = json.dumps(data, indent=2, sort_keys=False, default=_json_default) + "\n"
    atomic_write(Path(path), lambda fh: fh.write(text.encode()))


def save_torch(path: str | os.PathLike, obj: Any) -> None:
    atomic_write(Path(path), lambda fh: torch.save(obj, fh))


def load_torch(path: str | os.PathLike) -> Any:
    """Only ever weights_only=True: a checkpoint cannot run code."""
    return torch.load(path, map_location="cpu", weights_only=True)


def _json_default(obj: Any) -> Any:
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    if hasattr(obj, "item"):
        return obj.item()
    if isinstance(obj, (set, tuple)):
        return list(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


class JsonlWriter:
    """One JSON object per line, flushed per line (a killed run keeps every finished step)."""

    def __init__(self, path: str | os.PathLike, append: bool = False) -> None:
        self.fh = open(path, "a" if append else "w")  # noqa: SIM115 - closed in close()

    def write(self, record: dict[str, Any]) -> None:
        self.fh.write(json.dumps(record, default=_json_default) + "\n")
        self.fh.flush()

    def close(self) -> None:
        self.fh.close()


@contextlib.contextmanager
def run_lock(directory: Path) -> Iterator[None]:
    """Exclusive lock on a run directory: a second run into the same directory refuses instead of interleaving.

    flock on DIR/.lock: the kernel drops it when the holder exits, even on kill -9. The file itself stays (deleting
    it would let a third process lock a fresh inode while the first still runs).
    """
    import fcntl

    fh = open(Path(directory) / ".lock", "a")  # noqa: SIM115 - "a": never truncate a file another run holds
    try:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise BlockLoRAError(f"another blocklora run is writing to {directory} right now: wait for it or "
                                 "choose another --output") from None
        yield
    finally:
        fh.close()
