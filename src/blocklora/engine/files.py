"""Files that must never be half-written: atomic JSON / torch saves, JSONL metrics (a run folder's lock: rundir.py).

Every JSON blocklora writes goes through `to_json`: valid JSON only (a non-finite float becomes null, never a bare
NaN or Infinity that strict parsers reject; a string holding a file name that is not UTF-8 is written with its bytes
as \\xNN escapes, errors.printable, never as lone surrogates that no UTF-8 reader accepts).
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from ..errors import BlockLoRAError, printable
from ..ownership import TEMP_SUFFIX, fix_mode, remove_stale_temps, temp_prefix


def atomic_write(path: Path, write) -> None:
    """Write to a temporary file in the same directory, fsync, rename over `path` (atomic on POSIX).

    The file gets the mode the umask allows, as open() would give it (mkstemp alone makes it private)."""
    path = Path(path)
    remove_stale_temps(path.parent)  # leftovers of writes here that a kill interrupted (their process is gone)
    fd, tmp = tempfile.mkstemp(prefix=temp_prefix(path.name), suffix=TEMP_SUFFIX, dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        fix_mode(tmp)
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


def to_json(data: Any, indent: int | None = 2) -> str:
    """JSON text of `data`, strictly valid: NaN and infinities become null (json.dumps would write bare NaN), lone
    surrogates \\xNN escapes (errors.printable)."""
    return json.dumps(_finite(data), indent=indent, default=_json_default, allow_nan=False)


def _finite(obj: Any) -> Any:
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, str):
        return obj if obj.isascii() else printable(obj)
    if isinstance(obj, dict):
        return {(printable(k) if isinstance(k, str) else k): _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    if isinstance(obj, torch.Tensor):
        return _finite(obj.tolist())
    return obj


def write_json(path: str | os.PathLike, data: Any) -> None:
    text = to_json(data) + "\n"
    atomic_write(Path(path), lambda fh: fh.write(text.encode()))


def save_torch(path: str | os.PathLike, obj: Any) -> None:
    """torch.save, atomically. Serialised in memory first (a checkpoint holds adapters: megabytes), so a failing
    write is the OSError it is (disk full, file too large) and not torch's RuntimeError about zip positions."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    data = buffer.getvalue()
    atomic_write(Path(path), lambda fh: fh.write(data))


def load_torch(path: str | os.PathLike, what: str = "checkpoint") -> Any:
    """Only ever weights_only=True: a checkpoint cannot run code. A damaged, empty or foreign file (or a pickle that
    would run code, or a FIFO, socket or device by that name) is one BlockLoRAError naming the file."""
    from ..reading import open_regular

    try:
        with open_regular(path) as fh:  # a FIFO or device is refused here: torch.load(path) would block on it
            return torch.load(fh, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as e:  # noqa: BLE001 - UnpicklingError, EOFError, RuntimeError (bad zip), ...: a bad file
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
        raise BlockLoRAError(f"cannot read {what} {path}: it is damaged or not a blocklora {what} ({reason})") \
            from None


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
        self.fh.write(to_json(record, indent=None) + "\n")
        self.fh.flush()

    def __enter__(self) -> JsonlWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.fh.close()
