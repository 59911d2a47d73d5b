"""Value checks shared by every entry point: the config dataclasses, the CLI's own options and the Python API, and
the metadata a config field carries (`option`: its help text and command-line flag; allowed strings as a Literal).

Each check returns the value (converted where that is lossless) or raises ConfigError naming the option, the value
and what is allowed, so a bad value is one `error:` line before anything is read, built or written.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import re
import string
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .errors import ConfigError

SEED_MAX = 2**63 - 1  # torch.manual_seed takes up to 2**64 - 1, the splitmix seeds of the data stream 63 bits
_DEVICE = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")


@dataclass(frozen=True)
class Range:
    """Allowed values of a number: lo <= x (lo < x when lo_open), x <= hi; integer=True also requires an int."""

    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    integer: bool = False
    hi_open: bool = False

    def describe(self) -> str:
        kind = "an integer" if self.integer else "a finite number"
        parts = []
        if self.lo is not None:
            parts.append(f"{'>' if self.lo_open else '>='} {_fmt(self.lo)}")
        if self.hi is not None:
            parts.append(f"{'<' if self.hi_open else '<='} {_fmt(self.hi)}")
        return kind + (" " + " and ".join(parts) if parts else "")


def _fmt(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else f"{x:g}"


def number(name: str, value: Any, allowed: Range) -> int | float:
    """`value` as a number within `allowed`: finite, in range; bool and non-integral floats are refused for ints."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if ok and allowed.integer and isinstance(value, float):
        ok = value.is_integer()
        value = int(value) if ok else value
    if ok and not allowed.integer:
        ok = math.isfinite(value)
    if ok and allowed.lo is not None:
        ok = value > allowed.lo if allowed.lo_open else value >= allowed.lo
    if ok and allowed.hi is not None:
        ok = value < allowed.hi if allowed.hi_open else value <= allowed.hi
    if not ok:
        raise ConfigError(f"{name} must be {allowed.describe()}, got {value!r}")
    return value


def template(name: str, value: Any) -> str:
    """A prompt template with exactly one empty '{}' slot for the class name (literal braces as '{{' and '}}')."""
    if not isinstance(value, str):
        raise ConfigError(f"{name} must be a string with one '{{}}' where the class name goes, got {value!r}")
    try:
        fields = [f for _, f, _, _ in string.Formatter().parse(value) if f is not None]
        if fields == [""]:
            value.format("x")  # a format spec or conversion that cannot apply to a name fails here
    except (ValueError, IndexError, KeyError) as e:
        raise ConfigError(f"{name} {value!r} is not a valid template ({e}): write one '{{}}' where the class name "
                          "goes, '{{' and '}}' for literal braces") from None
    if fields != [""]:
        what = "no '{}'" if not fields else f"{len(fields)} fields ({', '.join('{' + f + '}' for f in fields)})"
        raise ConfigError(f"{name} {value!r} has {what}: write exactly one '{{}}' where the class name goes, e.g. "
                          "'a photo of a {}.'")
    return value


def device(name: str, value: Any) -> str:
    """auto, cpu, mps, cuda or cuda:N (whether the device exists is checked when the run starts, before writing)."""
    if not isinstance(value, str) or not _DEVICE.match(value.strip()):
        raise ConfigError(f"{name} {value!r} is not a device: use auto, cpu, cuda or cuda:N")
    return value.strip()


def seed(name: str, value: Any) -> int:
    return number(name, value, Range(0, SEED_MAX, integer=True))


def choice(name: str, value: Any, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        short = name.rpartition(".")[2]
        where = f" for {name}" if short != name else ""
        raise ConfigError(f"unknown {short} {value!r}{where}: use one of {', '.join(allowed)}")
    return value


def arg(check: Callable[..., Any], name: str, *extra: Any, convert: Callable[[str], Any] = str) -> Callable[[str], Any]:
    """An argparse `type=` running one of these checks, so a CLI option fails at parse time with the same words."""
    def parse(text: str) -> Any:
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} {text!r} is not a {getattr(convert, '__name__', 'value')}") \
                from None
        try:
            return check(name, value, *extra)
        except ConfigError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
    parse.__name__ = name
    return parse


# -- field metadata: one source for a config option's help, flag and allowed values ---------------------------------
def option(default: Any = dataclasses.MISSING, help: str = "", *, flag: str | None = None,
           aliases: tuple[str, ...] = (), shown: str | None = None) -> Any:
    """A dataclass field carrying its documentation: `help` (what it means, one sentence or two), `flag` (the
    command-line option of `train` / `sweep`, e.g. "--lr"; None: a key=value override only), `aliases` (former flag
    names, still accepted) and `shown` (how the default reads in --help when the value itself says little, e.g.
    None meaning "the split file's, else 16"). The CLI is generated from these (blocklora/cli/flags.py)."""
    return dataclasses.field(default=default, metadata={"help": help, "flag": flag, "aliases": tuple(aliases),
                                                        "shown": shown})


def literal_choices(typ: Any) -> tuple[str, ...] | None:
    """The allowed strings of a Literal annotation (also inside `X | None`), else None."""
    if typing.get_origin(typ) is typing.Literal:
        return tuple(typing.get_args(typ))
    if isinstance(typ, types.UnionType) or typing.get_origin(typ) is typing.Union:
        for arg in typing.get_args(typ):
            found = literal_choices(arg)
            if found:
                return found
    return None


# -- field rules for the config dataclasses: name -> rule(qualified name, value) -> checked value ------------------
Rule = Callable[[str, Any], Any]


def num(lo: float | None = None, hi: float | None = None, *, lo_open: bool = False, hi_open: bool = False,
        integer: bool = False, optional: bool = False) -> Rule:
    allowed = Range(lo, hi, lo_open, integer, hi_open)
    return lambda name, v: None if optional and v is None else number(name, v, allowed)


def one_of(*allowed: str) -> Rule:
    return lambda name, v: choice(name, v, allowed)


def boolean(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{name} must be true or false, got {value!r}")
    return value


def text(optional: bool = False, empty: bool = True) -> Rule:
    def rule(name: str, v: Any) -> str | None:
        if optional and v is None:
            return None
        if not isinstance(v, str) or (not empty and not v.strip()):
            raise ConfigError(f"{name} must be a{' non-empty' if not empty else ''} string, got {v!r}")
        return v
    return rule


def maybe(rule: Rule) -> Rule:
    """`rule`, or None: an unset field that RunConfig.resolved() fills (from a split file or the method)."""
    return lambda name, v: None if v is None else rule(name, v)


def apply(obj: Any, section: str, rules: dict[str, Rule]) -> None:
    """Check (and normalise) every field of a frozen dataclass named in `rules`; `section` prefixes the names."""
    for field_name, rule in rules.items():
        qualified = f"{section}.{field_name}" if section else field_name
        object.__setattr__(obj, field_name, rule(qualified, getattr(obj, field_name)))
