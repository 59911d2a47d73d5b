"""`blocklora summarize`: configurations x datasets tables, paired differences, averages, published numbers and the
plot, on hand-written results files; damaged results files, the user's own files, two summaries at once."""

from __future__ import annotations

import csv
import json
import os
import statistics
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from blocklora.cli.main import main
from blocklora.grid.reference import BENCHMARK, REFERENCES
from blocklora.grid.summarize import summarize

REF = REFERENCES["clip-lora"]


def write_run(root: Path, dataset: str, shots: int, seed: int, top1: float, lr: float = 2e-4,
              method: str = "block_lora", n_blocks: int | None = None, **extra) -> Path:
    out = root / dataset / f"shots{shots}" / f"seed{seed}"
    out.mkdir(parents=True)
    n_blocks = n_blocks if n_blocks is not None else (8 if method == "block_lora" else 1)
    config = {"model": "ViT-B-16", "pretrained": "openai", "device": "auto",
              "adapter": {"method": method, "r": 2, "n_blocks": n_blocks},
              "train": {"lr": lr, "iters": None, "iters_per_shot": 500},
              "eval": {"split": "test", "limit": None, "batch_size": 128},
              "data": {"dataset": dataset, "root": str(root), "shots": shots, "seed": seed, "workers": -1,
                       "classes": extra.pop("subset", "all")}}
    results = {"top1": top1, "shots": shots, "seed": seed, "config": config,
               "dataset": {"name": dataset, "classes_subset": config["data"]["classes"]}, **extra}
    (out / "results.json").write_text(json.dumps(results))
    return out


def table(md: str, heading: str) -> dict[str, dict[str, str]]:
    """The markdown table under `heading` (a line starting with it): first column -> {column: cell}."""
    lines = md.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(heading))
    rows = []
    for line in lines[start + 1:]:
        if line.startswith("|"):
            rows.append([c.strip() for c in line.strip("|").split("|")])
        elif rows:
            break
    header, body = rows[0], rows[2:]
    return {r[0]: dict(zip(header, r)) for r in body}


def pm(values: list[float]) -> str:
    return f"{statistics.fmean(values):.2f} ± {statistics.stdev(values):.2f}"


def dpm(values: list[float]) -> str:
    return f"{statistics.fmean(values):+.2f} ± {statistics.stdev(values):.2f}"


@pytest.fixture
def benchmark_runs(tmp_path) -> Path:
    """All 11 datasets, 1 and 2 shots, 3 seeds: the reference + 1 + (seed - 2), i.e. mean = reference + 1, std 1."""
    for d in BENCHMARK:
        for k in (1, 2):
            for seed in (1, 2, 3):
                write_run(tmp_path / "runs", d, k, seed, REF[k][d] + 1 + (seed - 2))
    return tmp_path / "runs"


