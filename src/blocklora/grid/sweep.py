"""`blocklora sweep`: the benchmark grid (datasets x shots x seeds, times any method and hyper-parameter axes), each
cell its own `blocklora train` process.

    DIR/[<axes>/]<dataset>/shots<K>/seed<S>/    a cell's run directory (what `blocklora train --output` writes);
                                                <axes> names the cell's axis values, "method=lora,n_blocks=4"
    DIR/logs/<cell>.log                         its output (appended by each attempt)
    DIR/sweep.json                              the fixed train options (a rerun or a second sweep into DIR must
                                                pass the same ones; the axes may differ: they name their folders)
    DIR/sweep.jsonl                             one line per cell outcome: done, failed, skipped, busy, interrupted
    DIR/.locks/<cell>.lock                      flock-ed while the cell runs

Axes: `--methods block_lora,lora` and any `key=v1,v2,...` override (`adapter.n_blocks=2,4,8`, `train.lr=1e-4,2e-4`,
`model=ViT-B-16,ViT-B-32`) run every combination of their values (the product, first axis outermost); a key whose
single value may hold a comma (a list such as adapter.towers, the template) separates its values with `|`
(`adapter.towers=vision|vision,text`), as may any key. Every combination's configuration goes through the config's
own checks before anything runs, and two combinations that give one configuration are refused. A method runs once
for an axis it does not read (methods.registry.reads: train.lr for tip_adapter) or whose every value it refuses
(n_blocks for lora), and an axis that applies to no method of the sweep is refused; the plan line printed first
counts the cells that result. A cell's folder name holds its axis values as the configuration has them
(`train.lr=1e-3` -> `lr=0.001`), so a rerun finds it whatever the spelling.

A slot is a device (CUDA_VISIBLE_DEVICES=<id> for its process) or a CPU worker; each slot runs one cell at a time
and the slots run in parallel. Before a cell starts, its lock is taken without waiting: a cell locked by another
sweep on the same DIR is left to it and taken again once every other cell is done, then waited for: found finished,
it is skipped; left unfinished (the other sweep stopped), it is run here. So two sweeps split the work, and each
ends only when the whole grid is finished or has failed. The lock's file descriptor is inherited by the train
process, so it stays held while that process lives even if the sweep itself is killed. Under the lock: a cell with
results.json is skipped, one with a checkpoint is continued with --resume, one with leftovers but no checkpoint
(killed before its first checkpoint) is started again with --overwrite. Rerunning a sweep therefore resumes it.
Cells are ordered by shots (most first: the longest runs start first), then axes, then dataset, then seed.

Exit status: 0 only when every cell of the grid is finished (done now or before); 1 when a cell failed, was left
unfinished or never started (a problem of the sweep itself, e.g. its manifest cannot be written, stops it and is
named); 130 / 143 when interrupted.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import itertools
import json
import os
import shlex
import socket
import stat
import sys
import time
import types
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from ..config.run_config import canonical_key
from ..errors import BlockLoRAError, ConfigError
from ..reading import loads, read_text
from . import slurm
from .reference import BENCHMARK
from .runner import (  # noqa: F401 - cell_action, try_lock and Sweep's parts re-exported
    MANIFEST,
    Cell,
    Outcome,
    Slot,
    Sweep,
    cell_action,
    duration,
    try_lock,
)

# config keys the sweep sets per cell itself (every other train option given to `sweep` is passed to every cell)
OWN = ("data.dataset", "data.root", "data.shots", "data.seed", "data.split_file", "device")
OPTIONS = "sweep.json"
AXIS_SEP = "|"  # separates an axis's values when one value may hold a comma
TEXT_KEYS = ("train.template",)  # free text: a comma is part of the value

# -- the grid --------------------------------------------------------------------------------------------------------
def parse_ints(text: str, what: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ConfigError(f"--{what} {text!r}: expected comma-separated integers such as 1,2,4,8,16") from None
    if not values or any(v < 1 for v in values) or len(set(values)) != len(values):
        raise ConfigError(f"--{what} {text!r}: expected distinct integers >= 1")
    return values


def parse_datasets(text: str) -> list[str]:
    if text.strip() == "all":
        return list(BENCHMARK)
    names = [d.strip() for d in text.split(",") if d.strip()]
    if not names or len(set(names)) != len(names):
        raise ConfigError(f"--datasets {text!r}: expected all, or distinct dataset keys such as caltech101,dtd")
    from ..data.datasets import ALIASES, DATASETS

    for name in names:
        if ALIASES.get(name, name) not in DATASETS:
            raise ConfigError(f"--datasets: unknown dataset {name!r}: use all, or some of {', '.join(DATASETS)}")
    return names


def expand(datasets: Sequence[str], shots: Sequence[int], seeds: Sequence[int],
           variants: Sequence[Variant] = ()) -> list[Cell]:
    """Every (shots, variant, dataset, seed): most shots first (longest runs first shortens the sweep), then the
    variants (the axes' combinations) and the rest as given."""
    variants = list(variants) or [Variant((), "")]
    return [Cell(d, k, s, v.axes, v.folder) for k in sorted(shots, reverse=True) for v in variants for d in datasets
            for s in seeds]


# -- method and hyper-parameter axes ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Axis:
    key: str  # the canonical config key, "adapter.n_blocks"
    values: tuple[str, ...]  # each as given ("1e-3"), passed to the cells as key=value
    words: tuple[str, ...]  # how the command gave it: ("adapter.n_blocks=2,4,8",) or ("--methods", "lora,block_lora")


@dataclass(frozen=True)
class Variant:
    """One combination of the axes' values: its (key, value) pairs and its folder name."""

    axes: tuple[tuple[str, str], ...]
    folder: str


def _holds_commas(key: str) -> bool:
    """Whether one value of `key` may itself hold a comma: a list (a tuple field) or free text."""
    from ..config.run_config import _field_type

    section, _, name = key.rpartition(".")
    typ = _field_type(section or None, name)
    members = typing.get_args(typ) if typing.get_origin(typ) in (typing.Union, types.UnionType) else (typ,)
    return key in TEXT_KEYS or any(typing.get_origin(m) is tuple for m in members)


def split_axes(overrides: Sequence[str], methods: str | None) -> tuple[list[str], list[Axis]]:
    """(fixed key=value overrides, axes): an override with several values (`key=v1,v2` or `key=v1|v2`) is an axis,
    `--methods a,b` the method axis. Raises ConfigError for an unknown key, a key given twice as an axis, a key the
    sweep sets itself, or an axis without two distinct values."""
    fixed: list[str] = []
    axes: list[Axis] = []
    if methods is not None:
        axes.append(_axis("adapter.method", methods, ",", ("--methods", methods), "--methods"))
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            fixed.append(item)  # the config's own check names it
            continue
        canon = canonical_key(key)
        if AXIS_SEP in raw:
            axes.append(_axis(canon, raw, AXIS_SEP, (item,), item))
        elif "," in raw and not _holds_commas(canon):
            axes.append(_axis(canon, raw, ",", (item,), item))
        else:
            fixed.append(item)
    keys = [a.key for a in axes]
    for a in axes:
        if a.key in OWN:
            flag = {"data.dataset": "--datasets", "data.shots": "--shots", "data.seed": "--seeds"}.get(a.key)
            raise ConfigError(f"{a.words[-1]}: {a.key} is set per cell by the sweep" +
                              (f": give its values with {flag}" if flag else ""))
        if keys.count(a.key) > 1:
            raise ConfigError(f"{a.key} is given as an axis twice: give all its values in one {a.key}=v1,v2,...")
    return fixed, axes


def _axis(key: str, raw: str, sep: str, words: tuple[str, ...], shown: str) -> Axis:
    values = tuple(v.strip() for v in raw.split(sep) if v.strip())
    if len(values) < 2 or len(set(values)) != len(values):
        raise ConfigError(f"{shown}: an axis needs two or more distinct values separated by {sep!r} "
                          f"(e.g. {key}=a{sep}b)")
    return Axis(key, values, words)


def value_text(value: Any) -> str:
    """A config value as a folder name shows it: floats in their shortest exact form (0.0002, 1e-05), lists
    joined by '+', booleans and None in lower case."""
    if isinstance(value, bool) or value is None:
        return str(value).lower()
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "+".join(value_text(v) for v in value)
    return str(value)


def short_names(keys: Sequence[str]) -> dict[str, str]:
    """Each dotted key by its last part ("n_blocks"), or whole where two keys share that part."""
    last = [k.rpartition(".")[2] for k in keys]
    return {k: n if last.count(n) == 1 else k for k, n in zip(keys, last)}


def variant_folder(pairs: Sequence[tuple[str, Any]], names: dict[str, str] | None = None) -> str:
    """"method=lora,n_blocks=4": the axis values of a cell, readable and unique ('%', '/', ',', '=' in a value are
    %-escaped; a name over 200 bytes is cut and ends in a hash of the whole). `names`: each key's short name
    (short_names of every axis of the sweep)."""
    names = names or short_names([k for k, _ in pairs])
    esc = {"%": "%25", "/": "%2F", ",": "%2C", "=": "%3D", "\\": "%5C"}
    text = ",".join(f"{names[k]}=" + "".join(esc.get(ch, ch) for ch in value_text(v)) for k, v in pairs)
    if len(text.encode()) > 200:
        text = text.encode()[:180].decode(errors="ignore") + "~" + hashlib.sha256(text.encode()).hexdigest()[:12]
    return text


def variants(args: argparse.Namespace, fixed: Sequence[str], axes: Sequence[Axis]) -> tuple[list[Variant],
                                                                                              list[str]]:
    """Every combination of the axes' values, each checked by building its configuration as its cells' train
    processes will (run_config: the fixed options, then its key=value pairs); and notes for the user.

    An axis applies to a method that reads its key (methods.registry.reads) and accepts one of its values: a method
    that does not read it (adapter.n_blocks or train.lr for tip_adapter) or refuses every value (n_blocks for lora:
    "method 'lora' means n_blocks=1") runs once without it, and a note says so. So `--methods lora,block_lora
    adapter.n_blocks=2,4,8` runs LoRA once and Block-LoRA three times. Raises ConfigError for an axis that applies to
    no method of the sweep, naming the combination for any other configuration the config refuses, and for two
    combinations that give one configuration."""
    from ..methods.registry import reads

    if not axes:
        return [], []
    names = short_names([a.key for a in axes])
    method_axis = next((a for a in axes if a.key == "adapter.method"), None)
    others = [a for a in axes if a is not method_axis]
    notes: list[str] = []
    plans: list[tuple[list[tuple[str, str]], list[Axis]]] = []  # (method pair or none, the axes that apply)
    base = _config(args, fixed, [])
    sole = None if method_axis or isinstance(base, ConfigError) else base.adapter.method  # without a method axis
    applied: dict[str, list[str]] = {a.key: [] for a in others}
    for method in (method_axis.values if method_axis else (None,)):
        head = [("adapter.method", method)] if method is not None else []
        name = method or sole
        applying = []
        for a in others:
            if name is not None and not reads(name, a.key):
                if method is not None:
                    notes.append(f"method {method} does not read {a.key}: its cells run once, without that axis")
                continue
            refused = [_config(args, fixed, [*head, (a.key, v)]) for v in a.values]
            if method is not None and all(isinstance(r, ConfigError) for r in refused) and \
                    not isinstance(_config(args, fixed, head), ConfigError):
                notes.append(f"{a.key} does not apply to method {method} ({refused[0]}): its cells run without "
                             "that axis")
                continue
            applying.append(a)
            applied[a.key].append(name or "")
        plans.append((head, applying))
    methods = list(method_axis.values) if method_axis else [sole or "?"]
    for a in others:
        if not applied[a.key]:
            what = "accepts these values of" if any(reads(m, a.key) for m in methods) else "reads"
            raise ConfigError(f"{' '.join(a.words)}: no method of the sweep ({', '.join(methods)}) {what} "
                              f"{a.key}: drop the axis, or add a method that reads it")
    out: list[Variant] = []
    seen: dict[str, str] = {}
    for head, applying in plans:
        for combo in itertools.product(*(a.values for a in applying)):
            pairs = [*head, *zip((a.key for a in applying), combo)]
            pairs.sort(key=lambda kv: [a.key for a in axes].index(kv[0]))  # the axes' order, always
            words = " ".join(f"{k}={v}" for k, v in pairs)
            cfg = _config(args, fixed, pairs)
            if isinstance(cfg, ConfigError):
                hint = " (a method takes an axis with all its values once it accepts one of them: sweep the " \
                       "combinations that fit with separate commands into the same --output)" if len(axes) > 1 else ""
                raise ConfigError(f"the cells with {words}: {cfg}{hint}")
            tree = cfg.to_dict()
            identity = json.dumps(tree, sort_keys=True)
            if identity in seen:
                raise ConfigError(f"{seen[identity]} and {words} give the same configuration: drop one value")
            seen[identity] = words
            flat = _flat(tree)
            out.append(Variant(tuple(pairs), variant_folder([(k, flat.get(k)) for k, _ in pairs], names)))
    return out, notes


def _config(args: argparse.Namespace, fixed: Sequence[str], pairs: Sequence[tuple[str, str]]) -> Any:
    """The RunConfig a cell with these axis values asks for (as `blocklora train` builds it), or the ConfigError."""
    from ..cli.flags import run_config

    try:
        return run_config(argparse.Namespace(**{**vars(args), "overrides": [*fixed, *(f"{k}={v}" for k, v in pairs)]}))
    except ConfigError as e:
        return e


def _flat(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


def parse_devices(spec: str | None, environ: dict[str, str] | None = None) -> list[Slot]:
    """"0,1" (GPU ids, as CUDA_VISIBLE_DEVICES counts them; repeat an id to run two cells on it), "cpu" (one CPU
    worker), "cpu:N" (N CPU workers); default: every visible GPU, else one CPU worker."""
    env = dict(os.environ if environ is None else environ)
    if spec is None:
        visible = env.get("CUDA_VISIBLE_DEVICES")
        if visible is not None:
            ids = [v.strip() for v in visible.split(",") if v.strip() and v.strip() != "-1"]
        else:
            import torch

            ids = [str(i) for i in range(torch.cuda.device_count())]
        spec = ",".join(ids) if ids else "cpu"
    spec = spec.strip()
    if spec == "cpu" or spec.startswith("cpu:"):
        try:
            n = int(spec[4:]) if spec != "cpu" else 1
        except ValueError:
            n = 0
        if n < 1:
            raise ConfigError(f"--devices {spec!r}: write cpu or cpu:N with N >= 1 workers")
        threads = env.get("OMP_NUM_THREADS") or str(max(1, (os.cpu_count() or 1) // n))
        return [Slot(f"cpu {i}", {"OMP_NUM_THREADS": threads}, ("--device", "cpu")) for i in range(n)]
    ids = [v.strip() for v in spec.split(",") if v.strip()]
    if not ids or any(not (v.isdigit() or v.startswith(("GPU-", "MIG-"))) for v in ids):  # indices or UUIDs
        raise ConfigError(f"--devices {spec!r}: write GPU ids such as 0,1,2,3 (repeat an id to share it), cpu or "
                          "cpu:N")
    return [Slot(f"gpu {v}", {"CUDA_VISIBLE_DEVICES": v}) for v in ids]

# -- options ---------------------------------------------------------------------------------------------------------
def add_sweep_parser(sub: Any) -> argparse.ArgumentParser:
    """The sweep subcommand: its own grid options plus every train option (flags.py) except those in OWN."""
    from ..cli.flags import add_config_file, add_config_flags, add_overrides, add_recipe

    p = sub.add_parser("sweep", help="run a grid (datasets x shots x seeds x methods and any hyper-parameter "
                                     "values), one train process per cell",
                       description="Every train option given here is passed to each cell. An axis: --methods a,b, "
                                   "or key=v1,v2 (key=v1|v2 where one value holds a comma), e.g. "
                                   "adapter.n_blocks=2,4,8 train.lr=1e-4,2e-4: every combination runs.")
    g = p.add_argument_group("sweep")
    g.add_argument("--datasets", required=True, help=f"all ({', '.join(BENCHMARK)}) or a list such as caltech101,dtd")
    g.add_argument("--shots", default="1,2,4,8,16", help="shot counts (default 1,2,4,8,16)")
    g.add_argument("--seeds", default="1,2,3", help="seeds (default 1,2,3)")
    g.add_argument("--methods", default=None, metavar="M1,M2",
                   help="a method axis: each cell is run with each of these methods (the values of --method); "
                        "default: the one --method gives")
    g.add_argument("--root", required=True, help="the folder that holds the dataset folders")
    g.add_argument("--output", required=True,
                   help="sweep directory: DIR/[<axes>/]<dataset>/shots<K>/seed<S>/ per cell")
    g.add_argument("--devices", default=None,
                   help="GPU ids 0,1,.. (one cell per id at a time), cpu, or cpu:N; default: every visible GPU, "
                        "else cpu")
    g.add_argument("--dry-run", action="store_true", help="print what each cell would run, run nothing")
    slurm.add_options(p)
    add_recipe(g)  # passed to every cell (none given: each cell's train applies the default)
    add_config_file(p)
    add_config_flags(p, exclude=OWN, title="train: ")
    add_overrides(p)
    p.set_defaults(func=cmd_sweep)
    return p


def train_options(args: argparse.Namespace) -> tuple[list[str], list[str]]:
    """(train options, fixed key=value overrides) given to the sweep, as command-line words for each cell; the axes
    (split_axes) are not among them."""
    from ..cli.flags import flag_words

    recipe = ["--recipe", args.recipe] if getattr(args, "recipe", None) else []
    fixed, _ = split_axes(list(args.overrides or []), getattr(args, "methods", None))
    return recipe + flag_words(args, exclude=OWN), fixed


def cell_argv(cell: Cell, root: str, out: Path, options: Sequence[str], overrides: Sequence[str], action: str,
              slot: Slot | None = None) -> list[str]:
    """`blocklora train` arguments of one cell (without the program): the fixed options, then its axis values."""
    argv = ["train", *options, "--dataset", cell.dataset, "--root", root, "--shots", str(cell.shots),
            "--seed", str(cell.seed), "--output", str(cell.run_dir(out))]
    argv += {"resume": ["--resume"], "overwrite": ["--overwrite"]}.get(action, [])
    argv += list(slot.argv if slot else ())
    return argv + list(overrides) + [f"{k}={v}" for k, v in cell.axes]


@dataclass
class Plan:
    """A sweep's grid, checked: its cells and the words that rebuild it."""

    cells: list[Cell]
    options: list[str]  # fixed train options (flags)
    fixed: list[str]  # fixed key=value overrides
    axes: list[Axis]
    root: str
    out: Path
    variants: list[Variant] = field(default_factory=list)
    grid: tuple[int, int, int] = (1, 1, 1)  # datasets, shot counts, seeds

    @property
    def axis_words(self) -> list[str]:
        return [w for a in self.axes for w in a.words]

    def describe(self) -> str:
        """"6 cells: 3 configurations (method=lora; ...) x 1 dataset x 2 shot counts x 1 seed": what will run."""
        n = len(self.variants) or 1
        d, k, s = self.grid
        configs = f" ({'; '.join(v.folder for v in self.variants)})" if self.variants else ""
        plural = lambda count, word: f"{count} {word}{'s' if count != 1 else ''}"  # noqa: E731
        return (f"{plural(len(self.cells), 'cell')}: {plural(n, 'configuration')}{configs} x "
                f"{plural(d, 'dataset')} x {plural(k, 'shot count')} x {plural(s, 'seed')}")


def plan(args: argparse.Namespace, slots: Sequence[Slot]) -> Plan:
    """The grid of `args`, every cell's configuration and every dataset checked; nothing is written."""
    from ..cli.flags import config_flags, run_config

    datasets = parse_datasets(args.datasets)
    shots, seeds = parse_ints(args.shots, "shots"), parse_ints(args.seeds, "seeds")
    options, fixed = train_options(args)
    _, axes = split_axes(list(args.overrides or []), getattr(args, "methods", None))
    fixed_keys = {canonical_key(w.partition("=")[0]) for w in fixed if "=" in w and w.partition("=")[0].strip()}
    flags = {f.key: f.flag for f in config_flags()}
    for a in axes:
        if a.key in fixed_keys or getattr(args, a.key, None) is not None:
            given = flags[a.key] if getattr(args, a.key, None) is not None else a.key
            raise ConfigError(f"{a.key} is both fixed ({given}) and an axis ({' '.join(a.words)}): give one")
    found, notes = variants(args, fixed, axes)
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    cells = expand(datasets, shots, seeds, found)
    out = Path(args.output).expanduser().absolute()
    root = str(Path(args.root).expanduser().absolute())
    # Every cell's configuration and every dataset must be valid before anything runs.
    base = {v.folder: _config(args, fixed, v.axes) for v in found} if found else {"": run_config(args)}
    configs = {}
    for cell in cells:
        configs[(cell.folder, cell.dataset)] = base[cell.folder].with_overrides([
            f"data.dataset={cell.dataset}", f"data.root={root}", f"data.shots={cell.shots}", f"data.seed={cell.seed}",
            *(["device=cpu"] if "--device" in slots[0].argv else [])])
    _check_data(configs.values())
    if out.exists() and not out.is_dir():
        raise BlockLoRAError(f"--output {out} is a file: choose a directory")
    warning = _unread_warning(args, axes, base.values())
    if warning:
        print(warning, file=sys.stderr)
    return Plan(cells, options, fixed, axes, root, out, found, (len(datasets), len(shots), len(seeds)))


def _unread_warning(args: argparse.Namespace, axes: Sequence[Axis], configs: Any) -> str | None:
    """One warning line naming the fixed options (flags, key=value) that a method of the sweep never reads
    (methods.registry.reads): its cells are given them and ignore them. None when every method reads them all."""
    from ..cli.flags import given_options
    from ..methods.registry import unread

    given = given_options(args, exclude=(*OWN, *(a.key for a in axes)))
    parts = []
    for method in dict.fromkeys(c.adapter.method for c in configs):
        ignored = unread(method, given)
        if ignored:
            parts.append(f"method {method} does not read {', '.join(given[k] for k in ignored)}")
    return f"warning: {'; '.join(parts)}: ignored by those cells" if parts else None


# -- the command -----------------------------------------------------------------------------------------------------
def cmd_sweep(args: argparse.Namespace) -> int:
    slots = parse_devices(args.devices)
    g = plan(args, slots)
    out, cells = g.out, g.cells
    mine = {"train_options": g.options, "overrides": g.fixed}
    recorded = _read_options(out)
    if recorded is not None and not _same(recorded, mine):
        raise _other_options(out, recorded, mine)
    if args.emit:
        out.mkdir(parents=True, exist_ok=True)
        _claim_options(out, mine)
        argv = slurm.sweep_argv(args, out, g.root, g.options, g.fixed, g.axis_words)
        script = slurm.emit(args, cells, argv, out)
        print(f"SLURM job array of {len(cells)} cells written: {script} (submit it with: sbatch {script}; "
              "resubmitting skips finished cells)")
        return 0
    if args.cell is not None:  # one array task: exactly this cell, on the first slot
        cells, slots = slurm.select(cells, args.cell), slots[:1]
    else:
        print(f"plan of sweep {out}: {g.describe()}", flush=True)  # what will run, before anything does
    if args.dry_run:
        for cell in cells:
            action = cell_action(cell.run_dir(out))
            line = "skip (finished)" if action == "skip" else \
                "blocklora " + shlex.join(cell_argv(cell, g.root, out, g.options, g.fixed, action, slots[0]))
            print(f"{cell.label}: {line}")
        return 0
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    try:
        manifest = _open_manifest(out)
    except BaseException:
        if created:
            with contextlib.suppress(OSError):
                out.rmdir()  # made by this call and still empty: nothing left behind
        raise
    with manifest:
        _claim_options(out, mine)
        sweep = Sweep(cells, slots, out, lambda c, a, s: cell_argv(c, g.root, out, g.options, g.fixed, a, s),
                      manifest=manifest)
        outcomes = sweep.run()
    return _report(outcomes, len(cells), out, time.monotonic() - sweep.started, sweep.interrupted, sweep.errors)


def _open_manifest(out: Path) -> IO[bytes]:
    """DIR/sweep.jsonl opened for appending before any cell runs (the check is the handle the sweep then uses): a
    regular file only, never through a link (OSError otherwise: a folder, a FIFO, a link, no permission)."""
    path = out / MANIFEST
    flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK  # a FIFO: ENXIO, not a hang
    try:
        fd = os.open(path, flags, 0o666)
    except OSError as e:
        reason = "it is a symbolic link" if path.is_symlink() else e.strerror or str(e)
        raise BlockLoRAError(f"cannot write the sweep's manifest {path} ({reason}): nothing was run; remove or "
                             "fix it and rerun") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise BlockLoRAError(f"cannot write the sweep's manifest {path} (not a regular file): nothing was run; "
                             "remove it and rerun")
    return os.fdopen(fd, "ab", buffering=0)


def _words(options: dict[str, Any]) -> str:
    return " ".join(options.get("train_options", []) + options.get("overrides", [])) or "(none)"


def _other_options(out: Path, recorded: dict[str, Any], mine: dict[str, Any]) -> BlockLoRAError:
    by = f" by {recorded['written_by']}" if isinstance(recorded.get("written_by"), str) else ""
    return BlockLoRAError(f"{out} was swept{by} with other train options ({_words(recorded)} vs {_words(mine)}): "
                          f"sweep into another --output, make them an axis (key=v1,v2), or delete {out / OPTIONS} to "
                          "mix configurations")


def _same(recorded: dict[str, Any] | None, mine: dict[str, Any]) -> bool:
    return recorded is not None and all(recorded.get(k) == mine[k] for k in ("train_options", "overrides"))


def _read_options(out: Path) -> dict[str, Any] | None:
    path = out / OPTIONS
    if not path.exists() and not path.is_symlink():
        return None
    try:
        data = loads(read_text(path))  # reading.py: a regular file, nesting bounded
    except (OSError, ValueError) as e:
        raise BlockLoRAError(f"cannot read {path} ({e}): delete it if the sweep's options are what you pass now") \
            from None
    if not isinstance(data, dict) or not isinstance(data.get("train_options"), list) or \
            not isinstance(data.get("overrides"), list):
        raise BlockLoRAError(f"{path} is not a sweep's options file: delete it if the sweep's options are what you "
                             "pass now")
    return data


def _claim_options(out: Path, mine: dict[str, Any]) -> None:
    """Record the sweep's fixed options in DIR/sweep.json, created exclusively (a hard link of a complete temporary
    file: never a replace), so of two sweeps started at once with other options the second refuses."""
    from ..ownership import fix_mode, temp_prefix

    path = out / OPTIONS
    if _read_options(out) is None:
        import tempfile

        fd, tmp = tempfile.mkstemp(prefix=temp_prefix(OPTIONS), suffix=".tmp", dir=out)
        try:
            with os.fdopen(fd, "w") as fh:
                by = f"blocklora sweep (pid {os.getpid()} on {socket.gethostname()})"
                fh.write(json.dumps({**mine, "written_by": by}, indent=2) + "\n")
                fh.flush()
                os.fsync(fh.fileno())
            fix_mode(tmp)
            with contextlib.suppress(FileExistsError):  # another sweep was first: compared below
                os.link(tmp, path)
        finally:
            os.unlink(tmp)
    recorded = _read_options(out)
    if not _same(recorded, mine):
        raise _other_options(out, recorded or {}, mine)


def _check_data(configs) -> None:
    """Each dataset (and cross-dataset target) opens under the root and fits the class protocol: one bad path must
    not fail 165 cells."""
    from ..data import load_dataset
    from ..data.protocols import check_classes

    seen: set[tuple[str, Any]] = set()
    opened: dict[str, Any] = {}
    for cfg in configs:
        for name in (cfg.data.dataset, *cfg.eval.datasets):
            if name not in opened:
                opened[name] = load_dataset(name, cfg.data.root,
                                            cfg.data.test_fraction if name == cfg.data.dataset else None)
            if name == cfg.data.dataset and (name, cfg.data.classes) not in seen:
                seen.add((name, cfg.data.classes))
                check_classes(opened[name], "training", cfg.data.classes)


def _report(outcomes: list[Outcome], total: int, out: Path, seconds: float, interrupted: int,
            errors: Sequence[str] = ()) -> int:
    """Print the sweep's outcome; its exit status: 0 only when every cell is finished (done or skipped)."""
    counts = {s: sum(o.status == s for o in outcomes) for s in ("done", "skipped", "busy", "failed", "interrupted")}
    counts["not started"] = total - len(outcomes)
    parts = [f"{n} {s}" for s, n in counts.items() if n]
    print(f"sweep {out}: {total} cell{'s' if total != 1 else ''}: {', '.join(parts)} in {duration(seconds)}"
          f" (per cell: {out / MANIFEST}; table: blocklora summarize {out})")
    failed = [o for o in outcomes if o.status in ("failed", "interrupted", "busy")]
    if failed:
        print("not finished (rerun the same command to resume them):")
        for o in failed:
            why = "another sweep still holds it" if o.status == "busy" else \
                f"exit {o.returncode}: {o.error or '?'} (log: {o.log})"
            print(f"  {o.cell.label}: {why}")
    if interrupted:
        return interrupted
    for e in errors:  # the sweep's own problem: one line each, on stderr like every error
        print(f"error: the sweep stopped: {e}; {counts['not started']} cell(s) not started (fix it and rerun the "
              "same command to continue)", file=sys.stderr)
    unfinished = total - counts["done"] - counts["skipped"]
    return 1 if unfinished or errors else 0
