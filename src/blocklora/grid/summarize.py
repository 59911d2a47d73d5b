"""`blocklora summarize DIR`: tables and a plot of every results.json under DIR (a sweep, or any tree of runs).

    summary.md        top-1 per dataset (rows) and shot count (columns), mean ± std over seeds; an average row over
                      the datasets present and the 11-dataset average when all 11 are present; with --reference
                      the published numbers and the difference; base-to-new, cross-dataset and domain
                      generalization tables when such runs are present
    summary.csv       the same numbers, one row per dataset, columns <K>-shot mean/std/seeds[/ref/diff] and the
                      protocol columns (<K>-shot base/new/HM, <K>-shot -> <target>)
    summary_runs.csv  one row per run
    summary.png       accuracy vs shots, one panel per dataset and one for the average

std is the sample standard deviation over seeds (0 for a single seed). Runs trained on the base half of the classes
(--classes base) go to the base-to-new table only; "average" rows of that table give the mean base and new top-1 and
the harmonic mean of those means (CoCoOp's convention).
"""

from __future__ import annotations

import argparse
import csv
import io
import statistics
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..errors import BlockLoRAError
from .reference import BENCHMARK, DG_TARGETS, REFERENCE_TITLES, REFERENCES, reference
from .tables import Run, Stat, Tables, benchmark_order, build, collect, harmonic_mean


# -- markdown --------------------------------------------------------------------------------------------------------
def _fmt(s: Stat | None, usual_n: int) -> str:
    if s is None:
        return "–"
    text = f"{s.mean:.2f} ± {s.std:.2f}"
    return text + (f" ({s.n} seed{'s' if s.n > 1 else ''})" if s.n != usual_n else "")