def test_tables_with_reference(benchmark_runs, tmp_path):
    out = summarize(benchmark_runs, "clip-lora", tmp_path / "report" / "t")
    assert out["runs"] == 66 and out["configurations"] == 1 and out["warnings"] == []
    md = Path(out["files"]["markdown"]).read_text()
    assert md == out["markdown"] + "\n"
    assert "Shared by every run: model ViT-B-16, pretrained openai, method block_lora, r 2, n_blocks 8, lr 0.0002, " \
           "steps 500 x shots, split test." in md
    one, two = table(md, "## 1 shot"), table(md, "## 2 shots")
    assert one["block_lora"]["dtd"] == f"{REF[1]['dtd'] + 1:.2f} ± 1.00"
    assert two["block_lora"]["eurosat"] == f"{REF[2]['eurosat'] + 1:.2f} ± 1.00"
    assert one["block_lora"]["11-dataset average"] == "73.47"  # the mean of the 11 means (reference mean + 1)
    assert two["block_lora"]["11-dataset average"] == "76.42"
    assert one["clip-lora (published)"]["dtd"] == f"{REF[1]['dtd']:.1f}"
    assert one["clip-lora (published)"]["11-dataset average"] == f"{REF[1]['average']:.2f}"
    diffs = table(md, "### 1 shot: block_lora minus each row")
    assert diffs["clip-lora (published)"]["dtd"] == "+1.00"
    assert diffs["clip-lora (published)"]["11-dataset average"] == "+0.97"  # vs the published (rounded) average
    assert table(md, "### 2 shots")["clip-lora (published)"]["11-dataset average"] == "+1.02"
    with open(out["files"]["csv"]) as fh:
        rows = {r["dataset"]: r for r in csv.DictReader(fh)}
    assert list(rows)[:11] == list(BENCHMARK) and "average" in rows and "11-dataset average" in rows
    assert float(rows["eurosat"]["2-shot mean"]) == pytest.approx(REF[2]["eurosat"] + 1)
    assert float(rows["eurosat"]["2-shot std"]) == pytest.approx(1.0) and rows["eurosat"]["2-shot seeds"] == "3"
    assert float(rows["eurosat"]["1-shot diff"]) == pytest.approx(1.0)
    assert float(rows["11-dataset average"]["1-shot ref"]) == REF[1]["average"]
    with open(out["files"]["runs_csv"]) as fh:
        assert len(list(csv.DictReader(fh))) == 66
    png = Path(out["files"]["plot"])
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


def test_partial_grid_averages_over_what_is_present(tmp_path, capsys):
    for seed, acc in ((1, 50.0), (2, 54.0)):
        write_run(tmp_path, "dtd", 4, seed, acc)
    write_run(tmp_path, "caltech101", 4, 1, 90.0)
    write_run(tmp_path, "caltech101", 8, 1, 92.0)
    assert main(["summarize", str(tmp_path), "--reference", "clip-lora", "--no-plot"]) == 0
    md = capsys.readouterr().out
    four, eight = table(md, "## 4 shots"), table(md, "## 8 shots")
    assert four["block_lora"] == {"method": "block_lora", "caltech101": "90.00 ± 0.00 (1 seed)",
                                  "dtd": "52.00 ± 2.83", "average": "71.00"}  # sample std of 50 and 54
    assert eight["block_lora"] == {"method": "block_lora", "caltech101": "92.00 ± 0.00 (1 seed)", "average": "92.00"}
    assert "11-dataset" not in md
    ref_avg = statistics.fmean([REF[4]["dtd"], REF[4]["caltech101"]])
    assert table(md, "### 4 shots")["clip-lora (published)"]["average"] == f"{71.0 - ref_avg:+.2f}"
    assert not (tmp_path / "summary.png").exists() and (tmp_path / "summary.csv").exists()


