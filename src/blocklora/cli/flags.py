"""Command-line flags generated from the config fields' metadata (checks.option): one source per option.

Every RunConfig field whose metadata names a `flag` becomes an option of `train` and `sweep` (and of the other
subcommands that take it: `params`, `zeroshot`), with the field's help text, its default shown and, for a Literal
field, its choices. A given flag travels as a key=value override, so the config alone checks it (one ConfigError
naming the key); a flag not given leaves the field as the base config has it (the defaults, or --config FILE).

To add an option: add the field with `option(default, "help", flag="--name")` in config.py (or adapters/config.py).
Nothing else: the flag, its help, sweep's copy and the run's config.json follow. Without `flag=` the field is still
a key=value override (`blocklora config` lists every key).
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import sys
import typing
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import checks
from ..checks import literal_choices
from ..config.run_config import EVAL_SPLITS, RunConfig

_OVERRIDE = re.compile(r"^[A-Za-z_][A-Za-z0-9_.]*=")


class HelpFormatter(argparse.HelpFormatter):
    """Every option's help ends with its default (or says it is required): `--help` is the reference."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text or action.default is argparse.SUPPRESS or isinstance(action, argparse._HelpAction):
            return text
        if action.required or (not action.option_strings and action.nargs in ("+", None)):
            return f"{text} (required)"
        if isinstance(action, argparse._StoreTrueAction):
            return f"{text} (default: off)"
        return f"{text} (default: {'none' if action.default is None else '%(default)s'})"

    def _split_lines(self, text: str, width: int) -> list[str]:
        # never inside a name: "effnet-minilm", "tiny-clip", "clip-lora" stay whole (argparse breaks on hyphens)
        import textwrap

        return textwrap.wrap(self._whitespace_matcher.sub(" ", text).strip(), width, break_on_hyphens=False)


class RawDescriptionHelpFormatter(HelpFormatter, argparse.RawDescriptionHelpFormatter):
    """HelpFormatter keeping the description's own line breaks (a table of what each family writes)."""


class Parser(argparse.ArgumentParser):
    """blocklora's argparse parser: errors are one `error:` line (exit 2), every help shows its default, and
    key=value overrides are taken anywhere on the line."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> None:  # one line, like every other user error
        print(f"error: {message} (see `{self.prog} --help`)", file=sys.stderr)
        raise SystemExit(2)

    def parse_known_args(self, args: Any = None, namespace: Any = None) -> Any:
        """key=value overrides anywhere on the line: argparse gives a nargs="*" positional only its first run of
        words, so the later runs are collected here (for the parsers that take overrides)."""
        ns, extras = super().parse_known_args(args, namespace)
        if isinstance(getattr(ns, "overrides", None), list):
            ns.overrides += [w for w in extras if _OVERRIDE.match(w)]
            extras = [w for w in extras if not _OVERRIDE.match(w)]
        return ns, extras


SECTIONS = {"": "backbone", "adapter": "adapter", "data": "data", "train": "training", "eval": "evaluation"}


@dataclass(frozen=True)
class Flag:
    """One config field as a command-line option."""

    key: str  # the dotted config key: "train.lr", or "model" for a top-level field
    flag: str  # "--lr"
    aliases: tuple[str, ...]  # former names, still accepted ("--blocks")
    help: str
    shown: str  # the default as --help shows it
    boolean: bool  # a --name / --no-name switch
    choices: tuple[str, ...] | None  # a Literal field's allowed values

    @property
    def section(self) -> str:
        return self.key.rpartition(".")[0]


def config_flags() -> list[Flag]:
    """Every field with a flag, in RunConfig's order (top-level fields, then adapter, data, train, eval)."""
    out = []
    sections = [("", RunConfig)] + [(f.name, f.default_factory) for f in dataclasses.fields(RunConfig)
                                    if f.default_factory is not dataclasses.MISSING]
    for section, cls in sections:
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            flag = f.metadata.get("flag")
            if not flag:
                continue
            default = f.default
            shown = f.metadata.get("shown") or _show(default)
            out.append(Flag(f"{section}.{f.name}" if section else f.name, flag, f.metadata.get("aliases", ()),
                            f.metadata["help"], shown, hints[f.name] is bool, literal_choices(hints[f.name])))
    return out


def _show(value: Any) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, (tuple, list)):
        return ",".join(map(str, value)) or "none"
    return "none" if value is None or value == "" else str(value)


