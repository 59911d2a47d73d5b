"""Config values from text: a key=value override's value parsed by the field's annotated type, and config files.

The checks themselves live with the fields (run_config.py, ../checks.py): this only turns text into typed values.
"""

from __future__ import annotations

import types
import typing
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from ..reading import read_json, read_toml


def read_file(path: Path) -> Any:
    """The content of a JSON or TOML (*.toml) config file; ConfigError naming the file when it cannot be read (also
    a FIFO or other special file, bytes that are not UTF-8, nesting past reading.MAX_DEPTH)."""
    path = Path(path)
    if path.suffix.lower() == ".toml":
        try:
            import tomllib  # noqa: F401 - Python >= 3.11
        except ImportError:
            raise ConfigError(f"{path}: TOML configs need Python 3.11 or newer; write it as JSON") from None
        return read_toml(path, "the config file", ConfigError, "check --config and fix the file")
    return read_json(path, "the config file", ConfigError, "check --config and fix the file")


def coerce(raw: str, typ: Any, key: str) -> Any:
    """Parse an override's text by the field's annotated type."""
    options = typing.get_args(typ) if isinstance(typ, types.UnionType) or typing.get_origin(typ) is typing.Union \
        else (typ,)
    if type(None) in options and raw.lower() in ("none", "null", ""):
        return None
    for option in options:
        try:
            if option is bool:
                if raw.lower() in ("true", "1", "yes", "on"):
                    return True
                if raw.lower() in ("false", "0", "no", "off"):
                    return False
                continue
            if option is int:
                return int(raw)
            if option is float:
                return float(raw)
            if option is str:
                return raw
            if typing.get_origin(option) is typing.Literal:
                return raw  # the config's own check names the allowed values
            origin = typing.get_origin(option)
            if origin is tuple:
                inner = typing.get_args(option)
                parts = [p for p in raw.strip("()[]").split(",") if p.strip()]
                conv = float if inner and inner[0] is float else (int if inner and inner[0] is int else str)
                return tuple(conv(p.strip()) for p in parts)
        except ValueError:
            continue
    raise ConfigError(f"bad value {raw!r} for {key}: expected {getattr(typ, '__name__', str(typ))}")
