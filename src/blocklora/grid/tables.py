"""The runs under a folder and the tables of `blocklora summarize` (summarize.py writes them out).

Reading: every results.json under the folder goes through RunResult's validating reader (engine/results.py); a file
that fails (damaged JSON, a field of the wrong type or out of range: top1 250, shots -4) is skipped and named in the
warnings, never averaged in, never a traceback.

Grouping: runs are grouped by their configuration, the resolved config recorded in results.json minus the keys that
say where or how a run was done (PLACE_KEYS), the keys of the cell itself (dataset, shots, seed, classes subset) and
the keys the run's method does not read (methods.registry.reads: train.lr or adapter.n_blocks of a tip_adapter run,
which a sweep's fixed options give every method alike). Runs of different configurations are never pooled and
never dropped; the keys whose values differ between the groups that read them (method, n_blocks, lr, model, ...)
name them, and a group whose method does not read a key shows '–' for it. The same configuration, dataset, classes
subset, shots and seed twice is a duplicate: the first by path is used and both paths are named in the warnings.

Statistics: mean ± sample std over seeds (std 0 for one seed). The paired difference of a configuration to the
reference configuration (Block-LoRA by default) is taken seed by seed on the seeds both ran (same draws, same test
images), then mean ± sample std over those seeds; over datasets, per seed on the datasets both ran.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import statistics
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..engine.rundir import RunDir
from ..errors import BlockLoRAError, ConfigError
from .reference import BENCHMARK, DG_TARGETS, reference

# Config keys that say where or how a run was done, not what was trained and measured: they never split a
# configuration. (The cell's own keys, data.dataset/shots/seed/classes, are the table's rows, columns and seeds.)
PLACE_KEYS = ("device", "tokenizer", "data.root", "data.split_file", "data.workers", "data.skip_bad_images",
              "eval.batch_size", "eval.zero_shot", "eval.dataset_templates", "eval.datasets", "train.log_every",
              "train.checkpoint_every", "train.log", "train.deterministic", "train.grad_checkpointing")
CELL_KEYS = ("data.dataset", "data.shots", "data.seed", "data.classes")
# What the frozen model's (zero-shot) accuracy depends on: runs that agree on these share a zero-shot row.
ZERO_SHOT_KEYS = ("model", "pretrained", "quick_gelu", "train.template", "eval.split", "eval.limit")
# The settings the summary names when every run shares them (the rest is in summary_runs.csv and each config.json).
NAMED_KEYS = ("model", "pretrained", "adapter.method", "adapter.r", "adapter.n_blocks", "adapter.alpha",
              "adapter.dropout", "adapter.towers", "adapter.layers", "adapter.projections", "train.lr",
              "train.iters", "train.iters_per_shot", "train.batch_size", "train.schedule", "train.precision",
              "eval.split", "eval.limit")
REFERENCE_METHOD = "block_lora"  # the paired differences are taken to it unless --compare-to says otherwise


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
    variant: str = ""  # hash of the configuration (config minus PLACE_KEYS and CELL_KEYS)
    params: int | None = None
    seconds: float | None = None
    config: dict[str, Any] = field(default_factory=dict)  # that configuration, flattened: {"train.lr": 2e-4, ...}

    @property
    def method(self) -> str:
        return str(self.config.get("adapter.method", "?"))


@dataclass(frozen=True)
class Stat:
    mean: float
    std: float
    n: int


def stat(values: Sequence[float]) -> Stat:
    return Stat(statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0, len(values))


# -- reading ---------------------------------------------------------------------------------------------------------
def collect(directory: str | Path) -> tuple[list[Run], list[str]]:
    """Every valid results.json under `directory`, and warnings naming each file skipped (damaged, not a regular
    file) and each duplicate (the same configuration, dataset, classes, shots and seed as an earlier path)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise BlockLoRAError(f"{directory} is not a folder: pass the sweep's --output (or a folder of runs)")
    runs: dict[tuple, Run] = {}
    warnings: list[str] = []
    for path in sorted(directory.rglob(RunDir.RESULTS)):
        if not path.is_file():  # a FIFO would hang the read, a folder cannot be one
            warnings.append(f"skipped {path}: not a regular file")
            continue
        try:
            run = _read(path)
        except BlockLoRAError as e:
            warnings.append(f"skipped {path}: {str(e).removeprefix(f'{path}: ')}")
            continue
        key = (run.variant, run.dataset, run.subset, run.shots, run.seed)
        if key in runs:
            warnings.append(f"duplicate: {run.path} and {runs[key].path} are the same configuration, {run.dataset} "
                            f"shots {run.shots} seed {run.seed}: the tables use {runs[key].path}")
            continue
        runs[key] = run
    return list(runs.values()), warnings