def add_config_flags(parser: argparse.ArgumentParser, keys: Iterable[str] | None = None,
                     exclude: Iterable[str] = (), defaults: dict[str, Any] | None = None,
                     title: str = "") -> list[Flag]:
    """Add the flags of the config keys `keys` (default: every flagged key) minus `exclude`, grouped by section.
    `defaults`: a subcommand's own default for a key (params: pretrained "none"), applied as if given."""
    wanted = set(keys) if keys is not None else None
    skip, defaults = set(exclude), defaults or {}
    flags = [f for f in config_flags() if (wanted is None or f.key in wanted) and f.key not in skip]
    groups: dict[str, Any] = {}
    for f in flags:
        if f.section not in groups:
            groups[f.section] = parser.add_argument_group(f"{title}{SECTIONS[f.section]}")
        default = defaults.get(f.key)
        shown = _show(default) if f.key in defaults else f.shown
        kwargs: dict[str, Any] = {"dest": f.key, "default": default, "help": f"{f.help} (default: {shown})"}
        if f.boolean:
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            kwargs["metavar"] = f.flag[2:].replace("-", "_").upper() if not f.choices else None
            kwargs["choices"] = f.choices
        if kwargs.get("metavar") is None:
            kwargs.pop("metavar", None)
        groups[f.section].add_argument(f.flag, *f.aliases, **kwargs)
    return flags


def add_config_file(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default=None, metavar="FILE",
                        help="start from this JSON or TOML config (sections adapter, data, train, eval; or a run's "
                             "config.json, which reproduces that run); flags and key=value overrides apply on top "
                             "(default: the reference recipe)")


