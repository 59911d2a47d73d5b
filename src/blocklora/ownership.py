"""What blocklora made, and may therefore delete: a marker file, input-conflict checks, owned temporary names, modes.

blocklora deletes only what it can prove it made itself:
- every directory it creates (run, adapter, exported model folder) holds MARKER, a small JSON file naming its kind;
  a directory without it (a user's folder, or one written by a blocklora older than the marker) is never cleared;
- no deletion touches a path that is, contains, or lies inside one of the operation's inputs (dataset root, split
  file, adapter being read, pretrained weights), nor one that is or contains the current or the home directory;
- temporary files and folders are named `.<name>.blocklora-<pid>-<random>.tmp`, so a leftover of a killed write is
  recognisably ours and stale once its process is gone;
- nothing is created inside an input (a new --output inside the dataset root would become part of the dataset);
- a finished result is moved into place without replacing what appeared there meanwhile (`rename_noreplace`): two
  commands given one output path never silently replace each other's result, whatever the timing.
Files and folders are created with the modes the user's umask allows (mkstemp / mkdtemp alone would give 0600/0700).
Files blocklora writes into a folder it did not make (summarize's tables) are recorded one by one (OwnedFiles): a
file is replaced only while it is exactly as blocklora wrote it.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import hashlib
import json
import os
import re
import shutil
import stat
import tempfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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


def check_creatable(target: str | os.PathLike, inputs: Iterable[Protected], what: str) -> None:
    """Raise a one-line refusal when a new `target` would lie inside a folder the operation reads (its dataset root,
    model folder, ...): a run folder made there becomes part of the input (a new class of the dataset)."""
    t = Path(os.path.realpath(target))
    for p in inputs:
        q = Path(os.path.realpath(p.path))
        if p.inside and (t == q or t.is_relative_to(q)):
            raise BlockLoRAError(f"refusing to create {target} inside {p.role} ({p.path}): what blocklora writes there "
                                 f"would become part of what it reads; choose another {what}")


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


def is_temp(name: str) -> bool:
    """Whether a file name is one of blocklora's temporary names (temp_prefix)."""
    return _TEMP.match(name) is not None


def live_writers(directory: str | os.PathLike, name: str) -> list[int]:
    """The ids of other live processes with a temporary sibling of `name` in `directory`: blocklora commands
    writing `name` right now (their temporaries exist from start to finish)."""
    pids = set()
    with contextlib.suppress(OSError), os.scandir(directory) as it:
        for entry in it:
            m = _TEMP.match(entry.name)
            if m is not None and m["name"] == name and int(m["pid"]) != os.getpid() and _alive(int(m["pid"])):
                pids.add(int(m["pid"]))
    return sorted(pids)


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


# -- moving a finished result into place ---------------------------------------------------------------------------
RENAME_NOREPLACE = 1  # linux/fs.h: renameat2 fails with EEXIST instead of replacing the destination
_AT_FDCWD = -100


@functools.cache
def _renameat2_fn() -> Any:
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2  # glibc >= 2.28, musl >= 1.2.?; not macOS
    except (AttributeError, OSError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


def _renameat2(src: str, dst: str) -> bool:
    """Linux renameat2(RENAME_NOREPLACE); False where the C library or the file system does not have it."""
    fn = _renameat2_fn()
    if fn is None:
        return False
    if fn(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), RENAME_NOREPLACE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):  # an old kernel, a file system without the flag
        return False
    raise OSError(err, os.strerror(err), dst)


