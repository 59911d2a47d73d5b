"""What blocklora made, and may therefore delete: a marker file, input-conflict checks, owned temporary names, modes.

blocklora deletes only what it can prove it made itself:
- every directory it creates (run, adapter, exported model folder) holds MARKER, a small JSON file naming its kind;
  a directory without it (a user's folder, or one written by a blocklora older than the marker) is never cleared;
- no deletion touches a path that is, contains, or lies inside one of the operation's inputs (dataset root, split
  file, adapter being read, pretrained weights), nor one that is or contains the current or the home directory;
- temporary files and folders are named `.<name>.blocklora-<pid>-<random>.tmp`, so a leftover of a killed write is
  recognisably ours and stale once its process is gone.
Files and folders are created with the modes the user's umask allows (mkstemp / mkdtemp alone would give 0600/0700).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import stat
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from .errors import BlockLoRAError
from .reading import loads, read_text

MARKER = ".blocklora"
TEMP_TAG = ".blocklora-"
TEMP_SUFFIX = ".tmp"
# .<name>.blocklora-<pid>-<random>.tmp, optionally followed by the name's own suffix (an export's format follows it)
_TEMP = re.compile(r"^\.(?P<name>.+)\.blocklora-(?P<pid>\d+)-[^/]*?\.tmp(\.\w+)?$")


# -- the marker ------------------------------------------------------------------------------------------------------
def mark(directory: str | os.PathLike, kind: str) -> None:
    """Record that blocklora made `directory` (kind: "run", "adapter", "export", ...)."""
    from ._version import __version__

    path = Path(directory) / MARKER
    path.write_text(json.dumps({"made_by": "blocklora", "kind": kind, "version": __version__}) + "\n")
    fix_mode(path)


def marker_kind(directory: str | os.PathLike) -> str | None:
    """The kind blocklora recorded in `directory`, or None when it holds no (readable) marker."""
    path = Path(directory) / MARKER
    try:
        if not stat.S_ISREG(path.lstat().st_mode):
            return None
        data = loads(read_text(path))  # a regular file, nesting bounded (reading.py)
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("made_by") != "blocklora" or not isinstance(data.get("kind"), str):
        return None
    return data["kind"]


# -- inputs that must never be deleted ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Protected:
    """A path an operation reads: a deletion may not be it or contain it; nor, for a folder it reads
    (`inside=True`), lie inside it."""

    role: str  # how the user named it: "the dataset root (--root)", "the adapter being read (--adapter)", ...
    path: Path
    inside: bool = True


def protected(*pairs: tuple[str, str | os.PathLike | None]) -> list[Protected]:
    """Protected paths for (role, path) pairs that name existing files or folders, plus the current and home
    directories (which a deletion may not be or contain; everything lies inside them)."""
    out = [Protected(role, Path(p)) for role, p in pairs if p not in (None, "") and os.path.exists(p)]
    out.append(Protected("the current directory", Path.cwd(), inside=False))
    out.append(Protected("your home directory", Path.home(), inside=False))
    return out


def conflict(target: str | os.PathLike, inputs: Iterable[Protected]) -> str | None:
    """Why deleting `target` would touch an input, or None. Compared after resolving symbolic links."""
    t = Path(os.path.realpath(target))
    for p in inputs:
        q = Path(os.path.realpath(p.path))
        if t == q:
            return f"it is {p.role}"
        if q.is_relative_to(t):
            return f"it contains {p.role} ({p.path})"
        if p.inside and t.is_relative_to(q):
            return f"it lies inside {p.role} ({p.path})"
    return None


def check_deletable(target: str | os.PathLike, inputs: Iterable[Protected], what: str) -> None:
    """Raise a one-line refusal when `target` may not be deleted because of an input."""
    why = conflict(target, inputs)
    if why is not None:
        raise BlockLoRAError(f"refusing to delete or replace {target}: {why}; choose another {what}")


def remove_owned(directory: str | os.PathLike, kind: str, inputs: Iterable[Protected], what: str) -> None:
    """Delete a folder blocklora made (its marker names `kind`), after the input checks; refuse anything else."""
    directory = Path(directory)
    check_deletable(directory, inputs, what)
    if directory.is_symlink() or marker_kind(directory) != kind:
        raise BlockLoRAError(f"refusing to delete {directory}: blocklora did not make it (no {MARKER} marker of "
                             f"a blocklora {kind}); delete it yourself or choose another {what}")
    shutil.rmtree(directory)


# -- temporary files -------------------------------------------------------------------------------------------------
def temp_prefix(name: str) -> str:
    """mkstemp / mkdtemp prefix for a temporary sibling of `name`: ours, and stale once this process is gone."""
    return f".{name}{TEMP_TAG}{os.getpid()}-"


def remove_stale_temps(directory: str | os.PathLike, name: str | None = None, every: bool = False) -> list[str]:
    """Delete blocklora's temporary leftovers in `directory` (of `name` only, if given) whose process has ended
    (every one with `every`, for a directory whose lock we hold). Returns the names removed."""
    removed = []
    try:
        entries = list(os.scandir(directory))
    except OSError:
        return removed
    for entry in entries:
        m = _TEMP.match(entry.name)
        if m is None or (name is not None and m["name"] != name):
            continue
        if not every and _alive(int(m["pid"])):
            continue
        with contextlib.suppress(OSError):
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path)
            else:
                os.unlink(entry.path)
            removed.append(entry.name)
    return removed


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True  # another thread of ours may be writing it
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # exists, owned by someone else
    return True


# -- modes -----------------------------------------------------------------------------------------------------------
def umask() -> int:
    """The process umask, read without changing it where Linux allows (/proc), else by the set-and-restore idiom."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def fix_mode(path: str | os.PathLike) -> None:
    """Give a file 0666 & ~umask and a folder 0777 & ~umask (what open() and mkdir() would have given)."""
    mode = 0o777 if os.path.isdir(path) else 0o666
    os.chmod(path, mode & ~umask())


def fix_modes(tree: str | os.PathLike) -> None:
    """fix_mode on a folder and everything in it (a folder written through mkdtemp)."""
    fix_mode(tree)
    for dirpath, dirnames, filenames in os.walk(tree):
        for name in dirnames + filenames:
            fix_mode(os.path.join(dirpath, name))


@contextlib.contextmanager
def atomic_folder(target: Path, kind: str) -> Iterator[Path]:
    """A temporary sibling folder of `target` to fill. On success it is marked as blocklora's (`kind`), its files
    fsync-ed, given the modes the umask gives, and moved onto `target` (replacing a folder the caller checked may be
    replaced); on any failure it is removed: `target` is a complete folder or untouched. Leftovers of killed writes
    in the parent folder (their process is gone) are removed first."""
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(target.parent)
    tmp = Path(tempfile.mkdtemp(prefix=temp_prefix(target.name), suffix=TEMP_SUFFIX, dir=target.parent))
    try:
        yield tmp
        mark(tmp, kind)
        for f in tmp.iterdir():
            if f.is_file():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
        fix_modes(tmp)  # mkdtemp makes a private folder; the user's umask decides
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
