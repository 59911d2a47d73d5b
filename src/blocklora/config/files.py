"""Config values from text: a key=value override's value parsed by the field's annotated type, and config files.

The checks themselves live with the fields (run_config.py, ../checks.py): this only turns text into typed values.
"""

from __future__ import annotations

import json
import types
import typing
from pathlib import Path
from typing import Any

from ..errors import ConfigError


def read_file(path: Path) -> Any:
    """The content of a JSON or TOML (*.toml) config file; ConfigError naming the file when it cannot be read."""
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise ConfigError(f"cannot read the config file {path} ({e.strerror or e}): check --config") from None
    try:
        if path.suffix.lower() == ".toml":
            import tomllib  # Python >= 3.11

            data = tomllib.loads(raw.decode("utf-8"))
        else:
            data = json.loads(raw)
    except ImportError:
        raise ConfigError(f"{path}: TOML configs need Python 3.11 or newer; write it as JSON") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path} is not valid {'TOML' if path.suffix.lower() == '.toml' else 'JSON'} "
                          f"({e}): fix the file") from None
    return data


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