def _row(cells: Sequence[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    return [_row(header), _row(["---"] * len(header)), *(_row(r) for r in rows)]


def _shot(k: int) -> str:
    return f"{k} shot{'s' if k > 1 else ''}"


def markdown(t: Tables, runs: Sequence[Run], ref_name: str | None, warnings: Sequence[str], source: Path) -> str:
    seeds = [s.n for s in t.main.values()] + [v[0].n for v in t.b2n.values()]
    usual = max(seeds, default=0)  # cells with fewer seeds (unfinished or failed) say so
    lines = [f"# Results under {source}", "",
             f"{len(runs)} runs; top-1 accuracy (%) on the test split, mean ± sample std over seeds ({usual} "
             f"seed{'s' if usual != 1 else ''} unless noted).", ""]
    for w in warnings:
        lines.append(f"> warning: {w}")
    if warnings:
        lines.append("")
    if t.main:
        lines += ["## Few-shot (all classes)", ""]
        rows = [[d, *(_fmt(t.main.get((d, k)), usual) for k in t.shots)] for d in t.datasets]
        rows.append(["**average**", *(_avg_cell(t, k) for k in t.shots)])
        if t.benchmark:
            rows.append(["**11-dataset average**", *(f"{t.benchmark[k]:.2f}" if k in t.benchmark else "–"
                                                     for k in t.shots)])
        lines += _table(["dataset", *map(_shot, t.shots)], rows) + [""]
    if ref_name and t.main:
        title = REFERENCE_TITLES.get(ref_name, ref_name)
        rows = [[d, *(f"{t.ref[(d, k)]:.1f}" if (d, k) in t.ref else "–" for k in t.shots)] for d in t.datasets]
        rows.append(["**average**", *(f"{t.ref_average[k]:.2f}" if k in t.ref_average else "–" for k in t.shots)])
        if t.benchmark:
            rows.append(["**11-dataset average**", *(f"{t.ref_benchmark[k]:.1f}" if k in t.ref_benchmark else "–"
                                                     for k in t.shots)])
        lines += [f"## Reference: {title}", ""] + _table(["dataset", *map(_shot, t.shots)], rows) + [""]
        rows = [[d, *(_diff(t.main.get((d, k)), t.ref.get((d, k))) for k in t.shots)] for d in t.datasets]
        rows.append(["**average**", *(_diff_value(t.average[k][0], t.ref_average.get(k)) for k in t.shots)])
        if t.benchmark:
            rows.append(["**11-dataset average**", *(_diff_value(t.benchmark.get(k), t.ref_benchmark.get(k))
                                                     for k in t.shots)])
        lines += [f"## Difference: ours − {ref_name} (points)", ""] + \
            _table(["dataset", *map(_shot, t.shots)], rows) + [""]
    if t.b2n:
        header = ["dataset"] + [f"{_shot(k)} {m}" for k in t.b2n_shots for m in ("base", "new", "HM")]
        rows = [[d, *(c for k in t.b2n_shots for c in _b2n_cells(t.b2n.get((d, k)), usual))]
                for d in t.b2n_datasets]
        avg = []
        for k in t.b2n_shots:
            have = [t.b2n[(d, k)] for d in t.b2n_datasets if (d, k) in t.b2n]
            b, n = statistics.fmean(s[0].mean for s in have), statistics.fmean(s[1].mean for s in have)
            avg += [f"{b:.2f}", f"{n:.2f}", f"{harmonic_mean(b, n):.2f}"]
        rows.append(["**average**", *avg])
        lines += ["## Base-to-new (train on the base half of the classes; HM = harmonic mean)", ""] + \
            _table(header, rows) + [""]
    for title, targets in _cross_groups(t):
        header = ["source (shots)", "source top-1", *targets, "average"]
        rows = []
        sources = benchmark_order({s for s, _ in t.cross})
        for (source, k), per_target in sorted(t.cross.items(), key=lambda kv: (sources.index(kv[0][0]), kv[0][1])):
            if not any(x in per_target for x in targets):
                continue
            means = [per_target[x].mean for x in targets if x in per_target]
            rows.append([f"{source} ({k})", _fmt(t.main.get((source, k)), usual),
                         *(_fmt(per_target.get(x), usual) for x in targets), f"{statistics.fmean(means):.2f}"])
        lines += [f"## {title}", ""] + _table(header, rows) + [""]
    return "\n".join(lines)


def _cross_groups(t: Tables) -> list[tuple[str, list[str]]]:
    dg = [x for x in t.cross_targets if x in DG_TARGETS]
    other = [x for x in t.cross_targets if x not in DG_TARGETS]
    out = []
    if other:
        out.append(("Cross-dataset (the adapter trained on the source, tested on each target)", other))
    if dg:
        out.append(("Domain generalization (ImageNet-trained adapter on ImageNet-V2, -Sketch, -A, -R)", dg))
    return out


def _avg_cell(t: Tables, k: int) -> str:
    mean, n = t.average[k]
    return f"{mean:.2f}" + (f" ({n} of {len(t.datasets)})" if n != len(t.datasets) else "")


def _b2n_cells(s: tuple[Stat, Stat, Stat] | None, usual: int) -> list[str]:
    return ["–"] * 3 if s is None else [_fmt(x, usual) for x in s]


def _diff(s: Stat | None, ref: float | None) -> str:
    return _diff_value(s.mean if s else None, ref)


def _diff_value(ours: float | None, ref: float | None) -> str:
    return "–" if ours is None or ref is None else f"{ours - ref:+.2f}"


# -- CSV -------------------------------------------------------------------------------------------------------------
def table_csv(t: Tables, ref_name: str | None) -> str:
    shots = sorted(set(t.shots) | set(t.b2n_shots) | {k for _, k in t.cross})
    header = ["dataset"]
    for k in shots:
        header += [f"{k}-shot mean", f"{k}-shot std", f"{k}-shot seeds"]
        if ref_name:
            header += [f"{k}-shot ref", f"{k}-shot diff"]
    for k in t.b2n_shots:
        header += [f"{k}-shot base", f"{k}-shot new", f"{k}-shot HM"]
    cross_shots = sorted({k for _, k in t.cross})
    for k in cross_shots:
        header += [f"{k}-shot -> {x}" for x in t.cross_targets]
    rows = []
    for d in benchmark_order(set(t.datasets) | set(t.b2n_datasets) | {s for s, _ in t.cross}):
        row: list[Any] = [d]
        for k in shots:
            s = t.main.get((d, k))
            row += [_num(s.mean), _num(s.std), s.n] if s else ["", "", ""]
            if ref_name:
                ref = t.ref.get((d, k))
                row += [_num(ref), _num(s.mean - ref) if s and ref is not None else ""]
        for k in t.b2n_shots:
            b = t.b2n.get((d, k))
            row += [_num(x.mean) for x in b] if b else ["", "", ""]
        for k in cross_shots:
            per_target = t.cross.get((d, k), {})
            row += [_num(per_target[x].mean) if x in per_target else "" for x in t.cross_targets]
        rows.append(row)
    for name, values, refs in (("average", {k: v[0] for k, v in t.average.items()}, t.ref_average),
                               ("11-dataset average", t.benchmark, t.ref_benchmark)):
        if not values:
            continue
        row = [name]
        for k in shots:
            row += [_num(values.get(k)), "", ""]
            if ref_name:
                row += [_num(refs.get(k)), _num(values[k] - refs[k]) if k in values and k in refs else ""]
        rows.append(row + [""] * (len(header) - len(row)))
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return buf.getvalue()


def runs_csv(runs: Sequence[Run]) -> str:
    targets = benchmark_order({x for r in runs for x in r.cross})
    header = ["dataset", "classes", "shots", "seed", "top1", "zero_shot_top1", "base_top1", "new_top1",
              "harmonic_mean", *(f"-> {x}" for x in targets), "trainable_params", "seconds", "path"]
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    for r in sorted(runs, key=lambda r: (benchmark_order([x.dataset for x in runs]).index(r.dataset), r.subset, r.shots,
                                         r.seed)):
        writer.writerow([r.dataset, r.subset, r.shots, r.seed, _num(r.top1), _num(r.zero_shot), _num(r.base),
                         _num(r.new), _num(r.hm), *(_num(r.cross.get(x)) for x in targets), r.params or "",
                         _num(r.seconds), str(r.path)])
    return buf.getvalue()


def _num(x: float | None) -> str:
    return "" if x is None else f"{x:.4f}"


# -- plot ------------------------------------------------------------------------------------------------------------
def plot(t: Tables, path: Path, ref_name: str | None) -> None:
    """Accuracy vs shots: a panel per dataset and one for the average (reference dashed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [*t.datasets, "average"]
    cols = min(4, len(panels))
    rows = -(-len(panels) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.6 * rows), squeeze=False)
    for ax, name in zip(axes.flat, panels):
        if name == "average":
            ks = list(t.shots)
            ax.plot(ks, [t.average[k][0] for k in ks], "o-", color="black", label="ours")
            if t.benchmark and set(t.datasets) != set(BENCHMARK):  # other datasets too: the 11 on their own
                kb = sorted(t.benchmark)
                ax.plot(kb, [t.benchmark[k] for k in kb], "s-", color="tab:blue", label="ours, 11 datasets")
            ref = {**t.ref_average, **t.ref_benchmark} if t.benchmark else t.ref_average
        else:
            ks = [k for k in t.shots if (name, k) in t.main]
            ax.errorbar(ks, [t.main[(name, k)].mean for k in ks], yerr=[t.main[(name, k)].std for k in ks],
                        fmt="o-", color="tab:blue", capsize=3, label="ours")
            ref = {k: t.ref[(name, k)] for k in t.shots if (name, k) in t.ref}
        if ref_name and ref:
            kr = sorted(ref)
            ax.plot(kr, [ref[k] for k in kr], "--", color="tab:orange", label=ref_name)
        ax.set_xscale("log", base=2)
        ax.set_xticks(t.shots, [str(k) for k in t.shots])
        ax.minorticks_off()
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("shots per class", fontsize=8)
        ax.set_ylabel("top-1 (%)", fontsize=8)
        ax.grid(alpha=0.3)
        ax.tick_params(labelsize=8)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    axes.flat[len(panels) - 1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# -- the command -----------------------------------------------------------------------------------------------------
def summarize(directory: str | Path, ref_name: str | None = None, output: str | Path | None = None,
              with_plot: bool = True) -> dict[str, Any]:
    """Write <output>.md, .csv, _runs.csv and .png (output defaults to DIR/summary); returns paths and markdown."""
    directory = Path(directory)
    if ref_name is not None:
        reference(ref_name)  # an unknown name fails before anything is read or written
    runs, warnings = collect(directory)
    if not runs:
        raise BlockLoRAError(f"no results.json under {directory}: nothing to summarize (runs still going, or "
                             "another folder?)")
    t = build(runs, ref_name)
    prefix = Path(output) if output is not None else directory / "summary"
    prefix.parent.mkdir(parents=True, exist_ok=True)
    from ..engine.files import atomic_write

    text = markdown(t, runs, ref_name, warnings, directory)
    files = {"markdown": prefix.with_name(prefix.name + ".md"), "csv": prefix.with_name(prefix.name + ".csv"),
             "runs_csv": prefix.with_name(prefix.name + "_runs.csv")}
    for key, content in (("markdown", text + "\n"), ("csv", table_csv(t, ref_name)), ("runs_csv", runs_csv(runs))):
        atomic_write(files[key], lambda fh, c=content: fh.write(c.encode()))
    if with_plot and t.main:
        try:
            import matplotlib  # noqa: F401  (an optional dependency: blocklora[plot])
        except ImportError:
            warnings.append("no plot: it needs matplotlib (pip install 'blocklora[plot]')")
        else:
            files["plot"] = prefix.with_name(prefix.name + ".png")
            plot(t, files["plot"], ref_name)
    return {"files": {k: str(v) for k, v in files.items()}, "markdown": text, "runs": len(runs),
            "warnings": warnings}


def add_summarize_parser(sub: Any) -> argparse.ArgumentParser:
    p = sub.add_parser("summarize", help="tables (markdown, CSV) and a plot of the runs under a sweep directory")
    p.add_argument("directory", metavar="DIR", help="a sweep's --output, or any folder holding run directories")
    p.add_argument("--reference", choices=sorted(REFERENCES), default=None,
                   help="add a published method's numbers (docs/protocol.md) and the difference")
    p.add_argument("--output", default=None, help="path prefix of the files written (default DIR/summary)")
    p.add_argument("--no-plot", action="store_true", help="write the tables only, no plot")
    p.set_defaults(func=cmd_summarize)
    return p


def cmd_summarize(args: argparse.Namespace) -> int:
    out = summarize(args.directory, args.reference, args.output, with_plot=not args.no_plot)
    print(out["markdown"])
    for w in out["warnings"]:
        print(f"warning: {w}", file=sys.stderr)
    print("written: " + ", ".join(out["files"].values()), file=sys.stderr)
    return 0
