"""benchmarks/accuracy.py measures: a cell is reused only when its recipe and code match, the run says what it
reused and from when, --fresh reuses nothing, and committed results are never rewritten unless something was
measured. A one-cell grid (K = 1, seed 1, 2 steps, 40 test images) on the real packaged model and Fashion-MNIST."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--methods", "block_lora_n8", "--shots", "1", "--seeds", "1", "--no-ablations", "--iters", "2",
        "--test-images", "40"]


@pytest.fixture(scope="module")
def bench():
    from blocklora.backbones import effnet_minilm
    from blocklora.data import fashion_mnist
    from blocklora.errors import BlockLoRAError

    try:
        effnet_minilm._packages()
        fashion_mnist.load()
    except BlockLoRAError as e:
        pytest.skip(str(e))
    spec = importlib.util.spec_from_file_location("bench_accuracy", ROOT / "benchmarks" / "accuracy.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def measured(bench, tmp_path_factory):
    """The grid measured once: its results folder, work folder and output."""
    tmp = tmp_path_factory.mktemp("bench")
    results, work = tmp / "results", tmp / "work"
    with pytest.MonkeyPatch.context() as mp:  # the script points the zero-shot cache at its work folder otherwise
        mp.setenv("BLOCKLORA_CACHE", str(tmp / "cache"))
        out = _main(bench, TINY + ["--results", str(results), "--work", str(work)])
        yield results, work, out


def _main(bench, argv) -> str:
    import contextlib
    import io

    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        assert bench.main(argv) == 0
    return buffer.getvalue()


def test_a_first_run_measures_and_records_recipe_code_and_date(measured):
    results, work, out = measured
    assert "plan: 2 cells: 0 to reuse, 2 to measure" in out
    assert "2 cells: measured 2, reused 0" in out
    data = json.loads((results / "accuracy.json").read_text())
    cell, probe = data["cells"]["block_lora_n8_K1_s1"], data["linear_probe"]["K1_s1"]
    for c in (cell, probe):
        assert len(c["recipe"]) == 16 and len(c["code"]) == 16 and c["measured"][:2] == "20" and c["machine"]
    assert cell["iters"] == 2 and cell["n_test"] == 40 and probe["n_test"] == 40
    assert "date" not in data["config"]  # no run-level date: only the cells' own
    assert (work / "block_lora_n8_K1_s1" / "results.json").is_file()


def test_a_rerun_reuses_says_so_and_rewrites_nothing(bench, measured):
    results, work, _ = measured
    before = {p.name: p.read_bytes() for p in results.iterdir()}
    out = _main(bench, TINY + ["--results", str(results), "--work", str(work)])
    assert "2 cells: measured 0, reused 2 (2 from run directories in" in out and "--fresh" in out
    assert "nothing measured" in out
    assert "measured with another recipe" not in out  # cells the work folder holds are not called stale
    assert {p.name: p.read_bytes() for p in results.iterdir()} == before


def test_committed_cells_are_reused_on_a_fresh_checkout(bench, measured, tmp_path):
    results, _, _ = measured
    measured_at = json.loads((results / "accuracy.json").read_text())["cells"]["block_lora_n8_K1_s1"]["measured"]
    before = (results / "accuracy.json").read_bytes()
    out = _main(bench, TINY + ["--results", str(results), "--work", str(tmp_path / "new")])
    assert "reused 2 (2 from the committed results file; measured" in out and measured_at in out
    assert not list((tmp_path / "new").glob("block_lora*"))  # nothing was run
    assert (results / "accuracy.json").read_bytes() == before


def test_other_code_or_recipe_is_not_reused(bench, measured, tmp_path, monkeypatch):
    results, work, _ = measured
    before = (results / "accuracy.json").read_bytes()
    args = TINY + ["--results", str(results), "--work", str(work), "--report-only"]
    longer = [a if a != "2" else "3" for a in args]  # --iters 3: the adapter cell's recipe changed, the probe's not
    out = _main(bench, longer)
    assert "plan: 2 cells: 1 to reuse, 1 to measure" in out
    assert "plan: 1 cell of the committed" in out and "measured with another recipe, code version or numerics" in out
    monkeypatch.setattr(bench, "code_version", lambda: "another-version")
    out = _main(bench, args)
    assert "plan: 2 cells: 0 to reuse, 2 to measure" in out and "2 missing" in out
    assert (results / "accuracy.json").read_bytes() == before  # report-only with nothing reusable: left alone


def test_other_numerics_are_not_reused(bench, measured, monkeypatch):
    """Issue 25: the same recipe and code under another thread count, ATen CPU kernel path or torch gives other
    last digits and, through 200 steps, another top-1: such a cell is not this run's, and is not reused."""
    import torch

    results, work, _ = measured
    args = TINY + ["--results", str(results), "--work", str(work), "--report-only"]
    cell = next(iter(json.loads((results / "accuracy.json").read_text())["cells"].values()))
    assert cell["numerics"] == bench.numerics() and torch.backends.cpu.get_cpu_capability() in cell["numerics"]
    assert "plan: 2 cells: 2 to reuse, 0 to measure" in _main(bench, args)
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "ANOTHER-KERNEL-PATH")
    out = _main(bench, args)
    assert "plan: 2 cells: 0 to reuse, 2 to measure" in out and "numerics (this run: torch" in out


