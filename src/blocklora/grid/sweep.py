"""`blocklora sweep`: the benchmark grid (datasets x shots x seeds), each cell its own `blocklora train` process.

    DIR/<dataset>/shots<K>/seed<S>/          a cell's run directory (what `blocklora train --output` writes)
    DIR/logs/<dataset>_shots<K>_seed<S>.log  its output (appended by each attempt)
    DIR/sweep.json                           the train options of the sweep (a rerun must pass the same ones)
    DIR/sweep.jsonl                          one line per cell outcome: done, failed, skipped, busy, interrupted
    DIR/.locks/<cell>.lock                   flock-ed while the cell runs

A slot is a device (CUDA_VISIBLE_DEVICES=<id> for its process) or a CPU worker; each slot runs one cell at a time
and the slots run in parallel. Before a cell starts, its lock is taken without waiting: a cell locked by another
sweep on the same DIR is left to it ("busy"), so two sweeps split the work. The lock's file descriptor is inherited
by the train process, so it stays held while that process lives even if the sweep itself is killed. Under the lock:
a cell with results.json is skipped, one with a checkpoint is continued with --resume, one with leftovers but no
checkpoint (killed before its first checkpoint) is started again with --overwrite. Rerunning a sweep therefore
resumes it. Cells are ordered by shots (most first: the longest runs start first), then dataset, then seed.
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

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


def expand(datasets: Sequence[str], shots: Sequence[int], seeds: Sequence[int]) -> list[Cell]:
    """Every (dataset, shots, seed); most shots first (longest runs first shortens the sweep), then as given."""
    return [Cell(d, k, s) for k in sorted(shots, reverse=True) for d in datasets for s in seeds]


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

    p = sub.add_parser("sweep", help="run the benchmark grid (datasets x shots x seeds), one train process per cell",
                       description="Every train option given here is passed to each cell.")
    g = p.add_argument_group("sweep")
    g.add_argument("--datasets", required=True, help=f"all ({', '.join(BENCHMARK)}) or a list such as caltech101,dtd")
    g.add_argument("--shots", default="1,2,4,8,16", help="shot counts (default 1,2,4,8,16)")
    g.add_argument("--seeds", default="1,2,3", help="seeds (default 1,2,3)")
    g.add_argument("--root", required=True, help="the folder that holds the dataset folders")
    g.add_argument("--output", required=True, help="sweep directory: DIR/<dataset>/shots<K>/seed<S>/ per cell")
    g.add_argument("--devices", default=None,
                   help="GPU ids 0,1,.. (one cell per id at a time), cpu, or cpu:N; default: every visible GPU, "
                        "else cpu")
    g.add_argument("--dry-run", action="store_true", help="print what each cell would run, run nothing")
    slurm.add_options(p)
    add_recipe(g, default=None)  # passed to every cell
    add_config_file(p)
    add_config_flags(p, exclude=OWN, title="train: ")
    add_overrides(p)
    p.set_defaults(func=cmd_sweep)
    return p


def train_options(args: argparse.Namespace) -> tuple[list[str], list[str]]:
    """(train options, key=value overrides) given to the sweep, as command-line words for each cell."""
    from ..cli.flags import flag_words

    recipe = ["--recipe", args.recipe] if getattr(args, "recipe", None) else []
    return recipe + flag_words(args, exclude=OWN), list(args.overrides or [])


def cell_argv(cell: Cell, root: str, out: Path, options: Sequence[str], overrides: Sequence[str], action: str,
              slot: Slot | None = None) -> list[str]:
    """`blocklora train` arguments of one cell (without the program)."""
    argv = ["train", *options, "--dataset", cell.dataset, "--root", root, "--shots", str(cell.shots),
            "--seed", str(cell.seed), "--output", str(cell.run_dir(out))]
    argv += {"resume": ["--resume"], "overwrite": ["--overwrite"]}.get(action, [])
    argv += list(slot.argv if slot else ())
    return argv + list(overrides)


# -- the command -----------------------------------------------------------------------------------------------------
def cmd_sweep(args: argparse.Namespace) -> int:
    from ..cli.flags import run_config

    datasets = parse_datasets(args.datasets)
    cells = expand(datasets, parse_ints(args.shots, "shots"), parse_ints(args.seeds, "seeds"))
    slots = parse_devices(args.devices)
    out = Path(args.output).expanduser().absolute()
    root = str(Path(args.root).expanduser().absolute())
    options, overrides = train_options(args)
    # Every cell's configuration and every dataset must be valid before anything runs.
    base = run_config(args)
    configs = {}
    for cell in cells:
        configs[cell.dataset] = base.with_overrides([f"data.dataset={cell.dataset}", f"data.root={root}",
                                                     f"data.shots={cell.shots}", f"data.seed={cell.seed}",
                                                     *(["device=cpu"] if "--device" in slots[0].argv else [])])
    _check_data(configs.values())
    if out.exists() and not out.is_dir():
        raise BlockLoRAError(f"--output {out} is a file: choose a directory")
    recorded = _read_options(out)
    mine = {"train_options": options, "overrides": overrides}
    if recorded is not None and recorded != mine:
        raise BlockLoRAError(f"{out} was swept with other train options ({_words(recorded)} vs {_words(mine)}): "
                             f"sweep into another --output, or delete {out / OPTIONS} to mix configurations")
    if args.emit:
        out.mkdir(parents=True, exist_ok=True)
        if recorded is None:
            from ..engine.files import write_json

            write_json(out / OPTIONS, mine)
        script = slurm.emit(args, cells, slurm.sweep_argv(args, out, root, options, overrides), out)
        print(f"SLURM job array of {len(cells)} cells written: {script} (submit it with: sbatch {script}; "
              "resubmitting skips finished cells)")
        return 0
    if args.cell is not None:  # one array task: exactly this cell, on the first slot
        cells, slots = slurm.select(cells, args.cell), slots[:1]
    if args.dry_run:
        for cell in cells:
            action = cell_action(cell.run_dir(out))
            line = "skip (finished)" if action == "skip" else \
                "blocklora " + " ".join(cell_argv(cell, root, out, options, overrides, action, slots[0]))
            print(f"{cell.label}: {line}")
        return 0
    out.mkdir(parents=True, exist_ok=True)
    if recorded is None:
        from ..engine.files import write_json

        write_json(out / OPTIONS, mine)
    sweep = Sweep(cells, slots, out, lambda c, a, s: cell_argv(c, root, out, options, overrides, a, s))
    outcomes = sweep.run()
    return _report(outcomes, len(cells), out, time.monotonic() - sweep.started, sweep.interrupted)


def _words(options: dict[str, Any]) -> str:
    return " ".join(options.get("train_options", []) + options.get("overrides", [])) or "(none)"


def _read_options(out: Path) -> dict[str, Any] | None:
    path = out / OPTIONS
    if not path.exists():
        return None
    try:
        return loads(read_text(path))  # reading.py: a regular file, nesting bounded
    except (OSError, ValueError) as e:
        raise BlockLoRAError(f"cannot read {path} ({e}): delete it if the sweep's options are what you pass now") \
            from None


def _check_data(configs) -> None:
    """Each dataset (and cross-dataset target) opens under the root and fits the class protocol: one bad path must
    not fail 165 cells."""
    from ..data import load_dataset
    from ..data.protocols import check_classes

    seen: set[str] = set()
    for cfg in configs:
        for name in (cfg.data.dataset, *cfg.eval.datasets):
            if name not in seen:
                seen.add(name)
                data = load_dataset(name, cfg.data.root)
                if name == cfg.data.dataset:
                    check_classes(data, "training", cfg.data.classes)

def _report(outcomes: list[Outcome], total: int, out: Path, seconds: float, interrupted: int) -> int:
    counts = {s: sum(o.status == s for o in outcomes) for s in ("done", "skipped", "busy", "failed", "interrupted")}
    counts["not started"] = total - len(outcomes)
    parts = [f"{n} {s}" for s, n in counts.items() if n]
    print(f"sweep {out}: {total} cell{'s' if total != 1 else ''}: {', '.join(parts)} in {duration(seconds)}"
          f" (per cell: {out / MANIFEST}; table: blocklora summarize {out})")
    failed = [o for o in outcomes if o.status in ("failed", "interrupted")]
    if failed:
        print("not finished (rerun the same command to resume them):")
        for o in failed:
            print(f"  {o.cell.label}: exit {o.returncode}: {o.error or '?'} (log: {o.log})")
    if interrupted:
        return interrupted
    return 1 if counts["failed"] else 0