def test_methods_and_hyperparameters_are_grouped_never_pooled_or_dropped(tmp_path, capsys):
    """A Block-LoRA sweep (n = 8), a LoRA sweep and a Block-LoRA n = 2 sweep (2 seeds) of the same grid, summarized
    from their parent: three configurations side by side, zero-shot as a row, paired differences to Block-LoRA."""
    acc = {"block_lora": {1: 61.0, 2: 64.0, 3: 62.5}, "lora": {1: 60.0, 2: 62.0, 3: 63.0},
           "n2": {1: 59.0, 2: 63.5}}
    for d, offset in (("dtd", 0.0), ("caltech101", 30.0)):
        for name, seeds in acc.items():
            method, n = ("block_lora", 2) if name == "n2" else (name, None)
            for seed, top1 in seeds.items():
                write_run(tmp_path / name, d, 4, seed, top1 + offset, method=method, n_blocks=n,
                          zero_shot_top1=40.0 + offset, trainable_params={"lora": 3072, "n2": 2304}.get(name, 1728))
    assert main(["summarize", str(tmp_path)]) == 0
    captured = capsys.readouterr()
    assert "warning" not in captured.err and "skipped" not in captured.err
    md = (tmp_path / "summary.md").read_text()
    assert captured.out == md
    assert "16 runs of 3 configurations" in md and "differ in: adapter.method, adapter.n_blocks." in md
    configs = table(md, "## Configurations")
    assert list(configs) == ["lora", "block_lora n_blocks=2", "block_lora n_blocks=8"]  # Block-LoRA last, as "ours"
    assert configs["lora"]["trainable params"] == "3,072" and configs["block_lora n_blocks=2"]["runs"] == "4"
    k4 = table(md, "## 4 shots")
    assert list(k4) == ["zero-shot", "lora", "block_lora n_blocks=2", "block_lora n_blocks=8"]
    assert k4["zero-shot"]["dtd"] == "40.00 ± 0.00"  # one measurement per seed, not one per configuration
    assert k4["lora"]["dtd"] == pm([60.0, 62.0, 63.0]) and k4["lora"]["caltech101"] == pm([90.0, 92.0, 93.0])
    assert k4["block_lora n_blocks=2"]["dtd"] == pm([59.0, 63.5]) + " (2 seeds)"
    bl = acc["block_lora"]
    diff = table(md, "### 4 shots: block_lora n_blocks=8 minus each row")
    assert diff["lora"]["dtd"] == dpm([bl[s] - acc["lora"][s] for s in (1, 2, 3)])
    assert diff["block_lora n_blocks=2"]["dtd"] == dpm([bl[s] - acc["n2"][s] for s in (1, 2)]) + " (2 seeds)"
    assert diff["zero-shot"]["dtd"] == dpm([bl[s] - 40.0 for s in (1, 2, 3)])
    assert diff["lora"]["average"] == dpm([bl[s] - acc["lora"][s] for s in (1, 2, 3)])  # per seed over datasets
    with open(tmp_path / "summary_runs.csv") as fh:
        runs = list(csv.DictReader(fh))
    assert len(runs) == 16 and {r["configuration"] for r in runs} == set(configs)
    with open(tmp_path / "summary.csv") as fh:
        rows = {(r["configuration"], r["dataset"]): r for r in csv.DictReader(fh)}
    assert float(rows[("lora", "dtd")]["4-shot paired diff"]) == pytest.approx(
        statistics.fmean(bl[s] - acc["lora"][s] for s in (1, 2, 3)), abs=1e-4)  # written with 4 decimals
    assert rows[("block_lora n_blocks=2", "dtd")]["4-shot paired seeds"] == "2"
    assert rows[("block_lora n_blocks=8", "dtd")]["4-shot paired diff"] == ""  # the reference itself
    assert float(rows[("zero-shot", "caltech101")]["4-shot mean"]) == 70.0
    assert (tmp_path / "summary.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # another reference configuration; one that names none or several is one error line
    assert main(["summarize", str(tmp_path), "--no-plot", "--compare-to", "method=lora"]) == 0
    assert "### 4 shots: lora minus each row" in capsys.readouterr().out
    for spec, why in (("method=block_lora", "matches 2 configurations"), ("n_blocks=16", "matches no configuration")):
        assert main(["summarize", str(tmp_path), "--no-plot", "--compare-to", spec]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: --compare-to") and why in err and "lora; block_lora n_blocks=2" in err


def test_duplicates_are_reported_not_dropped_silently(tmp_path):
    write_run(tmp_path / "a", "dtd", 1, 1, 50.0)
    write_run(tmp_path / "b", "dtd", 1, 1, 60.0)  # the same configuration and seed again
    write_run(tmp_path / "b", "dtd", 1, 2, 60.0, lr=1e-3)  # another configuration: not a duplicate
    out = summarize(tmp_path, with_plot=False)
    assert out["runs"] == 2 and out["configurations"] == 2
    (dup,) = out["warnings"]
    assert f"{tmp_path / 'b' / 'dtd' / 'shots1' / 'seed1'} and {tmp_path / 'a' / 'dtd' / 'shots1' / 'seed1'}" in dup
    assert "the tables use" in dup and "> warning: duplicate" in out["markdown"]
    k1 = table(out["markdown"], "## 1 shot")
    assert k1["block_lora lr=0.0002"]["dtd"] == "50.00 ± 0.00" and k1["block_lora lr=0.001"]["dtd"] == "60.00 ± 0.00"


DAMAGE = {  # a results.json field -> a damaged value (each must be skipped, by name, never averaged in)
    "top1": ["x", True, None, 1e308, 250.0, -1.0, [50]], "shots": [-4, 0, 1.5, "4", 10**6],
    "seed": [-1, 2**64, "1"], "dataset": [{}, {"name": ""}, [1], {"name": "d", "classes_subset": "half"}],
    "config": [[1], "x", {"adapter": {"n_blocks": "x"}}, {"adapter": {"method": 5}}, {"train": {"lr": float("nan")}},
               {"model": {"x": 1}}, {"adapter": {"towers": 7}}],
    "cross_dataset": [[1], {"x": 101.0}, {"x": "a"}], "wall_time_s": [[1], {"total": -5}],
    "zero_shot_top1": [101.0, "x"], "trainable_params": [-1, 1.5], "per_class": ["x", [1]], "base_top1": ["x"],
    "split_file": [5],
}
RAW = {"not JSON": "{not json", "empty": "", "a list": "[1, 2]", "nested 100000 deep": "[" * 100_000,
       "Infinity": '{"top1": Infinity, "shots": 1, "seed": 2, "dataset": {"name": "dtd"}}',
       "NaN": '{"top1": NaN, "shots": 1, "seed": 2, "dataset": {"name": "dtd"}}'}


def test_damaged_results_are_skipped_by_name(tmp_path, capsys):
    write_run(tmp_path, "dtd", 1, 1, 50.0)
    good = json.loads((write_run(tmp_path / "x", "dtd", 1, 2, 60.0) / "results.json").read_text())
    cases = [(f"{k}={v!r}", json.dumps({**good, k: v})) for k, values in DAMAGE.items() for v in values]
    cases += list(RAW.items())
    bad = {}
    for i, (what, text) in enumerate(cases):
        bad[what] = tmp_path / "bad" / str(i) / "results.json"
        bad[what].parent.mkdir(parents=True)
        bad[what].write_text(text)
    (tmp_path / "x" / "dtd" / "shots1" / "seed2" / "results.json").unlink()
    fifo = tmp_path / "fifo" / "results.json"
    fifo.parent.mkdir()
    os.mkfifo(fifo)  # would hang a reader
    assert main(["summarize", str(tmp_path), "--no-plot"]) == 0
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    skipped = [line for line in err.splitlines() if line.startswith("warning: skipped")]
    assert len(skipped) == len(cases) + 1 and f"warning: skipped {fifo}: not a regular file" in skipped
    for what, path in bad.items():
        line = next((w for w in skipped if f"skipped {path}:" in w), None)
        assert line is not None and ("damaged" in line or "not a" in line or "has no" in line), what
    assert "1 runs of 1 configuration" in out
    assert table(out, "## 1 shot")["block_lora"]["dtd"] == "50.00 ± 0.00"  # the good run alone
    (tmp_path / "dtd" / "shots1" / "seed1" / "results.json").write_text("{}")
    assert main(["summarize", str(tmp_path), "--no-plot"]) == 2  # nothing valid: one line naming the first skipped
    err = capsys.readouterr().err
    assert err.startswith("error: no valid results.json") and "skipped, the first:" in err and \
        len(err.splitlines()) == 1


def test_the_users_own_files_are_never_replaced(tmp_path, capsys):
    runs = tmp_path / "runs"
    write_run(runs, "dtd", 1, 1, 50.0)
    notes = runs / "summary.md"
    notes.write_text("my notes\n")
    assert main(["summarize", str(runs)]) == 2
    err = capsys.readouterr().err
    assert err == f"error: refusing to replace {notes}: it was not written by blocklora (blocklora replaces only the " \
                  "files it wrote); move it away, or choose another --output\n"
    assert notes.read_text() == "my notes\n" and not (runs / "summary.csv").exists()  # checked before any write
    notes.unlink()
    assert main(["summarize", str(runs)]) == 0 and (runs / "summary.png").exists()
    capsys.readouterr()
    assert main(["summarize", str(runs), "--no-plot"]) == 0  # its own files: replaced; its plot, not redrawn: gone
    assert not (runs / "summary.png").exists() and "removed" in capsys.readouterr().err
    with open(runs / "summary.csv", "a") as fh:
        fh.write("my extra row\n")
    assert main(["summarize", str(runs), "--no-plot"]) == 2
    assert "summary.csv: it was not written by blocklora, or was changed since" in capsys.readouterr().err
    (runs / "summary.csv").unlink()
    target = tmp_path / "elsewhere.md"
    target.write_text("keep\n")
    (runs / "summary.md").unlink()
    (runs / "summary.md").symlink_to(target)
    assert main(["summarize", str(runs), "--no-plot"]) == 2
    assert "summary.md: it is a symbolic link" in capsys.readouterr().err and target.read_text() == "keep\n"
    (runs / "summary.md").unlink()
    (runs / "summary.png").write_bytes(b"my own picture")
    assert main(["summarize", str(runs), "--no-plot"]) == 0  # a user's own: left alone
    assert (runs / "summary.png").read_bytes() == b"my own picture"


def test_a_second_summarize_at_once_fails_naming_the_first(tmp_path, capsys):
    """Another process holds the summary files (as a summarize still writing them does): this one writes nothing."""
    write_run(tmp_path, "dtd", 1, 1, 50.0)
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys
        from blocklora.ownership import OwnedFiles
        with OwnedFiles({str(tmp_path)!r}, "summary", "summarize"):
            print("holding", flush=True)
            sys.stdin.readline()
        """)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    try:
        assert holder.stdout.readline() == "holding\n"
        assert main(["summarize", str(tmp_path)]) == 2
        err = capsys.readouterr().err
        assert err == f"error: another blocklora summarize (pid {holder.pid} on {os.uname().nodename}) is writing " \
                      f"{tmp_path / 'summary'}.* right now: wait for it to finish, or choose another --output\n"
        assert not any(tmp_path.glob("summary*"))
    finally:
        holder.communicate("\n", timeout=30)
    assert main(["summarize", str(tmp_path), "--no-plot"]) == 0


def test_errors(tmp_path, capsys):
    assert main(["summarize", str(tmp_path)]) == 2
    assert "no valid results.json" in capsys.readouterr().err
    assert main(["summarize", str(tmp_path / "missing")]) == 2
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main(["summarize", str(tmp_path), "--reference", "coop"])
    assert e.value.code == 2 and "invalid choice: 'coop'" in capsys.readouterr().err


def test_reference_table_matches_protocol_md():
    for row in REF.values():
        assert set(row) == {*BENCHMARK, "average"}
        assert statistics.fmean(row[d] for d in BENCHMARK) == pytest.approx(row["average"], abs=0.06)
    assert REF[16]["fgvc_aircraft"] == 54.7 and REF[1]["imagenet"] == 70.4 and REF[8]["eurosat"] == 89.7


def test_without_matplotlib_the_tables_are_still_written(tmp_path, monkeypatch):
    write_run(tmp_path, "dtd", 1, 1, 50.0)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # not installed: import raises ImportError
    out = summarize(tmp_path)
    assert "plot" not in out["files"] and any("matplotlib" in w for w in out["warnings"])
    assert (tmp_path / "summary.md").exists() and (tmp_path / "summary.csv").exists()


def test_keys_a_method_does_not_read_neither_split_nor_pool_its_runs(tmp_path, capsys):
    """A sweep of block_lora and tip_adapter over lr and n_blocks (as `sweep` gives every method its fixed options):
    tip_adapter reads neither, so its runs at another lr or n_blocks are one configuration, shown with '–' for them;
    the two Block-LoRA lrs stay apart."""
    for lr, n in ((2e-4, 2), (1e-3, 4)):
        for seed in (1, 2):
            write_run(tmp_path / f"bl{lr}", "dtd", 1, seed, 50.0 + seed + 1000 * lr, lr=lr, method="block_lora",
                      n_blocks=n, trainable_params=100, zero_shot_top1=40.0)
    write_run(tmp_path / "tip_a", "dtd", 1, 1, 45.0, lr=2e-4, method="tip_adapter", trainable_params=0,
              zero_shot_top1=40.0)
    write_run(tmp_path / "tip_b", "dtd", 1, 2, 47.0, lr=1e-3, method="tip_adapter", n_blocks=4, trainable_params=0,
              zero_shot_top1=40.0)
    out = summarize(tmp_path, with_plot=False)
    assert out["warnings"] == [] and out["runs"] == 6 and out["configurations"] == 3
    md = out["markdown"]
    configs = table(md, "## Configurations")
    assert list(configs) == ["tip_adapter", "block_lora n_blocks=2 lr=0.0002", "block_lora n_blocks=4 lr=0.001"]
    assert (configs["tip_adapter"]["lr"], configs["tip_adapter"]["n_blocks"], configs["tip_adapter"]["runs"]) == \
        ("–", "–", "2")
    assert configs["block_lora n_blocks=4 lr=0.001"]["lr"] == "0.001"
    assert table(md, "## 1 shot")["tip_adapter"]["dtd"] == pm([45.0, 47.0])  # both seeds, one row
    assert "Shared by every run that reads the setting: model ViT-B-16" in md and " r 2" in md
    with open(tmp_path / "summary_runs.csv") as fh:
        runs = {(r["configuration"], r["seed"]): r for r in csv.DictReader(fh)}
    assert len(runs) == 6 and runs[("tip_adapter", "2")]["lr"] == "" and runs[("tip_adapter", "2")]["n_blocks"] == ""
    # the same runs with a second tip_adapter at the same seed: the same computation, a duplicate named, not pooled
    write_run(tmp_path / "tip_c", "dtd", 1, 1, 45.0, lr=5e-3, method="tip_adapter", trainable_params=0)
    again = summarize(tmp_path, with_plot=False)
    assert again["runs"] == 6 and len(again["warnings"]) == 1 and "duplicate" in again["warnings"][0]


def test_the_parameter_plot_shows_methods_that_train_nothing(tmp_path):
    """top-1 vs trainable parameters on a symlog axis: the zero-shot rows and a 0-parameter method at x = 0."""
    pytest.importorskip("matplotlib")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from blocklora.grid.summarize import _params_panel
    from blocklora.grid.tables import collect, group

    write_run(tmp_path / "bl", "dtd", 1, 1, 50.0, trainable_params=1728, zero_shot_top1=40.0)
    write_run(tmp_path / "tip", "dtd", 1, 1, 45.0, method="tip_adapter", trainable_params=0, zero_shot_top1=40.0)
    s = group(collect(tmp_path)[0])
    fig, ax = plt.subplots()
    _params_panel(ax, s, {g.variant: "C0" for g in s.groups}, {1: "o"})
    points = sorted((float(line.get_xdata()[0]), float(line.get_ydata()[0])) for line in ax.lines
                    if len(line.get_xdata()))
    plt.close(fig)
    assert points == [(0.0, 40.0), (0.0, 45.0), (1728.0, 50.0)] and ax.get_xscale() == "symlog"