def test_fresh_reuses_nothing(bench, measured):
    results, work, _ = measured
    out = _main(bench, TINY + ["--results", str(results), "--work", str(work), "--report-only", "--fresh"])
    assert "plan: 2 cells: 0 to reuse, 2 to measure" in out


def test_the_code_version_ignores_comments_and_docstrings_but_not_code(bench):
    source = 'def f(x):\n    """Measured: 73.55%."""\n    return x + 1  # why\n'
    same = '"""Module notes."""\ndef f(x):\n    """Measured: 74.10% (new numbers)."""\n\n    return x + 1\n'
    other = 'def f(x):\n    """Measured: 73.55%."""\n    return x + 2  # why\n'
    assert bench.code_text(source) == bench.code_text(same)
    assert bench.code_text(source) != bench.code_text(other)
    assert bench.code_text('def g():\n    """Only a docstring."""\n') == bench.code_text("def g():\n    pass\n")


def test_paired_differences_compare_the_same_draws(bench):
    def cell(method, seed, top1):
        return {"method": method, "shots": 4, "seed": seed, "top1": top1, "zero_shot_top1": 25.0,
                "trainable_params": 10, "wall_s": 1.0, "train_s": 1.0}

    cells = {f"{m}_K4_s{s}": cell(m, s, t) for m, s, t in
             [("lora", 1, 60.0), ("lora", 2, 70.0), ("lora", 3, 80.0),
              ("block_lora_n8", 1, 59.0), ("block_lora_n8", 2, 68.0), ("block_lora_n8", 3, 77.0)]}
    probe = {f"K4_s{s}": {"top1": t, "shots": 4, "seed": s, "params": 5} for s, t in [(1, 59.0), (2, 71.0), (3, 80.0)]}
    row = bench.aggregate(cells, probe, [4])["4"]
    # Per seed: -1, -2, -3 against LoRA (mean -2, std 1, s.e. 1/sqrt(3)); the unpaired means differ by the same -2.
    assert row["block_lora_n8"]["vs_lora"] == {"mean": -2.0, "se": round(1 / 3 ** 0.5, 2), "n": 3}
    assert row["lora"]["vs_probe"] == {"mean": 0.0, "se": round(1 / 3 ** 0.5, 2), "n": 3}  # +1, -1, 0
    assert "vs_lora" not in row["lora"] and "vs_block_lora" not in row["block_lora_n8"]
    assert row["lora"]["vs_block_lora"] == {"mean": 2.0, "se": round(1 / 3 ** 0.5, 2), "n": 3}
    # columns: vs Block-LoRA n=8, vs LoRA, vs probe; a method is never paired with itself
    assert "| Block-LoRA n=8 |  | -2.00 ± 0.58 | -2.00 ± 1.00 |" in bench.markdown({"4": row}, [4])


def test_paired_differences_against_reference_cells_need_the_same_draw(bench):
    """--paired-with: another file's LoRA / Block-LoRA cells are paired against, never listed, and only where the
    split file (the K-shot draw) is the same one."""
    def cell(method, seed, top1, sha):
        return {"method": method, "shots": 4, "seed": seed, "top1": top1, "zero_shot_top1": 25.0,
                "trainable_params": 10, "wall_s": 1.0, "train_s": 1.0, "split_sha256": sha}

    cells = {f"coop_K4_s{s}": cell("coop", s, 60.0 + s, f"draw{s}") for s in (1, 2, 3)}
    reference = {f"block_lora_n8_K4_s{s}": cell("block_lora_n8", s, 62.0, f"draw{s}" if s < 3 else "other")
                 for s in (1, 2, 3)}
    row = bench.aggregate(cells, {}, [4], reference)["4"]
    assert "block_lora_n8" not in row  # the reference is not a row of this table
    assert row["coop"]["vs_block_lora"] == {"mean": -0.5, "se": 0.5, "n": 2}  # seed 3 drew another split: unpaired


@pytest.mark.parametrize("shots, extra", [
    ([1], set()),
    ([4], {"block_lora_n8_fold_mean", "block_lora_n8_kaiming_full"}),
    ([16], {"lora_text_only", "block_lora_n8_text_only"}),
])
def test_ablations_and_diagnostics_run_only_at_a_k_asked_for(bench, tmp_path, shots, extra):
    # `--shots 4` re-measures K = 4 alone: its ablations, but not the K = 16 diagnostics (no step budget asked for).
    plan = bench.Grid(tmp_path, {}, {k: 2 for k in shots}, 40, fresh=False, run_missing=False)
    assert bench.collect(plan, [1], shots, with_ablations=True) == {}  # nothing measured, nothing reusable
    assert plan.missing == len(bench.METHODS) + len(extra)
    assert extra == set(bench.ABLATIONS if 4 in shots else bench.DIAGNOSTICS if 16 in shots else ())
    assert not any(tmp_path.iterdir())  # planning writes nothing


def test_any_code_reports_cells_of_earlier_code_but_never_other_recipes_or_numerics(bench):
    cell = {"recipe": "r1", "code": "old", "numerics": bench.numerics()}
    assert not bench.matches(cell, "r1", "new") and bench.matches(cell, "r1", bench.ANY_CODE)
    assert not bench.matches(cell, "r2", bench.ANY_CODE)
    assert not bench.matches({**cell, "numerics": "torch 0, ATen CPU X, 9 thread(s)"}, "r1", bench.ANY_CODE)
    with pytest.raises(SystemExit):  # it only reports: measuring under "any code" would stamp no version
        bench.main(["--any-code"])
