"""The one way blocklora reads a file that is not an image: regular files only, bounded JSON / TOML, checked fields.

    open_regular(path) -> binary file        open_text(path) -> text file        read_bytes / read_text(path)
    loads(text) / loads_toml(text) -> data, nesting bounded by MAX_DEPTH
    read_json(path, what, error, fix) / read_toml(...): all of the above, one `error` naming the file
    fields(record, rules, name, defaults) -> the record's fields, each checked by its rule (checks.py)

Why each rule:
- only regular files are opened: open() on a FIFO blocks until a writer appears (forever, for a file named like a
  run's config.json), and a character device such as /dev/zero never ends. The path is checked with stat, opened
  with O_NONBLOCK (so a FIFO swapped in after the check cannot block either) and checked again with fstat: a
  NotRegularFile, an OSError, so every `except OSError` of a reader already reports it. The image reader
  (data/decode.py) applies the same rule to images.
- JSON and TOML nest at most MAX_DEPTH levels: json.loads raises RecursionError (neither ValueError nor OSError) on
  deep nesting and tomllib recurses in Python; no file blocklora reads nests deeper than 6 levels. A file past the
  bound is a TooDeep, a ValueError like every other malformed file.
- a record's fields are checked by the same rules as the config's own (checks.py: types, ranges, allowed values),
  through `fields`, which names each field as record.key; the cross-checks against the files beside it (a split
  file against the dataset's splits, a checkpoint against the run's config and schedule) are each reader's own.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import stat
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import IO, Any

from .checks import Rule
from .errors import BlockLoRAError, ConfigError

MAX_DEPTH = 64  # nesting levels of JSON / TOML (blocklora's own files nest 6 at most)

_KINDS = {stat.S_IFIFO: "a FIFO (named pipe)", stat.S_IFSOCK: "a socket", stat.S_IFCHR: "a character device",
          stat.S_IFBLK: "a block device", stat.S_IFDIR: "a folder"}


class NotRegularFile(OSError):
    """A path that is a FIFO, socket, device or folder where a file was expected."""


class TooDeep(ValueError):
    """JSON or TOML nested deeper than MAX_DEPTH levels."""


def not_regular(mode: int) -> str | None:
    """Why a file of this st_mode cannot be read as a file ("not a regular file: it is a FIFO ..."), or None."""
    if stat.S_ISREG(mode):
        return None
    return f"not a regular file: it is {_KINDS.get(stat.S_IFMT(mode), 'a special file')}"


def open_regular(path: str | os.PathLike) -> IO[bytes]:
    """`path` opened for binary reading, when it is a regular file (links followed). Raises NotRegularFile for a
    FIFO, socket, device or folder, without ever blocking; other OSErrors (FileNotFoundError, ...) as they come."""
    why = not_regular(os.stat(path).st_mode)
    if why:
        raise NotRegularFile(why)
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    try:
        why = not_regular(os.fstat(fd).st_mode)
        if why:
            raise NotRegularFile(why)
        os.set_blocking(fd, True)  # regular-file reads never block on O_NONBLOCK anyway; the file object expects it
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def open_text(path: str | os.PathLike, encoding: str = "utf-8", newline: str | None = None) -> IO[str]:
    """open_regular as text (what open(path, encoding=..., newline=...) gives, for regular files only)."""
    return io.TextIOWrapper(open_regular(path), encoding=encoding, newline=newline)


def read_bytes(path: str | os.PathLike) -> bytes:
    """The bytes of a regular file (OSError / NotRegularFile otherwise)."""
    with open_regular(path) as fh:
        return fh.read()


def read_text(path: str | os.PathLike, encoding: str = "utf-8") -> str:
    """The text of a regular file (OSError / NotRegularFile otherwise, UnicodeDecodeError for other encodings)."""
    return read_bytes(path).decode(encoding)


def depth(data: Any) -> int:
    """Nesting levels of parsed JSON / TOML (a scalar 0, [] 1, [[1]] 2), walked without recursion."""
    deepest, stack = 0, [(data, 0)]
    while stack:
        value, level = stack.pop()
        if isinstance(value, dict):
            value = list(value.values())
        elif not isinstance(value, list):
            continue
        level += 1
        deepest = max(deepest, level)
        stack.extend((v, level) for v in value if isinstance(v, (dict, list)))
    return deepest


def _bounded(parse: Any, text: str | bytes) -> Any:
    try:
        data = parse(text)
    except RecursionError:
        raise TooDeep(f"nested deeper than Python's recursion limit (blocklora reads at most {MAX_DEPTH} "
                      "levels)") from None
    if depth(data) > MAX_DEPTH:
        raise TooDeep(f"nested {depth(data)} levels deep (blocklora reads at most {MAX_DEPTH})")
    return data


def loads(text: str | bytes) -> Any:
    """json.loads, nesting bounded by MAX_DEPTH: ValueError (JSONDecodeError, TooDeep) for anything malformed."""
    return _bounded(json.loads, text)


def loads_toml(text: str) -> Any:
    """tomllib.loads (Python >= 3.11; ImportError before), nesting bounded: ValueError for anything malformed."""
    import tomllib

    return _bounded(tomllib.loads, text)


def reason(e: BaseException) -> str:
    """One line saying why a read or parse failed."""
    if isinstance(e, FileNotFoundError):
        return "no such file"
    if isinstance(e, NotRegularFile | TooDeep):
        return str(e)
    if isinstance(e, OSError):
        return e.strerror or type(e).__name__
    if isinstance(e, UnicodeDecodeError):
        return f"not UTF-8 text (byte {e.start})"
    if isinstance(e, json.JSONDecodeError):
        return f"not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})"
    kind = "TOML" if type(e).__name__ == "TOMLDecodeError" else "data"
    return f"not valid {kind}: {str(e).splitlines()[0][:160] if str(e) else type(e).__name__}"


def _read(path: Path, what: str, error: type[BlockLoRAError], fix: str, parse: Any) -> Any:
    try:
        return parse(read_text(path, "utf-8-sig"))  # a byte order mark (Windows editors) is not part of the text
    except (OSError, ValueError) as e:  # UnicodeDecodeError, JSONDecodeError, TOMLDecodeError, TooDeep: ValueErrors
        raise error(f"cannot read {what} {path} ({reason(e)}){': ' + fix if fix else ''}") from None


def read_json(path: str | os.PathLike, what: str, error: type[BlockLoRAError] = BlockLoRAError, fix: str = "") -> Any:
    """A JSON file, or one `error` naming `what`, the file, the reason (missing, not a regular file, not UTF-8, bad
    JSON with its line and column, too deep) and `fix`."""
    return _read(Path(path), what, error, fix, loads)


def read_toml(path: str | os.PathLike, what: str, error: type[BlockLoRAError] = BlockLoRAError, fix: str = "") -> Any:
    """read_json for TOML."""
    return _read(Path(path), what, error, fix, loads_toml)


# -- records: the fields of a JSON object, checked by checks.py's rules ---------------------------------------------
_REQUIRED = object()


def fields(record: Any, rules: Mapping[str, Rule], name: str, defaults: Mapping[str, Any] | None = None
           ) -> dict[str, Any]:
    """The fields of `record` (a JSON object) that `rules` names, each passed through its rule as `name.key`; a key
    absent from `record` takes its value from `defaults` (that value is checked too), and is an error without one.
    Other keys are left out. Raises ConfigError naming the first bad field (the caller adds the file: `damaged`)."""
    if not isinstance(record, dict):
        raise ConfigError(f"{name} must be a JSON object, got {_short(record)}")
    defaults = defaults or {}
    out = {}
    for key, rule in rules.items():
        value = record.get(key, defaults.get(key, _REQUIRED))
        if value is _REQUIRED:
            raise ConfigError(f"{name} has no {key!r}")
        out[key] = rule(f"{name}.{key}", value)
    return out


@contextlib.contextmanager
def damaged(path: str | os.PathLike, error: type[BlockLoRAError] = BlockLoRAError,
            fix: str = "the file is damaged") -> Iterator[None]:
    """Field checks of one file: a ConfigError inside becomes `error("PATH: the check's words; fix")`."""
    try:
        yield
    except ConfigError as e:
        raise error(f"{path}: {e}; {fix}") from None


def mapping(name: str, value: Any) -> dict[str, Any]:
    """Rule: a JSON object (its fields are checked by the caller, with `fields`)."""
    if not isinstance(value, dict):
        raise ConfigError(f"{name} must be a JSON object, got {_short(value)}")
    return value


def listof(rule: Rule | None = None, lo: int = 0, hi: int | None = None) -> Rule:
    """Rule: a JSON array of lo..hi items, each passed through `rule` (as name[i]) when given."""
    def check(name: str, value: Any) -> list[Any]:
        if not isinstance(value, list) or len(value) < lo or (hi is not None and len(value) > hi):
            size = f"{lo}..{hi}" if hi is not None else f"at least {lo}"
            raise ConfigError(f"{name} must be a list of {size} items, got {_short(value)}")
        return [rule(f"{name}[{i}]", v) for i, v in enumerate(value)] if rule else value
    return check


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."
