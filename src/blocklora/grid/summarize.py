"""`blocklora summarize DIR`: the paper-style tables and plots of every results.json under DIR (one sweep, several
sweeps of other methods or hyper-parameters, or any tree of runs).

    summary.md        the model and the configuration every run shares, what differs between the configurations
                      (method, n_blocks, lr, model, ...: computed from the runs' resolved configs, tables.group);
                      per shot count K a table of configurations (rows, zero-shot the first) x datasets, mean ± std
                      over seeds, an average column (and the 11-dataset average when all 11 are present); the paired
                      difference of the reference configuration (Block-LoRA unless --compare-to) to every other row,
                      seed by seed; with --reference the published numbers as a row; base-to-new, cross-dataset and
                      domain generalization tables when such runs are present
    summary.csv       the same numbers, one row per configuration and dataset (zero-shot rows first), columns
                      <K>-shot mean/std/seeds[/ref/diff]/paired diff/paired std/paired seeds and the protocol columns
    summary_runs.csv  one row per run, with its configuration
    summary.png       top-1 vs shots per configuration (the average over datasets, and a panel per dataset); top-1
                      vs trainable parameters

Files are written into DIR (or --output's folder), which blocklora did not make: each is replaced only while it is
exactly as an earlier summarize wrote it (ownership.OwnedFiles: a user's own summary.md, or one edited since, is
refused by name before anything is written), and two summarize commands writing the same files at once: the second
fails naming the first. A damaged results.json is skipped and named (a warning on stderr and in summary.md), the
rest summarized: a sweep still running, or one bad file among hundreds, must not hide the others.

std is the sample standard deviation over seeds (0 for a single seed). Runs trained on the base half of the classes
(--classes base) go to the base-to-new table only; "average" rows of that table give the mean base and new top-1 and
the harmonic mean of those means (CoCoOp's convention).
"""

from __future__ import annotations

import argparse
import csv
import io
import math
import statistics
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..errors import BlockLoRAError
from .reference import BENCHMARK, DG_TARGETS, REFERENCE_TITLES, REFERENCES, reference
from .tables import (
    Group,
    Run,
    Stat,
    Summary,
    benchmark_order,
    collect,
    group,
    harmonic_mean,
    over_datasets,
    reads_key,
    show,
)


# -- text ------------------------------------------------------------------------------------------------------------
def _fmt(s: Stat | None, usual_n: int) -> str:
    if s is None:
        return "–"
    text = f"{s.mean:.2f} ± {s.std:.2f}"
    return text + _seeds_note(s.n, usual_n)


def _seeds_note(n: int, usual_n: int) -> str:
    return f" ({n} seed{'s' if n > 1 else ''})" if n != usual_n else ""


def _fmt_diff(s: Stat | None, usual_n: int) -> str:
    if s is None:
        return "–"
    if math.isnan(s.std):  # no seed common to every dataset: the mean of the per-dataset differences
        return f"{s.mean:+.2f}"
    return f"{s.mean:+.2f} ± {s.std:.2f}" + _seeds_note(s.n, usual_n)


