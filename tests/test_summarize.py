"""`blocklora summarize`: tables, averages, reference differences and the plot, on hand-written results files."""

from __future__ import annotations

import csv
import json
import statistics
from pathlib import Path

import pytest

from blocklora.cli.main import main
from blocklora.grid.reference import BENCHMARK, REFERENCES
from blocklora.grid.summarize import summarize

REF = REFERENCES["clip-lora"]


def write_run(root: Path, dataset: str, shots: int, seed: int, top1: float, lr: float = 2e-4, **extra) -> Path:
    out = root / dataset / f"shots{shots}" / f"seed{seed}"
    out.mkdir(parents=True)
    config = {"model": "ViT-B-16", "device": "auto", "train": {"lr": lr},
              "data": {"dataset": dataset, "root": "/data", "shots": shots, "seed": seed, "workers": -1,
                       "classes": extra.pop("subset", "all")}}
    results = {"top1": top1, "shots": shots, "seed": seed, "config": config,
               "dataset": {"name": dataset, "classes_subset": config["data"]["classes"]}, **extra}
    (out / "results.json").write_text(json.dumps(results))
    return out


@pytest.fixture
def benchmark_runs(tmp_path) -> Path:
    """All 11 datasets, 1 and 2 shots, 3 seeds: the reference + 1 + (seed - 2), i.e. mean = reference + 1, std 1."""
    for d in BENCHMARK:
        for k in (1, 2):
            for seed in (1, 2, 3):
                write_run(tmp_path, d, k, seed, REF[k][d] + 1 + (seed - 2))
    return tmp_path


def test_tables_with_reference(benchmark_runs, tmp_path):
    out = summarize(benchmark_runs, "clip-lora", tmp_path / "report" / "t")
    assert out["runs"] == 66 and out["warnings"] == []
    md = Path(out["files"]["markdown"]).read_text()
    assert md == out["markdown"] + "\n"
    assert f"| dtd | {REF[1]['dtd'] + 1:.2f} ± 1.00 | {REF[2]['dtd'] + 1:.2f} ± 1.00 |" in md
    assert "| **11-dataset average** | 73.47 | 76.42 |" in md  # the mean of the 11 means (reference mean + 1)
    diffs = md.split("## Difference")[1]
    assert "| dtd | +1.00 | +1.00 |" in diffs
    assert "| **11-dataset average** | +0.97 | +1.02 |" in diffs  # against the published (rounded) averages
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
    assert "| dtd | 52.00 ± 2.83 | – |" in md  # sample std of 50 and 54
    assert "| caltech101 | 90.00 ± 0.00 (1 seed) | 92.00 ± 0.00 (1 seed) |" in md
    assert "| **average** | 71.00 | 92.00 (1 of 2) |" in md
    assert "11-dataset" not in md
    ref_avg = statistics.fmean([REF[4]["dtd"], REF[4]["caltech101"]])
    assert f"| **average** | {71.0 - ref_avg:+.2f} | {92.0 - REF[8]['caltech101']:+.2f} |" in md
    assert not (tmp_path / "summary.png").exists() and (tmp_path / "summary.csv").exists()


def test_mixed_configurations_and_duplicates_are_flagged(tmp_path):
    write_run(tmp_path / "a", "dtd", 1, 1, 50.0)
    write_run(tmp_path / "b", "dtd", 1, 1, 60.0)
    write_run(tmp_path / "b", "dtd", 1, 2, 60.0, lr=1e-3)
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "results.json").write_text("{not json")
    out = summarize(tmp_path, with_plot=False)
    assert out["runs"] == 2
    assert any("is also in" in w for w in out["warnings"])
    assert any("2 different configurations" in w for w in out["warnings"])
    assert any("not a blocklora results file" in w for w in out["warnings"])


def test_errors(tmp_path, capsys):
    assert main(["summarize", str(tmp_path)]) == 2
    assert "no results.json" in capsys.readouterr().err
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
    import sys

    write_run(tmp_path, "dtd", 1, 1, 50.0)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # not installed: import raises ImportError
    out = summarize(tmp_path)
    assert "plot" not in out["files"] and any("matplotlib" in w for w in out["warnings"])
    assert (tmp_path / "summary.md").exists() and (tmp_path / "summary.csv").exists()
