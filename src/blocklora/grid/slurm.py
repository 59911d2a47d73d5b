"""`blocklora sweep ... --emit slurm`: the sweep's grid as a SLURM job array, one array task per cell.

Each task runs `blocklora sweep <the same options> --cell $SLURM_ARRAY_TASK_ID`: exactly one cell of the grid, with
the sweep's own rules (its lock, skip when results.json exists, --resume from a checkpoint, --overwrite of
leftovers), so a resubmitted array redoes nothing that finished and continues what was cut. Cells are numbered
0..N-1 in the sweep's order (sweep.expand); the script lists them in its comments. Resources are options
(--slurm-*); everything else is in the sweep's directory as before (sweep.json, sweep.jsonl, logs/).
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path

from ..errors import BlockLoRAError, ConfigError
from ..ownership import umask

HEADER = "# blocklora sweep job array"  # the first comment of every script we write (an existing one is ours)
SCRIPT = "sweep.slurm"


def add_options(p: argparse.ArgumentParser) -> None:
    """The cluster options of `sweep`: --emit, --cell and the job's resources."""
    g = p.add_argument_group("cluster (SLURM job arrays)")
    g.add_argument("--emit", choices=("slurm",), default=None,
                   help="write a SLURM job-array script (one array task per cell) instead of running the grid")
    g.add_argument("--cell", type=int, default=None, metavar="K",
                   help="run only cell K (0-based, the sweep's order; what each array task passes as "
                        "$SLURM_ARRAY_TASK_ID), with the usual skip / lock / resume rules")
    g.add_argument("--slurm-script", default=None, metavar="FILE", help=f"where to write it (default DIR/{SCRIPT})")
    g.add_argument("--slurm-partition", default=None, help="the partition to submit to (default: the cluster's)")
    g.add_argument("--slurm-account", default=None, help="the account to charge (default: yours)")
    g.add_argument("--slurm-time", default="24:00:00", help="wall time per cell (default 24:00:00)")
    g.add_argument("--slurm-gpus", type=int, default=1, help="GPUs per cell (default 1; 0: a CPU job)")
    g.add_argument("--slurm-cpus", type=int, default=8, help="CPU cores per cell (default 8)")
    g.add_argument("--slurm-mem", default="32G", help="memory per cell (default 32G)")
    g.add_argument("--slurm-max-parallel", type=int, default=None, metavar="N",
                   help="at most N cells at once (the array's %%N)")
    g.add_argument("--slurm-extra", action="append", default=[], metavar="LINE",
                   help="another #SBATCH option, e.g. --slurm-extra=--qos=high (repeatable)")


def select(cells: Sequence, k: int) -> list:
    """[cells[k]], or a ConfigError naming the valid range."""
    if not 0 <= k < len(cells):
        raise ConfigError(f"--cell {k}: this grid has cells 0..{len(cells) - 1} ({len(cells)} in all)")
    return [cells[k]]


def sweep_argv(args: argparse.Namespace, out: Path, root: str, options: Sequence[str],
               overrides: Sequence[str], axes: Sequence[str] = ()) -> list[str]:
    """The `blocklora sweep` words that name this grid, its train options and its axes (no --emit, --cell or
    --devices): each array task rebuilds the same grid, in the same order."""
    return ["sweep", "--datasets", args.datasets, "--shots", args.shots, "--seeds", args.seeds, "--root", root,
            "--output", str(out), *options, *overrides, *axes]


def script_text(args: argparse.Namespace, cells: Sequence, argv: Sequence[str], out: Path) -> str:
    """The job-array script: #SBATCH resources, one line per cell in comments, the cell's command."""
    for name, lo in (("--slurm-gpus", 0), ("--slurm-cpus", 1), ("--slurm-max-parallel", 1)):
        value = getattr(args, name[2:].replace("-", "_"))
        if value is not None and value < lo:
            raise ConfigError(f"{name} {value}: must be at least {lo}")
    array = f"0-{len(cells) - 1}" + (f"%{args.slurm_max_parallel}" if args.slurm_max_parallel else "")
    sbatch = [f"--job-name=blocklora-{out.name}", f"--array={array}", f"--time={args.slurm_time}",
              f"--cpus-per-task={args.slurm_cpus}", f"--mem={args.slurm_mem}",
              f"--output={out / 'logs' / 'slurm-%A_%a.out'}"]
    if args.slurm_gpus:
        sbatch.append(f"--gpus={args.slurm_gpus}")
    sbatch += [f"--partition={args.slurm_partition}"] * bool(args.slurm_partition)
    sbatch += [f"--account={args.slurm_account}"] * bool(args.slurm_account)
    sbatch += list(args.slurm_extra)
    bad = next((s for s in sbatch if "\n" in s), None)
    if bad is not None:
        raise ConfigError(f"SLURM option {bad!r} spans lines: give one option per --slurm-extra")
    device = [] if args.slurm_gpus else ["--devices", "cpu"]
    command = " ".join(shlex.quote(w) for w in [sys.executable, "-m", "blocklora", *argv, *device])
    lines = ["#!/bin/bash", HEADER, *(f"#SBATCH {s}" for s in sbatch), "#",
             f"# {len(cells)} cells (array task id = cell); resubmitting skips finished cells, resumes cut ones:",
             *(f"#   {i}: {c.label}" for i, c in enumerate(cells)),
             "set -euo pipefail",
             "export OMP_NUM_THREADS=\"${SLURM_CPUS_PER_TASK:-1}\"",
             f"exec {command} --cell \"$SLURM_ARRAY_TASK_ID\"", ""]
    return "\n".join(lines)


def emit(args: argparse.Namespace, cells: Sequence, argv: Sequence[str], out: Path) -> Path:
    """Write the script (replacing only a script blocklora wrote); returns its path."""
    from ..engine.files import atomic_write

    path = Path(args.slurm_script).expanduser() if args.slurm_script else out / SCRIPT
    text = script_text(args, cells, argv, out)
    if path.exists():
        try:
            ours = path.is_file() and path.read_text(errors="replace").splitlines()[1:2] == [HEADER]
        except OSError:
            ours = False
        if not ours:
            raise BlockLoRAError(f"{path} exists and is not a script blocklora wrote: choose another --slurm-script")
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda fh: fh.write(text.encode()))
    os.chmod(path, 0o755 & ~umask())
    return path