def _read(path: Path) -> Run:
    from ..methods.registry import reads

    r = RunDir(path.parent).read_results()
    tree = flat(r.config)
    method = str(tree.get("adapter.method", "?"))
    config = {k: v for k, v in tree.items() if k not in PLACE_KEYS and k not in CELL_KEYS and reads(method, k)}
    variant = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:12]
    opt = lambda v: float(v) if v is not None else None  # noqa: E731
    return Run(path.parent, str(r.dataset["name"]), r.shots, r.seed, str(r.dataset.get("classes_subset", "all")),
               float(r.top1), opt(r.base_top1), opt(r.new_top1), opt(r.harmonic_mean),
               {str(k): float(v) for k, v in (r.cross_dataset or {}).items()}, opt(r.zero_shot_top1), variant,
               r.trainable_params, (r.wall_time_s or {}).get("total"), config)


def flat(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"train": {"lr": 1e-4}} -> {"train.lr": 1e-4}; lists become tuples (hashable, comparable)."""
    out: dict[str, Any] = {}
    for k, v in tree.items():
        if isinstance(v, Mapping):
            out.update(flat(v, f"{prefix}{k}."))
        else:
            out[prefix + str(k)] = tuple(v) if isinstance(v, list) else v
    return out


# -- one configuration's tables --------------------------------------------------------------------------------------
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
    """The tables of the runs of ONE configuration (see group() for several)."""
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


# -- several configurations ------------------------------------------------------------------------------------------
@dataclass
class Group:
    """The runs of one configuration: its flattened config, its row label and its tables."""

    variant: str
    config: dict[str, Any]
    runs: list[Run]
    tables: Tables
    label: str = ""

    @property
    def method(self) -> str:
        return str(self.config.get("adapter.method", "?"))

    def top1(self, dataset: str, shots: int) -> dict[int, float]:
        """seed -> top-1 of the all-classes runs of (dataset, shots)."""
        return {r.seed: r.top1 for r in self.runs if r.subset == "all" and r.dataset == dataset and r.shots == shots}

    def shown(self, key: str, unread: str = "–") -> str:
        """The configuration's value of `key` as the tables show it; `unread` where its method does not read it."""
        return show(self.config.get(key)) if reads_key(self.config, key) else unread

    @property
    def params(self) -> tuple[int, int] | None:
        """(min, max) trainable parameters over its runs (they differ by dataset for a class-sized head)."""
        values = [r.params for r in self.runs if r.params is not None]
        return (min(values), max(values)) if values else None


@dataclass
class ZeroShot:
    """The frozen model's accuracy, measured by the runs (results.json's zero_shot_top1) on their own test images."""

    label: str
    config: dict[str, Any]  # its ZERO_SHOT_KEYS values
    main: dict[tuple[str, int], Stat]


@dataclass
class Summary:
    runs: list[Run]
    groups: list[Group]  # display order: other methods first, Block-LoRA (the reference method) last
    differing: list[str]  # config keys whose values differ between the groups
    common: dict[str, Any]  # NAMED_KEYS every run shares
    names: dict[str, str]  # config key -> the short name the labels use
    datasets: list[str]
    shots: list[int]
    ref: Group | None  # the group the paired differences are taken to
    zero_shot: list[ZeroShot]
    published: str | None = None  # --reference name

    def paired(self, row: Group | None, dataset: str, shots: int) -> dict[int, float]:
        """seed -> the reference's top-1 minus `row`'s, on the seeds both ran (same draws, same test images); `row`
        None: minus the frozen model's accuracy that the reference runs measured themselves (zero-shot)."""
        if self.ref is None:
            return {}
        mine = {r.seed: r for r in self.ref.runs if r.subset == "all" and r.dataset == dataset and r.shots == shots}
        if row is None:
            return {s: r.top1 - r.zero_shot for s, r in mine.items() if r.zero_shot is not None}
        theirs = row.top1(dataset, shots)
        return {s: mine[s].top1 - theirs[s] for s in sorted(set(mine) & set(theirs))}


def over_datasets(per_dataset: Sequence[Mapping[int, float]]) -> Stat | None:
    """The mean over datasets of per-seed values: per seed over the seeds every dataset has (mean ± sample std over
    those seeds); without such seeds the mean of the per-dataset means (std nan, n 0). None when there is nothing."""
    per_dataset = [d for d in per_dataset if d]
    if not per_dataset:
        return None
    seeds = set.intersection(*(set(d) for d in per_dataset))
    if seeds:
        return stat([statistics.fmean(d[s] for d in per_dataset) for s in sorted(seeds)])
    return Stat(statistics.fmean(statistics.fmean(d.values()) for d in per_dataset), math.nan, 0)