def rename_noreplace(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Move `src` to `dst` atomically, never replacing what is at `dst`: FileExistsError when something is there.

    os.rename replaces a file (and an empty folder) silently, so a check before it leaves a window in which another
    process's result is lost. Linux's renameat2(RENAME_NOREPLACE) closes it; elsewhere a file is hard-linked
    (link() fails on an existing name, atomically) then unlinked, and a folder renamed, which POSIX lets replace only
    an empty folder, after a check."""
    src, dst = os.fspath(src), os.fspath(dst)
    if _renameat2(src, dst):
        return
    if os.path.isdir(src) and not os.path.islink(src):
        if os.path.lexists(dst):
            raise FileExistsError(errno.EEXIST, "File exists", dst)
        try:
            os.rename(src, dst)
        except OSError as e:
            if e.errno in (errno.EEXIST, errno.ENOTEMPTY, errno.ENOTDIR, errno.EISDIR):
                raise FileExistsError(errno.EEXIST, "File exists", dst) from None
            raise
        return
    try:
        os.link(src, dst, follow_symlinks=False)
    except FileExistsError:
        raise
    except OSError:  # a file system without hard links: the check-then-rename fallback
        if os.path.lexists(dst):
            raise FileExistsError(errno.EEXIST, "File exists", dst) from None
        os.rename(src, dst)
        return
    os.unlink(src)


def appeared(target: str | os.PathLike, what: str) -> BlockLoRAError:
    """The refusal when `target`, free when the command checked it, was taken by another command meanwhile."""
    return BlockLoRAError(f"{target} was written by another command while this one ran (it was free when this one "
                          f"checked): nothing was replaced; choose another {what}, or run this command again once "
                          "the other is done")


def place(tmp: Path, target: Path, replace: bool, check: Callable[[Path], None] | None = None,
          what: str = "--output") -> None:
    """Move the finished `tmp` (a file or folder beside `target`) onto `target`, atomically.

    replace=False: `target` must still be free (another command may have written it since the caller looked):
    BlockLoRAError when it is not, and nothing is replaced. replace=True: what is at `target` now is checked again
    by `check` (what the caller may replace) and moved aside under a temporary name, the result moved in without
    replacing, and the old one removed; a file or folder that appeared in between is never replaced."""
    if replace and os.path.lexists(target):
        if check is not None:
            check(target)
        old = Path(tempfile.mkdtemp(prefix=temp_prefix(target.name), suffix=TEMP_SUFFIX, dir=target.parent))
        try:
            os.rename(target, old / "old")  # the name is free from here on; a rename never writes through a link
            try:
                rename_noreplace(tmp, target)
            except FileExistsError:
                raise appeared(target, what) from None
        finally:
            shutil.rmtree(old, ignore_errors=True)
        return
    try:
        rename_noreplace(tmp, target)
    except FileExistsError:
        raise appeared(target, what) from None


@contextlib.contextmanager
def atomic_folder(target: Path, kind: str, replace: bool | None = None) -> Iterator[Path]:
    """A temporary sibling folder of `target` to fill. On success it is marked as blocklora's (`kind`), its files
    fsync-ed, given the modes the umask gives, and moved onto `target` by `place`; on any failure it is removed:
    `target` is a complete folder or untouched. replace: whether an existing `target` (a folder of this kind, checked
    again) may be replaced; None: whether one existed when the write began (pass what the caller checked, when it
    checked earlier). Leftovers of killed writes in the parent folder (their process is gone) are removed first."""
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(target.parent)
    if replace is None:
        replace = os.path.lexists(target)

    def same_kind(path: Path) -> None:
        if path.is_symlink() or not path.is_dir() or marker_kind(path) != kind:
            raise BlockLoRAError(f"{path} was replaced by something blocklora did not write while this command ran: "
                                 "refusing to replace it; choose another path")

    tmp = Path(tempfile.mkdtemp(prefix=temp_prefix(target.name), suffix=TEMP_SUFFIX, dir=target.parent))
    try:
        yield tmp
        mark(tmp, kind)
        for f in tmp.iterdir():
            if f.is_file():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
        fix_modes(tmp)  # mkdtemp makes a private folder; the user's umask decides
        place(tmp, target, replace, same_kind, "path")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# -- files blocklora writes into a folder it did not make ------------------------------------------------------------
class OwnedFiles:
    """A group of files blocklora writes into a folder it did not make (summarize's DIR/summary.md, .csv, _runs.csv,
    .png). Such a folder cannot carry the marker, so ownership is recorded per file:

    - `.<group>.lock` beside them is flock-ed from `__enter__` to `__exit__`: a second command writing the same group
      fails at once with one line naming the first (its command, pid and host), whatever the timing;
    - `.<group>.owned.json` records the sha256 and size of each file as blocklora wrote it. `check` refuses, by name,
      a file of the group that is not a regular file with a recorded hash (a user's own file, one edited since
      blocklora wrote it, a link), so callers check every name before writing any; `write` replaces a file
      atomically and records it (the new hash is recorded before the rename and the old one dropped after it, so a
      kill at any point leaves a file the next run still recognises).
    """

    def __init__(self, directory: str | os.PathLike, group: str, command: str) -> None:
        self.directory, self.group, self.command = Path(directory), group, command
        self.lock_path = self.directory / f".{group}.lock"
        self.record_path = self.directory / f".{group}.owned.json"
        self.record: dict[str, list[dict[str, Any]]] = {}
        self._fd: int | None = None

    def __enter__(self) -> OwnedFiles:
        import fcntl
        import socket

        self.directory.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o666 & ~umask())
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 300, 0).decode(errors="replace").strip() or "blocklora command"
            os.close(fd)
            raise BlockLoRAError(f"another {holder} is writing {self.directory / self.group}.* right now: wait for "
                                 "it to finish, or choose another --output") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"blocklora {self.command} (pid {os.getpid()} on {socket.gethostname()})\n".encode(), 0)
        self._fd = fd
        self.record = self._read_record()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._fd is not None:
            os.close(self._fd)  # the lock file stays: deleting it would let a third command lock a fresh inode
            self._fd = None

    def _read_record(self) -> dict[str, list[dict[str, Any]]]:
        """The record, or {} when there is none or it is damaged (then no file of the group is replaced)."""
        try:
            if not stat.S_ISREG(self.record_path.lstat().st_mode):
                return {}
            data = json.loads(self.record_path.read_text(encoding="utf-8"))
        except (OSError, ValueError, RecursionError):
            return {}
        files = data.get("files") if isinstance(data, dict) and data.get("made_by") == "blocklora" else None
        if not isinstance(files, dict):
            return {}
        return {str(k): [e for e in v if isinstance(e, dict)] for k, v in files.items() if isinstance(v, list)}

    def _save_record(self) -> None:
        data = {"made_by": "blocklora", "command": self.command, "files": self.record}
        _write_file(self.record_path, (json.dumps(data, indent=2) + "\n").encode())

    def owned(self, name: str) -> bool:
        """Whether directory/name is a regular file exactly as blocklora last wrote it (the record says so)."""
        path = self.directory / name
        try:
            st = path.lstat()
        except FileNotFoundError:
            return False
        entries = self.record.get(name, [])
        if not stat.S_ISREG(st.st_mode) or not any(e.get("size") == st.st_size for e in entries):
            return False
        digest = _sha256(path)
        return any(e.get("sha256") == digest for e in entries)

    def check(self, names: Iterable[str], option: str = "--output") -> None:
        """Refuse (one line naming the first) unless every existing file among `names` is one blocklora wrote."""
        for name in names:
            path = self.directory / name
            if not (path.exists() or path.is_symlink()) or self.owned(name):
                continue
            why = "is a symbolic link" if path.is_symlink() else "is not a regular file" if not path.is_file() else \
                "was not written by blocklora, or was changed since" if name in self.record else \
                "was not written by blocklora"
            raise BlockLoRAError(f"refusing to replace {path}: it {why} (blocklora replaces only the files it "
                                 f"wrote); move it away, or choose another {option}")

    def write(self, files: dict[str, bytes]) -> dict[str, Path]:
        """Write each directory/name atomically (call `check` first) and record them as blocklora's."""
        entries = {name: {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
                   for name, data in files.items()}
        for name, entry in entries.items():  # old and new: a kill mid-way leaves files still recognisable
            self.record[name] = [*self.record.get(name, []), entry]
        self._save_record()
        for name, data in files.items():
            _write_file(self.directory / name, data)
        for name, entry in entries.items():
            self.record[name] = [entry]
        self._save_record()
        return {name: self.directory / name for name in files}

    def remove(self, name: str) -> bool:
        """Delete directory/name if blocklora wrote it and nobody changed it since; True if it was deleted."""
        if not self.owned(name):
            return False
        os.unlink(self.directory / name)
        self.record.pop(name, None)
        self._save_record()
        return True


def _write_file(path: Path, data: bytes) -> None:
    """`data` into `path` atomically: a temporary sibling (temp_prefix), fsync-ed, given the mode the umask gives,
    renamed over `path` (which replaces a link there, never writes through it). engine.files.atomic_write does the
    same for the engine; this module stays a leaf (the method library imports it)."""
    remove_stale_temps(path.parent, path.name)
    fd, tmp = tempfile.mkstemp(prefix=temp_prefix(path.name), suffix=TEMP_SUFFIX, dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        fix_mode(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@contextlib.contextmanager
def reported_write(target: str | os.PathLike) -> Iterator[None]:
    """Around a library's write of `target` (safetensors' save_file, torch.save, save_pretrained): a failed write
    becomes the OSError it is, with its errno where the library gives it (ENOSPC, EFBIG, EACCES, ...), so the CLI
    reports it on one line ("disk full or not writable?") like every other write. safetensors raises its own
    SafetensorError ("I/O error: File too large (os error 27)") and torch.save a RuntimeError about its zip writer
    ("inline_container ... file write failed"); any other RuntimeError is not a write and propagates unchanged."""
    from safetensors import SafetensorError

    try:
        yield
    except (SafetensorError, RuntimeError) as e:
        text = str(e)
        if isinstance(e, RuntimeError) and "inline_container" not in text and "write" not in text:
            raise
        code = re.search(r"os error (\d+)", text)
        reason = (text.splitlines() or [type(e).__name__])[0][:120]
        raise OSError(int(code.group(1)) if code else errno.EIO,
                      f"cannot write {Path(target).name} ({reason}): disk full or not writable?", str(target)) from None
