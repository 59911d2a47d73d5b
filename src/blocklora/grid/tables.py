"""The runs under a folder and the tables of `blocklora summarize` (summarize.py writes them out): each run's
results.json read as a RunResult, grouped by dataset and shot count, mean ± std over seeds."""

from __future__ import annotations

import hashlib
import json
import statistics
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ..engine.rundir import RunDir
from ..errors import BlockLoRAError
from .reference import BENCHMARK, DG_TARGETS, reference

# data config keys that differ between the cells of one sweep or between protocols (not a different method)
_CELL_KEYS = ("dataset", "root", "shots", "seed", "workers", "classes")


@dataclass
class Run:
    path: Path
    dataset: str
    shots: int
    seed: int
    subset: str  # all | base | new
    top1: float
    base: float | None = None
    new: float | None = None
    hm: float | None = None
    cross: dict[str, float] = field(default_factory=dict)
    zero_shot: float | None = None
    variant: str = ""  # hash of the configuration minus the per-cell keys
    params: int | None = None
    seconds: float | None = None


@dataclass(frozen=True)
class Stat:
    mean: float
    std: float
    n: int


def stat(values: Sequence[float]) -> Stat:
    return Stat(statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0, len(values))


# -- reading ---------------------------------------------------------------------------------------------------------
def collect(directory: str | Path) -> tuple[list[Run], list[str]]:
    """Every readable results.json under `directory` (warnings for unreadable and duplicate ones)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise BlockLoRAError(f"{directory} is not a folder: pass the sweep's --output (or a folder of runs)")
    runs: dict[tuple, Run] = {}
    warnings: list[str] = []
    for path in sorted(directory.rglob(RunDir.RESULTS)):
        try:
            run = _read(path)
        except (BlockLoRAError, KeyError, TypeError, ValueError) as e:
            warnings.append(f"skipped {path}: not a blocklora results file ({type(e).__name__}: {e})")
            continue
        key = (run.dataset, run.subset, run.shots, run.seed)
        if key in runs:
            warnings.append(f"skipped {path}: {run.dataset} shots {run.shots} seed {run.seed} is also in "
                            f"{runs[key].path}")
            continue
        runs[key] = run
    out = list(runs.values())
    if len({r.variant for r in out}) > 1:
        warnings.append(f"these runs use {len({r.variant for r in out})} different configurations (beyond dataset, "
                        "shots and seed): the tables mix them")
    return out, warnings


def _read(path: Path) -> Run:
    r = RunDir(path.parent).read_results()
    cfg = {k: v for k, v in (r.config or {}).items() if k not in ("device", "eval")}
    cfg["data"] = {k: v for k, v in (cfg.get("data") or {}).items() if k not in _CELL_KEYS}
    variant = hashlib.sha256(json.dumps(cfg, sort_keys=True).encode()).hexdigest()[:12]
    opt = lambda v: float(v) if v is not None else None  # noqa: E731
    return Run(path.parent, str(r.dataset["name"]), r.shots, r.seed, str(r.dataset.get("classes_subset", "all")),
               float(r.top1), opt(r.base_top1), opt(r.new_top1), opt(r.harmonic_mean),
               {str(k): float(v) for k, v in (r.cross_dataset or {}).items()}, opt(r.zero_shot_top1), variant,
               r.trainable_params, (r.wall_time_s or {}).get("total"))


# -- tables ----------------------------------------------------------------------------------------------------------
def benchmark_order(names: Iterable[str]) -> list[str]:
    names = set(names)
    known = [d for d in (*BENCHMARK, *DG_TARGETS) if d in names]
    return known + sorted(names - set(known))


@dataclass
class Tables:
    datasets: list[str]  # rows of the main table (runs on all classes)
    shots: list[int]
    main: dict[tuple[str, int], Stat]
    average: dict[int, tuple[float, int]]  # shots -> (mean over datasets, how many)
    benchmark: dict[int, float]  # shots -> 11-dataset mean (only where all 11 are present)
    ref: dict[tuple[str, int], float] = field(default_factory=dict)
    ref_average: dict[int, float] = field(default_factory=dict)
    ref_benchmark: dict[int, float] = field(default_factory=dict)
    b2n: dict[tuple[str, int], tuple[Stat, Stat, Stat]] = field(default_factory=dict)
    b2n_datasets: list[str] = field(default_factory=list)
    b2n_shots: list[int] = field(default_factory=list)
    cross: dict[tuple[str, int], dict[str, Stat]] = field(default_factory=dict)  # (source, shots) -> target -> stat
    cross_targets: list[str] = field(default_factory=list)


def build(runs: Sequence[Run], ref_name: str | None = None) -> Tables:
    full = [r for r in runs if r.subset == "all"]
    groups: dict[tuple[str, int], list[float]] = defaultdict(list)
    for r in full:
        groups[(r.dataset, r.shots)].append(r.top1)
    main = {k: stat(v) for k, v in groups.items()}
    datasets = benchmark_order(d for d, _ in main)
    shots = sorted({k for _, k in main})
    average, benchmark = {}, {}
    for k in shots:
        means = [main[(d, k)].mean for d in datasets if (d, k) in main]
        average[k] = (statistics.fmean(means), len(means))
        if all((d, k) in main for d in BENCHMARK):
            benchmark[k] = statistics.fmean(main[(d, k)].mean for d in BENCHMARK)
    t = Tables(datasets, shots, main, average, benchmark)
    if ref_name:
        table = reference(ref_name)
        t.ref = {(d, k): table[k][d] for d in datasets for k in shots if k in table and d in table[k]}
        for k in shots:
            have = [t.ref[(d, k)] for d in datasets if (d, k) in main and (d, k) in t.ref]
            if have and len(have) == average[k][1]:  # the reference over the same datasets
                t.ref_average[k] = statistics.fmean(have)
            if k in benchmark and k in table:
                t.ref_benchmark[k] = table[k]["average"]
    # base-to-new
    b2n: dict[tuple[str, int], list[Run]] = defaultdict(list)
    for r in runs:
        if r.subset == "base" and r.base is not None and r.new is not None:
            b2n[(r.dataset, r.shots)].append(r)
    t.b2n = {k: (stat([r.base for r in v]), stat([r.new for r in v]), stat([r.hm for r in v if r.hm is not None]
                                                                         or [harmonic_mean(r.base, r.new) for r in v]))
             for k, v in b2n.items()}
    t.b2n_datasets = benchmark_order(d for d, _ in t.b2n)
    t.b2n_shots = sorted({k for _, k in t.b2n})
    # cross-dataset and domain generalization
    cross: dict[tuple[str, int], dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for r in full:
        for target, acc in r.cross.items():
            cross[(r.dataset, r.shots)][target].append(acc)
    t.cross = {k: {target: stat(v) for target, v in targets.items()} for k, targets in cross.items()}
    t.cross_targets = benchmark_order({target for targets in t.cross.values() for target in targets})
    return t


def harmonic_mean(a: float, b: float) -> float:
    return 2 * a * b / (a + b) if a + b else 0.0