def _row(cells: Sequence[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    return [_row(header), _row(["---"] * len(header)), *(_row(r) for r in rows)]


def _shot(k: int) -> str:
    return f"{k} shot{'s' if k > 1 else ''}"


def _usual(s: Summary) -> int:
    """The seed count of most cells (cells with fewer, unfinished or failed, say so)."""
    counts = [st.n for g in s.groups for st in g.tables.main.values()] + \
        [v[0].n for g in s.groups for v in g.tables.b2n.values()]
    return max(counts, default=0)


def _benchmark_column(s: Summary, k: int) -> bool:
    """An 11-dataset average column at K: some row has all 11 benchmark datasets."""
    return any(k in g.tables.benchmark for g in s.groups)


def _params(g: Group) -> str:
    p = g.params
    if p is None:
        return "–"
    return f"{p[0]:,}" if p[0] == p[1] else f"{p[0]:,}–{p[1]:,}"


def _mean_over(stats: dict[tuple[str, int], Stat], k: int, datasets: Sequence[str]) -> str:
    means = [stats[(d, k)].mean for d in datasets if (d, k) in stats]
    if not means:
        return "–"
    return f"{statistics.fmean(means):.2f}" + (f" ({len(means)} of {len(datasets)})" if len(means) != len(datasets)
                                               else "")


def markdown(s: Summary, warnings: Sequence[str], source: Path) -> str:
    usual = _usual(s)
    split = s.common.get("eval.split", "test")
    lines = [f"# Results under {source}", "",
             f"{len(s.runs)} runs of {len(s.groups)} configuration{'s' if len(s.groups) != 1 else ''}; top-1 "
             f"accuracy (%) on the {split} split, mean ± sample std over seeds ({usual} seed"
             f"{'s' if usual != 1 else ''} unless noted).", ""]
    if s.common:
        partial = any(not reads_key(g.config, k) for g in s.groups for k in s.common)
        lines += [f"Shared by every run{' that reads the setting' if partial else ''}: {_shared(s.common)}.", ""]
    if len(s.groups) > 1:
        lines += [f"The configurations differ in: {', '.join(s.differing)}.", ""]
    for w in warnings:
        lines.append(f"> warning: {w}")
    if warnings:
        lines.append("")
    if len(s.groups) > 1:
        keys = [k for k in s.differing if k != "adapter.method"]
        header = ["configuration", "method", *(s.names[k] for k in keys), "trainable params", "runs"]
        rows = [[g.label, g.method, *(g.shown(k) for k in keys), _params(g), str(len(g.runs))]
                for g in s.groups]
        lines += ["## Configurations", ""] + _table(header, rows) + [""]
    ref_label = s.ref.label if s.ref else ""
    for k in s.shots:
        datasets = [d for d in s.datasets if any((d, k) in g.tables.main for g in s.groups)]
        bench = _benchmark_column(s, k)
        header = ["method", *datasets, "average", *(["11-dataset average"] if bench else [])]
        rows = []
        for z in s.zero_shot:
            if any((d, k) in z.main for d in datasets):
                rows.append([z.label, *(_fmt(z.main.get((d, k)), usual) for d in datasets),
                             _mean_over(z.main, k, datasets),
                             *([_mean_over(z.main, k, list(BENCHMARK))] if bench else [])])
        for g in s.groups:
            if k not in g.tables.shots:
                continue
            rows.append([g.label, *(_fmt(g.tables.main.get((d, k)), usual) for d in datasets),
                         _mean_over(g.tables.main, k, datasets),
                         *([f"{g.tables.benchmark[k]:.2f}" if k in g.tables.benchmark else "–"] if bench else [])])
        published = _published(s, k)
        if published:
            name = f"{s.published} (published)"
            rows.append([name, *(f"{published[d]:.1f}" if d in published else "–" for d in datasets),
                         _published_mean(published, datasets),
                         *([f"{published['average']:.2f}"] if bench and "average" in published else
                           ["–"] if bench else [])])
        lines += [f"## {_shot(k)}", ""] + _table(header, rows) + [""]
        diff_rows = _difference_rows(s, k, datasets, bench, usual)
        if diff_rows:
            lines += [f"### {_shot(k)}: {ref_label} minus each row (points; paired seed by seed on the seeds both "
                      "ran)", ""] + _table(header, diff_rows) + [""]
    lines += _b2n_tables(s, usual) + _cross_tables(s, usual)
    return "\n".join(lines)


def _shared(common: dict[str, Any]) -> str:
    """The settings every run shares, named as in the config ("lr 0.0002", "steps 500 x shots")."""
    parts = []
    for key, value in common.items():
        name = key.rpartition(".")[2]
        if key == "train.iters_per_shot":
            parts.append(f"steps {show(value)} x shots")
        elif key == "train.iters":
            parts.append(f"steps {show(value)}")
        elif value is not None or key == "pretrained":
            parts.append(f"{name} {show(value)}")
    return ", ".join(parts)


def _published(s: Summary, k: int) -> dict[str, float]:
    if not s.published:
        return {}
    return dict(reference(s.published).get(k, {}))


def _published_mean(published: dict[str, float], datasets: Sequence[str]) -> str:
    have = [published[d] for d in datasets if d in published]
    if not have:
        return "–"
    return f"{statistics.fmean(have):.2f}" + (f" ({len(have)} of {len(datasets)})" if len(have) != len(datasets)
                                              else "")


def _difference_rows(s: Summary, k: int, datasets: Sequence[str], bench: bool, usual: int) -> list[list[str]]:
    """Rows of `ref minus each row` at K: zero-shot (the reference runs' own measurement), the other
    configurations (paired seed by seed), the published numbers (the reference's mean minus them)."""
    if s.ref is None or k not in s.ref.tables.shots:
        return []
    rows = []
    candidates: list[tuple[str, Group | None]] = []
    if any(r.zero_shot is not None for r in s.ref.runs):
        zs_label = next((z.label for z in s.zero_shot if all(z.config.get(key) == s.ref.config.get(key)
                                                             for key in z.config)), "zero-shot")
        candidates.append((zs_label, None))
    candidates += [(g.label, g) for g in s.groups if g is not s.ref and k in g.tables.shots]
    for label, g in candidates:
        per = {d: s.paired(g, d, k) for d in datasets}
        if not any(per.values()):
            continue
        cells = [_fmt_diff(_stat(per[d]), usual) for d in datasets]
        have = [d for d in datasets if per[d]]
        avg = over_datasets([per[d] for d in have])
        note = f" ({len(have)} of {len(datasets)})" if len(have) != len(datasets) else ""
        row = [label, *cells, _fmt_diff(avg, usual) + note]
        if bench:
            row.append(_fmt_diff(over_datasets([per[d] for d in BENCHMARK]), usual)
                       if all(per.get(d) for d in BENCHMARK) else "–")
        rows.append(row)
    published = _published(s, k)
    if published:
        t = s.ref.tables
        cells = [f"{t.main[(d, k)].mean - published[d]:+.2f}" if (d, k) in t.main and d in published else "–"
                 for d in datasets]
        both = [d for d in datasets if (d, k) in t.main and d in published]
        avg = f"{statistics.fmean(t.main[(d, k)].mean - published[d] for d in both):+.2f}" if both else "–"
        row = [f"{s.published} (published)", *cells, avg + (f" ({len(both)} of {len(datasets)})"
                                                            if both and len(both) != len(datasets) else "")]
        if bench:
            row.append(f"{t.benchmark[k] - published['average']:+.2f}" if k in t.benchmark and "average" in published
                       else "–")
        rows.append(row)
    return rows


def _stat(values: dict[int, float]) -> Stat | None:
    from .tables import stat

    return stat(list(values.values())) if values else None


def _b2n_tables(s: Summary, usual: int) -> list[str]:
    groups = [g for g in s.groups if g.tables.b2n]
    if not groups:
        return []
    shots = sorted({k for g in groups for k in g.tables.b2n_shots})
    several = len(s.groups) > 1
    header = [*(["method"] if several else []), "dataset"] + \
        [f"{_shot(k)} {m}" for k in shots for m in ("base", "new", "HM")]
    rows = []
    for g in groups:
        t = g.tables
        for d in t.b2n_datasets:
            cells = []
            for k in shots:
                v = t.b2n.get((d, k))
                cells += ["–"] * 3 if v is None else [_fmt(x, usual) for x in v]
            rows.append([*([g.label] if several else []), d, *cells])
        avg = []
        for k in shots:
            have = [t.b2n[(d, k)] for d in t.b2n_datasets if (d, k) in t.b2n]
            if not have:
                avg += ["–"] * 3
                continue
            b, n = statistics.fmean(x[0].mean for x in have), statistics.fmean(x[1].mean for x in have)
            avg += [f"{b:.2f}", f"{n:.2f}", f"{harmonic_mean(b, n):.2f}"]
        rows.append([*([g.label] if several else []), "**average**", *avg])
    return ["## Base-to-new (train on the base half of the classes; HM = harmonic mean)", ""] + \
        _table(header, rows) + [""]


def _cross_tables(s: Summary, usual: int) -> list[str]:
    targets_all = benchmark_order({x for g in s.groups for x in g.tables.cross_targets})
    dg = [x for x in targets_all if x in DG_TARGETS]
    other = [x for x in targets_all if x not in DG_TARGETS]
    several = len(s.groups) > 1
    lines: list[str] = []
    for title, targets in (("Cross-dataset (the adapter trained on the source, tested on each target)", other),
                           ("Domain generalization (ImageNet-trained adapter on ImageNet-V2, -Sketch, -A, -R)", dg)):
        if not targets:
            continue
        header = [*(["method"] if several else []), "source (shots)", "source top-1", *targets, "average"]
        rows = []
        for g in s.groups:
            t = g.tables
            sources = benchmark_order({src for src, _ in t.cross})
            for (source, k), per_target in sorted(t.cross.items(),
                                                  key=lambda kv: (sources.index(kv[0][0]), kv[0][1])):
                if not any(x in per_target for x in targets):
                    continue
                means = [per_target[x].mean for x in targets if x in per_target]
                rows.append([*([g.label] if several else []), f"{source} ({k})", _fmt(t.main.get((source, k)), usual),
                             *(_fmt(per_target.get(x), usual) for x in targets), f"{statistics.fmean(means):.2f}"])
        lines += [f"## {title}", ""] + _table(header, rows) + [""]
    return lines


# -- CSV -------------------------------------------------------------------------------------------------------------
def table_csv(s: Summary) -> str:
    """One row per (configuration, dataset), zero-shot rows first; an average row per configuration."""
    keys = [k for k in s.differing]
    shots = sorted({k for g in s.groups for k in (*g.tables.shots, *g.tables.b2n_shots)} |
                   {k for g in s.groups for _, k in g.tables.cross})
    b2n_shots = sorted({k for g in s.groups for k in g.tables.b2n_shots})
    cross_shots = sorted({k for g in s.groups for _, k in g.tables.cross})
    targets = benchmark_order({x for g in s.groups for x in g.tables.cross_targets})
    header = ["configuration", *(s.names[k] for k in keys), "dataset"]
    for k in shots:
        header += [f"{k}-shot mean", f"{k}-shot std", f"{k}-shot seeds"]
        if s.published:
            header += [f"{k}-shot ref", f"{k}-shot diff"]
        if s.ref is not None:
            header += [f"{k}-shot paired diff", f"{k}-shot paired std", f"{k}-shot paired seeds"]
    for k in b2n_shots:
        header += [f"{k}-shot base", f"{k}-shot new", f"{k}-shot HM"]
    for k in cross_shots:
        header += [f"{k}-shot -> {x}" for x in targets]
    rows: list[list[Any]] = []
    datasets = benchmark_order({d for g in s.groups for d in (*g.tables.datasets, *g.tables.b2n_datasets)} |
                               {src for g in s.groups for src, _ in g.tables.cross})
    for z in s.zero_shot:
        for d in datasets:
            if not any((d, k) in z.main for k in shots):
                continue
            row: list[Any] = [z.label, *(show(z.config.get(k)) if k in z.config else "" for k in keys), d]
            for k in shots:
                st = z.main.get((d, k))
                row += [_num(st.mean), _num(st.std), st.n] if st else ["", "", ""]
                if s.published:
                    row += ["", ""]
                if s.ref is not None:
                    row += _paired_cells(s.paired(None, d, k))
            rows.append(row + [""] * (len(header) - len(row)))
    for g in s.groups:
        t = g.tables
        ident = [g.label, *(g.shown(k, "") for k in keys)]
        for d in datasets:
            if d not in t.datasets and d not in t.b2n_datasets and not any(src == d for src, _ in t.cross):
                continue
            row = [*ident, d]
            for k in shots:
                st = t.main.get((d, k))
                row += [_num(st.mean), _num(st.std), st.n] if st else ["", "", ""]
                if s.published:
                    ref = t.ref.get((d, k))
                    row += [_num(ref), _num(st.mean - ref) if st and ref is not None else ""]
                if s.ref is not None:
                    row += _paired_cells(s.paired(g, d, k) if g is not s.ref else {})
            for k in b2n_shots:
                b = t.b2n.get((d, k))
                row += [_num(x.mean) for x in b] if b else ["", "", ""]
            for k in cross_shots:
                per_target = t.cross.get((d, k), {})
                row += [_num(per_target[x].mean) if x in per_target else "" for x in targets]
            rows.append(row)
        for name, values, refs in (("average", {k: v[0] for k, v in t.average.items()}, t.ref_average),
                                   ("11-dataset average", t.benchmark, t.ref_benchmark)):
            if not values:
                continue
            row = [*ident, name]
            for k in shots:
                row += [_num(values.get(k)), "", ""]
                if s.published:
                    row += [_num(refs.get(k)), _num(values[k] - refs[k]) if k in values and k in refs else ""]
                if s.ref is not None:
                    avg = over_datasets([s.paired(g, d, k) for d in t.datasets]) if g is not s.ref and \
                        name == "average" else None
                    row += [_num(avg.mean), "" if math.isnan(avg.std) else _num(avg.std), avg.n or ""] if avg \
                        else ["", "", ""]
            rows.append(row + [""] * (len(header) - len(row)))
    return _csv(header, rows)


def _paired_cells(per_seed: dict[int, float]) -> list[Any]:
    st = _stat(per_seed)
    return [_num(st.mean), _num(st.std), st.n] if st else ["", "", ""]


def runs_csv(s: Summary) -> str:
    keys = [k for k in s.differing]
    runs = [r for g in s.groups for r in g.runs]
    label = {r.variant: g.label for g in s.groups for r in g.runs}
    targets = benchmark_order({x for r in runs for x in r.cross})
    header = ["configuration", *(s.names[k] for k in keys), "dataset", "classes", "shots", "seed", "top1",
              "zero_shot_top1", "base_top1", "new_top1", "harmonic_mean", *(f"-> {x}" for x in targets),
              "trainable_params", "seconds", "path"]
    order = benchmark_order([r.dataset for r in runs])
    rank = {g.variant: i for i, g in enumerate(s.groups)}
    rows = [[label[r.variant], *(show(r.config.get(k)) if reads_key(r.config, k) else "" for k in keys),
             r.dataset, r.subset, r.shots, r.seed,
             _num(r.top1), _num(r.zero_shot), _num(r.base), _num(r.new), _num(r.hm),
             *(_num(r.cross.get(x)) for x in targets), r.params if r.params is not None else "", _num(r.seconds),
             str(r.path)]
            for r in sorted(runs, key=lambda r: (rank[r.variant], order.index(r.dataset), r.subset, r.shots, r.seed))]
    return _csv(header, rows)


def _csv(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return buf.getvalue()


def _num(x: float | None) -> str:
    return "" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.4f}"


# -- plot ------------------------------------------------------------------------------------------------------------
def plot(s: Summary) -> bytes:
    """PNG: top-1 vs shots (average over each configuration's datasets, then a panel per dataset), one line per
    configuration (zero-shot and the published numbers dashed); top-1 vs trainable parameters, a point per
    configuration and shot count."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = ["average", "parameters", *s.datasets]
    cols = min(4, len(panels))
    rows = -(-len(panels) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.4 * cols, 2.8 * rows), squeeze=False)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    colour = {g.variant: colours[i % len(colours)] for i, g in enumerate(s.groups)}
    markers = dict(zip(s.shots, "osD^v<>ph*"))
    for ax, name in zip(axes.flat, panels):
        if name == "parameters":
            _params_panel(ax, s, colour, markers)
            continue
        for g in s.groups:
            t = g.tables
            if name == "average":
                ks = [k for k in t.shots]
                ax.plot(ks, [t.average[k][0] for k in ks], "o-", color=colour[g.variant], label=g.label)
            else:
                ks = [k for k in t.shots if (name, k) in t.main]
                if ks:
                    ax.errorbar(ks, [t.main[(name, k)].mean for k in ks], yerr=[t.main[(name, k)].std for k in ks],
                                fmt="o-", color=colour[g.variant], capsize=3, label=g.label)
        for i, z in enumerate(s.zero_shot):
            ks = [k for k in s.shots if any(key[1] == k for key in z.main)]
            ys = [statistics.fmean(st.mean for (d, kk), st in z.main.items() if kk == k) if name == "average" else
                  (z.main[(name, k)].mean if (name, k) in z.main else math.nan) for k in ks]
            ax.plot(ks, ys, ":", color="grey", label=z.label if i < 3 else None)
        if s.published:
            table = reference(s.published)
            ks = [k for k in s.shots if k in table]
            if name == "average":
                ys = [statistics.fmean(table[k][d] for d in s.datasets if d in table[k])
                      if any(d in table[k] for d in s.datasets) else math.nan for k in ks]
            else:
                ys = [table[k].get(name, math.nan) for k in ks]
            ax.plot(ks, ys, "--", color="black", alpha=0.6, label=f"{s.published} (published)")
        ax.set_xscale("log", base=2)
        ax.set_xticks(s.shots, [str(k) for k in s.shots])
        ax.minorticks_off()
        ax.set_title("average over datasets" if name == "average" else name, fontsize=10)
        ax.set_xlabel("shots per class", fontsize=8)
        ax.set_ylabel("top-1 (%)", fontsize=8)
        ax.grid(alpha=0.3)
        ax.tick_params(labelsize=8)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=6)
    w, h = fig.get_size_inches()  # fixed margins in inches (tight_layout measures every label: seconds per figure)
    fig.subplots_adjust(left=0.6 / w, right=1 - 0.15 / w, bottom=0.45 / h, top=1 - 0.3 / h, wspace=0.35, hspace=0.6)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


def _params_panel(ax: Any, s: Summary, colour: dict[str, str], markers: dict[int, str]) -> None:
    """A point per configuration and shot count at its trainable parameters; methods that train nothing (the frozen
    model's zero-shot rows, hollow, and Tip-Adapter's cache) at 0, which a symlog axis shows (linear below 1)."""
    drawn = False
    for g in s.groups:
        p = g.params
        if p is None:
            continue
        x = statistics.fmean(p)
        for k in g.tables.shots:
            ax.plot([x], [g.tables.average[k][0]], markers.get(k, "o"), color=colour[g.variant], linestyle="none")
            drawn = True
    for i, z in enumerate(s.zero_shot):  # the frozen model: 0 trainable parameters
        for k in s.shots:
            ys = [st.mean for (_, kk), st in z.main.items() if kk == k]
            if ys:
                ax.plot([0], [statistics.fmean(ys)], markers.get(k, "o"), color="grey", markerfacecolor="none",
                        linestyle="none", label=z.label if i < 3 and k == s.shots[0] else None)
                drawn = True
    for k, m in markers.items():  # the shot counts' markers, in grey, for the legend
        ax.plot([], [], m, color="grey", linestyle="none", label=f"K = {k}")
    ax.set_title("top-1 vs trainable parameters", fontsize=10)
    if drawn:
        ax.set_xscale("symlog", linthresh=1)  # log above 1, and 0 on the axis (a log axis drops it)
        ax.set_xlim(left=-0.5)
        ax.legend(fontsize=6)
    else:
        ax.text(0.5, 0.5, "no trainable_params recorded", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel("trainable parameters", fontsize=8)
    ax.set_ylabel("top-1 (%), average over datasets", fontsize=8)
    ax.grid(alpha=0.3)
    ax.tick_params(labelsize=8)


# -- the command -----------------------------------------------------------------------------------------------------
def summarize(directory: str | Path, ref_name: str | None = None, output: str | Path | None = None,
              with_plot: bool = True, compare_to: str | None = None) -> dict[str, Any]:
    """Write <output>.md, .csv, _runs.csv and .png (output defaults to DIR/summary); returns their paths, the
    markdown, the run count and the warnings.

    Raises BlockLoRAError (nothing written) when DIR holds no valid results.json, `compare_to` matches no single
    configuration, one of the files exists but blocklora did not write it (or it was changed since), or another
    summarize is writing the same files right now."""
    from ..ownership import OwnedFiles

    directory = Path(directory)
    if ref_name is not None:
        reference(ref_name)  # an unknown name fails before anything is read or written
    runs, warnings = collect(directory)
    if not runs:
        raise BlockLoRAError(f"no valid results.json under {directory}: nothing to summarize (runs still going, or "
                             "another folder?)" + (f"; {len(warnings)} skipped, the first: {warnings[0]}"
                                                   if warnings else ""))
    s = group(runs, ref_name, compare_to)
    prefix = Path(output) if output is not None else directory / "summary"
    names = {"markdown": prefix.name + ".md", "csv": prefix.name + ".csv", "runs_csv": prefix.name + "_runs.csv",
             "plot": prefix.name + ".png"}
    plotting = with_plot and bool(s.shots)
    if plotting:
        try:
            import matplotlib  # noqa: F401  (an optional dependency: blocklora[plot])
        except ImportError:
            warnings.append("no plot: it needs matplotlib (pip install 'blocklora[plot]')")
            plotting = False
    with OwnedFiles(prefix.parent, prefix.name, "summarize") as owned:
        writing = [names[k] for k in ("markdown", "csv", "runs_csv")] + [names["plot"]] * plotting
        owned.check(writing)
        if not plotting and owned.remove(names["plot"]):  # an earlier summary's plot no longer fits the tables
            warnings.append(f"removed {prefix.parent / names['plot']}: an earlier summary's plot, not redrawn now")
        text = markdown(s, warnings, directory)
        contents = {"markdown": (text + "\n").encode(), "csv": table_csv(s).encode(),
                    "runs_csv": runs_csv(s).encode()}
        if plotting:
            contents["plot"] = plot(s)
        written = owned.write({names[key]: data for key, data in contents.items()})
        files = {key: written[names[key]] for key in contents}
    return {"files": {k: str(v) for k, v in files.items()}, "markdown": text, "runs": len(runs),
            "configurations": len(s.groups), "warnings": warnings}


def add_summarize_parser(sub: Any) -> argparse.ArgumentParser:
    p = sub.add_parser("summarize", help="paper-style tables (markdown, CSV) and plots of the runs under a folder: "
                                         "configurations x datasets per shot count, paired differences")
    p.add_argument("directory", metavar="DIR", help="a sweep's --output, or any folder holding run directories")
    p.add_argument("--reference", choices=sorted(REFERENCES), default=None,
                   help="add a published method's numbers (docs/protocol.md) as a row, and the difference to them "
                        f"({'; '.join(f'{k}: {v}' for k, v in REFERENCE_TITLES.items())})")
    p.add_argument("--compare-to", default=None, metavar="KEY=VALUE[,...]",
                   help="the configuration the paired differences are taken to, e.g. method=block_lora,n_blocks=4 "
                        "(keys as the tables name them; default: the Block-LoRA configuration with the most runs)")
    p.add_argument("--output", default=None, help="path prefix of the files written (default DIR/summary)")
    p.add_argument("--no-plot", action="store_true", help="write the tables only, no plot")
    p.set_defaults(func=cmd_summarize)
    return p


def cmd_summarize(args: argparse.Namespace) -> int:
    out = summarize(args.directory, args.reference, args.output, with_plot=not args.no_plot,
                    compare_to=args.compare_to)
    print(out["markdown"])
    for w in out["warnings"]:
        print(f"warning: {w}", file=sys.stderr)
    print("written: " + ", ".join(out["files"].values()), file=sys.stderr)
    return 0


__all__ = ["Run", "add_summarize_parser", "cmd_summarize", "markdown", "plot", "runs_csv", "summarize", "table_csv"]