def group(runs: Sequence[Run], published: str | None = None, compare_to: str | None = None) -> Summary:
    """Group `runs` by configuration (see the module's docstring) and choose the reference group: `compare_to`
    ("method=lora,lr=0.001": every key=value must match one group's configuration; keys by their full or short
    name), else the Block-LoRA group with the most runs, else the group with the most runs. Raises ConfigError for a
    `compare_to` that matches no group or several."""
    by_variant: dict[str, list[Run]] = defaultdict(list)
    for r in runs:
        by_variant[r.variant].append(r)
    configs = {v: rs[0].config for v, rs in by_variant.items()}
    keys = sorted({k for c in configs.values() for k in c})
    differing = [k for k in keys if _varies(configs.values(), k)]
    names = _short_names(differing)
    groups = [Group(v, configs[v], rs, build(rs, published)) for v, rs in by_variant.items()]
    # label: the method, and the differing keys that vary among the groups of that same method
    for g in groups:
        same = [h.config for h in groups if h.method == g.method]
        own = [k for k in differing if k != "adapter.method" and _varies(same, k)]
        g.label = " ".join([g.method, *(f"{names[k]}={show(g.config.get(k))}" for k in own)])
    groups.sort(key=lambda g: (g.method == REFERENCE_METHOD, _method_rank(g.method), g.method,
                               [_sort_value(g.config.get(k)) for k in differing]))
    all_runs = [r for g in groups for r in g.runs]
    datasets = benchmark_order({r.dataset for r in all_runs if r.subset == "all"})
    shots = sorted({r.shots for r in all_runs if r.subset == "all"})
    # a key every group that reads it has at one value (a baseline group does not read train.lr)
    common = {k: next(c.get(k) for c in configs.values() if reads_key(c, k)) for k in NAMED_KEYS
              if k in keys and k not in differing}
    if common.get("train.iters") is not None:
        common.pop("train.iters_per_shot", None)  # a fixed step count: iters_per_shot is not used
    elif "train.iters" in common:
        common.pop("train.iters")  # None: iters_per_shot x shots
    ref = _reference_group(groups, compare_to, names)
    return Summary(list(runs), groups, differing, common, names, datasets, shots, ref, _zero_shot(groups), published)


def _reference_group(groups: Sequence[Group], compare_to: str | None, names: dict[str, str]) -> Group | None:
    if compare_to is None:
        if len(groups) < 2:
            return groups[0] if groups else None
        ours = [g for g in groups if g.method == REFERENCE_METHOD] or list(groups)
        return max(ours, key=lambda g: len(g.runs))  # max keeps the first of equals: display order
    wanted = []
    for part in compare_to.replace(" ", ",").split(","):
        key, sep, value = part.partition("=")
        if not part.strip():
            continue
        if not sep:
            raise ConfigError(f"--compare-to {compare_to!r}: write key=value pairs such as method=lora,n_blocks=4")
        wanted.append((key.strip(), value.strip()))
    full = {**{v: k for k, v in names.items()}, "method": "adapter.method"}
    hits = [g for g in groups if all(show(g.config.get(full.get(k, k))) == v for k, v in wanted)]
    if len(hits) != 1:
        what = "no configuration" if not hits else f"{len(hits)} configurations"
        raise ConfigError(f"--compare-to {compare_to!r} matches {what}; the configurations here: "
                          f"{'; '.join(g.label for g in groups)}")
    return hits[0]


def _zero_shot(groups: Sequence[Group]) -> list[ZeroShot]:
    """One row per frozen model (ZERO_SHOT_KEYS): its accuracy per (dataset, shots), one measurement per seed (the
    runs of every configuration measure the same frozen model on the same test images: counted once)."""
    per: dict[str, tuple[dict[str, Any], dict[tuple[str, int], dict[int, float]]]] = {}
    for g in groups:
        zs = {k: g.config.get(k) for k in ZERO_SHOT_KEYS}
        key = json.dumps(zs, sort_keys=True, default=str)
        per.setdefault(key, (zs, defaultdict(dict)))
        for r in g.runs:
            if r.subset == "all" and r.zero_shot is not None:
                per[key][1][(r.dataset, r.shots)].setdefault(r.seed, r.zero_shot)
    found = [(zs, values) for zs, values in per.values() if values]
    varying = [k for k in ZERO_SHOT_KEYS if len({_canon(zs.get(k)) for zs, _ in found}) > 1]
    names = _short_names(varying)
    return [ZeroShot(" ".join(["zero-shot", *(f"{names[k]}={show(zs.get(k))}" for k in varying)]), zs,
                     {k: stat(list(v.values())) for k, v in values.items()}) for zs, values in found]


def reads_key(config: Mapping[str, Any], key: str) -> bool:
    """Whether the runs of a configuration (flattened, as Run.config) read `key` (methods.registry.reads)."""
    from ..methods.registry import reads

    return key in config or reads(str(config.get("adapter.method", "?")), key)


def _varies(configs: Iterable[Mapping[str, Any]], key: str) -> bool:
    """Whether `key` has two values among the configurations that read it (a key one method reads and another does
    not is no difference by itself: the method tells them apart)."""
    return len({_canon(c.get(key)) for c in configs if reads_key(c, key)}) > 1


def show(value: Any) -> str:
    """A config value as the labels show it (sweep folder names spell values the same way)."""
    from .sweep import value_text

    return value_text(value)


def _canon(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=str)


def _short_names(keys: Sequence[str]) -> dict[str, str]:
    from .sweep import short_names

    return short_names(keys)


def _method_rank(method: str) -> int:
    from ..adapters.config import METHODS

    return METHODS.index(method) if method in METHODS else len(METHODS)


def _sort_value(value: Any) -> tuple[int, Any]:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return (0, value)
    return (1, _canon(value))


def relpath(path: Path, start: Path) -> str:
    try:
        return os.path.relpath(path, start)
    except ValueError:
        return str(path)