def add_overrides(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("overrides", nargs="*", metavar="key=value", default=[],
                        help="any config value, e.g. train.lr=1e-4 or adapter.method=lora, anywhere on the line "
                             "(`blocklora config` lists every key; default: none)")


def overrides_from(args: argparse.Namespace) -> list[str]:
    """The given config flags as key=value overrides, in config order."""
    out = []
    for f in config_flags():
        value = getattr(args, f.key, None)
        if value is not None:
            out.append(f"{f.key}={str(value).lower() if f.boolean else value}")
    return out


def run_config(args: argparse.Namespace, recorded: RunConfig | None = None) -> RunConfig:
    """The RunConfig the parsed options ask for: the base (`recorded`, a resumed run's request as its config.json
    records it; else --config FILE; else the defaults), then --recipe's values, then the flags, then key=value
    overrides (the last word wins). Without --recipe the default recipe (recipes.DEFAULT_RECIPE) applies, except on
    a recorded request: it holds the values of the recipe its run was started with, which a default must not
    replace. Raises ConfigError naming the first bad key or value."""
    from ..config.recipes import DEFAULT_RECIPE
    from ..config.run_config import recipe_overrides

    path = getattr(args, "config", None)
    base = recorded if recorded is not None else RunConfig.from_file(path) if path else RunConfig()
    recipe = getattr(args, "recipe", None)  # a named recipe (config.RECIPES) first: every option after it wins
    if recipe is None and recorded is None:
        recipe = DEFAULT_RECIPE
    return base.with_overrides((recipe_overrides(recipe) if recipe else []) + overrides_from(args)
                               + list(getattr(args, "overrides", None) or []))


def given_options(args: argparse.Namespace, exclude: Sequence[str] = ()) -> dict[str, str]:
    """{config key: how the command line gave it ("--lr", "train.lr")} of the config options given as flags or
    key=value overrides (not --config FILE or --recipe: their tables set keys the user did not pick one by one), in
    the order given, keys in `exclude` left out. Call after run_config has checked them (an unknown key is skipped)."""
    from ..config.run_config import canonical_key
    from ..errors import ConfigError

    out = {f.key: f.flag for f in config_flags() if getattr(args, f.key, None) is not None}
    for item in getattr(args, "overrides", None) or []:
        key, sep, _ = item.partition("=")
        if not sep or not key.strip():
            continue
        try:
            out.setdefault(canonical_key(key), key.strip())
        except ConfigError:
            continue
    return {k: v for k, v in out.items() if k not in exclude}


def unread_warning(method: str, given: dict[str, str]) -> str | None:
    """The warning line for options (given_options) that `method` never reads, or None when it reads them all."""
    from ..methods.registry import is_baseline, unread

    ignored = unread(method, given)
    if not ignored:
        return None
    own = " (a baseline's recipe is its paper's, set by baseline.* keys: docs/recipe.md)" \
        if is_baseline(method) and any(k.startswith(("adapter.", "train.")) for k in ignored) else ""
    return (f"warning: method {method} does not read {', '.join(given[k] for k in ignored)}{own}: "
            f"{'it is' if len(ignored) == 1 else 'they are'} ignored")


def flag_words(args: argparse.Namespace, exclude: Sequence[str] = ()) -> list[str]:
    """The given config flags (and --config, as an absolute path) as `blocklora train` words, for sweep's cells."""
    words = ["--config", str(Path(args.config).absolute())] if getattr(args, "config", None) else []
    for f in config_flags():
        value = getattr(args, f.key, None)
        if value is None or f.key in exclude:
            continue
        if f.boolean:
            words.append(f.flag if value else "--no-" + f.flag[2:])
        else:
            words += [f.flag, str(value)]
    return words


def field_help(key: str) -> str:
    """The help text of config key `key` (for a subcommand's own option on the same concept)."""
    section, _, name = key.rpartition(".")
    cls = RunConfig if not section else next(f.default_factory for f in dataclasses.fields(RunConfig)
                                              if f.name == section)
    return next(f.metadata["help"] for f in dataclasses.fields(cls) if f.name == name)


def add_recipe(parser: Any) -> None:
    """--recipe NAME: a named table of recipe values (recipes.RECIPES) applied before every other option. Its
    default is None (not given): run_config then applies recipes.DEFAULT_RECIPE, unless a resumed run's recorded
    request is the base (the recipe it was started with stays)."""
    from ..config.recipes import DEFAULT_RECIPE, RECIPES

    quick = ", ".join(f"{k.split('.')[1]} {v:g}" for k, v in RECIPES["quick"].items())
    parser.add_argument("--recipe", choices=tuple(RECIPES), default=None,
                        help="reference: CLIP-LoRA's GPU recipe, 500 x shots steps of batch 32, lr 2e-4; quick: the "
                             f"demo's CPU budget, {quick} (minutes on a CPU). Options and key=value overrides change "
                             f"single values of either (default: {DEFAULT_RECIPE}; a resumed run keeps the recipe it "
                             "was started with)")


def int_arg(name: str, lo: int, hi: int | None = None) -> Any:
    """An argparse type: an integer in [lo, hi], else a one-line error with the option's name (checks.number)."""
    return checks.arg(checks.number, name, checks.Range(lo, hi, integer=True), convert=int)


def section_keys(section: str) -> list[str]:
    """The flagged config keys of one section ("adapter", "train", ...)."""
    return [f.key for f in config_flags() if f.section == section]


# -- option groups of the subcommands that read data or a trained adapter --------------------------------------
def data_options(p: argparse.ArgumentParser, own: bool = False) -> None:
    """--dataset, --root, --test-fraction; `own`: they default to the data the adapter was trained on (eval)."""
    g = p.add_argument_group("data")
    g.add_argument("--dataset", required=not own, default=None, help=field_help("data.dataset") + (
        " (default: the dataset the adapter was trained on, with its root, classes and test fraction)" if own else ""))
    g.add_argument("--root", default=None if own else "", help=field_help("data.root") + (
        " (default: the trained-on dataset's root with the default --dataset, else the current directory)"
        if own else ""))
    g.add_argument("--test-fraction", type=checks.arg(checks.number, "--test-fraction", checks.Range(
        0, 1, lo_open=True, hi_open=True), convert=float), default=None, help=field_help("data.test_fraction"))


def trained_options(p: argparse.ArgumentParser) -> None:
    """The options of the subcommands that load a trained adapter."""
    p.add_argument("--pretrained", default=None, help="the backbone weights, if not where training found them "
                                                      "(default: the path the adapter recorded)")
    p.add_argument("--tokenizer", default=None, metavar="DIR", help=field_help("tokenizer") +
                   " (default: the one the adapter recorded)")
    p.add_argument("--force", action="store_true", help="load even if the backbone fingerprint differs")


def eval_options(p: argparse.ArgumentParser, trained: bool = True) -> None:
    p.add_argument("--split", choices=(*EVAL_SPLITS, "train"), default="test", help="the split evaluated")
    p.add_argument("--batch-size", type=int_arg("--batch-size", 1, 65536), default=128,
                   help="evaluation batch size (accuracy does not depend on it)")
    p.add_argument("--limit", "--test-images", dest="limit", type=int_arg("--limit", 1), default=None,
                   help=field_help("eval.limit") + " (default: every image)")
    p.add_argument("--workers", type=int_arg("--workers", -1, 256), default=-1, help=field_help("data.workers"))
    p.add_argument("--device", default="auto", type=checks.arg(checks.device, "--device"), help=field_help("device"))
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.add_argument("--skip-bad-images", action="store_true", help="skip unreadable images (listed in the output)")
    if trained:
        trained_options(p)
