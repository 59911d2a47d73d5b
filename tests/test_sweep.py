"""`blocklora sweep`: the grid, cell locks, resume after a killed worker, two sweeps sharing a directory; one real
sweep on tiny-clip with generated benchmark-layout datasets."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from blocklora.cli.main import build_parser, main
from blocklora.errors import ConfigError
from blocklora.grid.sweep import Cell, Slot, Sweep, cell_action, expand, parse_devices, train_options, try_lock
from data_trees import make_zhou

TINY = ["--model", "tiny-clip", "--pretrained", "none", "--iters", "4", "--batch-size", "8", "--workers", "0",
        "--no-zero-shot"]


# -- the grid and its options ----------------------------------------------------------------------------------------
def test_grid_order_and_paths(tmp_path):
    cells = expand(["caltech101", "dtd"], [1, 16, 4], [1, 2])
    assert [c.shots for c in cells] == [16] * 4 + [4] * 4 + [1] * 4  # longest runs first
    assert cells[:4] == [Cell("caltech101", 16, 1), Cell("caltech101", 16, 2), Cell("dtd", 16, 1), Cell("dtd", 16, 2)]
    assert cells[0].run_dir(tmp_path) == tmp_path / "caltech101" / "shots16" / "seed1"


def test_devices():
    assert [(s.name, s.env) for s in parse_devices("0,1,1", {})] == [
        ("gpu 0", {"CUDA_VISIBLE_DEVICES": "0"}), ("gpu 1", {"CUDA_VISIBLE_DEVICES": "1"}),
        ("gpu 1", {"CUDA_VISIBLE_DEVICES": "1"})]
    cpu = parse_devices("cpu:3", {"OMP_NUM_THREADS": "2"})
    assert len(cpu) == 3 and cpu[0].argv == ("--device", "cpu") and cpu[0].env == {"OMP_NUM_THREADS": "2"}
    assert [s.name for s in parse_devices(None, {"CUDA_VISIBLE_DEVICES": "2,3"})] == ["gpu 2", "gpu 3"]
    for bad in ("cpu:0", "gpu", "0,x"):
        with pytest.raises(ConfigError, match="--devices"):
            parse_devices(bad, {})


def test_cell_action(tmp_path):
    run = tmp_path / "run"
    assert cell_action(run) == "start"
    run.mkdir()
    (run / "config.json").write_text("{}")
    assert cell_action(run) == "overwrite"  # killed before its first checkpoint
    (run / "checkpoint.pt").write_bytes(b"x")
    assert cell_action(run) == "resume"
    (run / "results.json").write_text("{}")
    assert cell_action(run) == "skip"


def test_train_options_are_passed_to_each_cell():
    parser = build_parser()
    args = parser.parse_args(["sweep", "--datasets", "dtd", "--root", "r", "--output", "o", "--model", "tiny-clip",
                              "--lr", "0.01", "--deterministic", "--eval-datasets", "caltech101", "--classes", "base",
                              "train.flip=false"])
    words, overrides = train_options(args)
    assert words == ["--model", "tiny-clip", "--classes", "base", "--lr", "0.01", "--deterministic",
                     "--eval-datasets", "caltech101"]
    assert overrides == ["train.flip=false"]


def test_lock_is_exclusive_and_outlives_the_sweep_in_its_train_process(tmp_path):
    path = tmp_path / "cell.lock"
    fd = try_lock(path)
    assert fd is not None and try_lock(path) is None
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"], pass_fds=(fd,))
    try:
        os.close(fd)  # the sweep is gone; its train process still holds the cell
        assert try_lock(path) is None
    finally:
        child.kill()
        child.wait()
    fd = try_lock(path)
    assert fd is not None
    os.close(fd)


def test_bad_options_fail_before_anything_is_written(tmp_path, capsys):
    root = tmp_path / "data"
    make_zhou(root, "dtd")
    out = tmp_path / "sweep"
    base = ["sweep", "--datasets", "dtd", "--shots", "1", "--seeds", "1", "--root", str(root), "--output", str(out),
            "--devices", "cpu", *TINY]
    assert main([*base, "train.lr=fast"]) == 2
    assert "bad value 'fast' for train.lr" in capsys.readouterr().err
    assert main([*base[:2], "dtd,caltech101", *base[3:]]) == 2  # caltech101 is not under root
    assert "caltech101" in capsys.readouterr().err
    assert main([*base[:2], "dtd,nope", *base[3:]]) == 2
    assert "unknown dataset 'nope'" in capsys.readouterr().err
    assert not out.exists()


# -- scheduling, with a stand-in for `blocklora train` ---------------------------------------------------------------
FAKE_TRAIN = textwrap.dedent("""
    import json, os, sys, time
    from pathlib import Path
    args = sys.argv[1:]
    out = Path(args[args.index("--output") + 1])
    dataset = args[args.index("--dataset") + 1]
    how = "resume" if "--resume" in args else "overwrite" if "--overwrite" in args else "start"
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(str(out) + ".attempts", "a") as f:
        f.write(how + "\\n")
    if dataset == "bad":
        print("error: dataset bad is broken")
        sys.exit(2)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text("{}")
    if dataset == "slow" and how != "resume":
        (out / "checkpoint.pt").write_text("state")
        time.sleep(60)
    time.sleep(float(os.environ.get("FAKE_SLEEP", "0")))
    (out / "results.json").write_text(json.dumps({"top1": 50.0, "shots": 1, "seed": 1, "dataset": {"name": dataset}}))
""")


@pytest.fixture
def fake(tmp_path):
    script = tmp_path / "fake_train.py"
    script.write_text(FAKE_TRAIN)

    def make(out: Path, cells: list[Cell], slots: int = 1) -> Sweep:
        def argv(cell: Cell, action: str, slot: Slot) -> list[str]:
            flag = {"resume": ["--resume"], "overwrite": ["--overwrite"]}.get(action, [])
            return ["--dataset", cell.dataset, "--output", str(cell.run_dir(out)), *flag]

        return Sweep(cells, [Slot(f"cpu {i}") for i in range(slots)], out, argv, [sys.executable, str(script)])

    return make


def _attempts(out: Path, cell: Cell) -> list[str]:
    path = Path(str(cell.run_dir(out)) + ".attempts")
    return path.read_text().split() if path.exists() else []


def test_failed_cell_is_reported_with_its_log_and_the_rest_runs(tmp_path, fake, capsys):
    from blocklora.grid.sweep import _report

    out = tmp_path / "sweep"
    cells = [Cell("bad", 1, 1), Cell("good", 1, 1)]
    outcomes = fake(out, cells, slots=2).run()
    status = {o.cell.dataset: o for o in outcomes}
    assert status["good"].status == "done" and status["good"].top1 == 50.0
    bad = status["bad"]
    assert bad.status == "failed" and bad.returncode == 2 and bad.error == "error: dataset bad is broken"
    assert "error: dataset bad is broken" in Path(bad.log).read_text()
    assert _report(outcomes, 2, out, 1.0, False) == 1
    text = capsys.readouterr().out
    assert "1 done, 1 failed" in text and f"(log: {bad.log})" in text
    manifest = [json.loads(line) for line in (out / "sweep.jsonl").read_text().splitlines()]
    assert sorted(m["status"] for m in manifest) == ["done", "failed"]


def test_killed_worker_then_rerun_resumes(tmp_path, fake):
    out = tmp_path / "sweep"
    slow, fresh, leftover = Cell("slow", 1, 1), Cell("fresh", 1, 1), Cell("leftover", 1, 1)
    leftover.run_dir(out).mkdir(parents=True)
    (leftover.run_dir(out) / "config.json").write_text("{}")  # a run killed before its first checkpoint
    sweep = fake(out, [slow])
    thread = threading.Thread(target=sweep.run)
    thread.start()
    deadline = time.time() + 30
    while not (slow.run_dir(out) / "checkpoint.pt").exists() and time.time() < deadline:
        time.sleep(0.02)
    os.kill(sweep.running[slow.name].pid, signal.SIGKILL)
    thread.join(30)
    assert [o.status for o in sweep.outcomes] == ["failed"] and sweep.outcomes[0].returncode == -signal.SIGKILL
    outcomes = fake(out, [slow, fresh, leftover]).run()
    assert {o.cell.dataset: (o.status, o.action) for o in outcomes} == {
        "slow": ("done", "resume"), "fresh": ("done", "start"), "leftover": ("done", "overwrite")}
    assert _attempts(out, slow) == ["start", "resume"]
    again = fake(out, [slow, fresh, leftover]).run()
    assert [o.status for o in again] == ["skipped"] * 3 and _attempts(out, fresh) == ["start"]


def test_two_sweeps_on_one_directory_split_the_cells(tmp_path, fake, monkeypatch):
    monkeypatch.setenv("FAKE_SLEEP", "0.4")
    out = tmp_path / "sweep"
    cells = [Cell(f"d{i}", 1, 1) for i in range(5)]
    sweeps = [fake(out, cells), fake(out, cells)]
    threads = [threading.Thread(target=s.run) for s in sweeps]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert all(_attempts(out, c) == ["start"] for c in cells)  # every cell ran once
    done = [o.cell for s in sweeps for o in s.outcomes if o.status == "done"]
    assert sorted(c.dataset for c in done) == [c.dataset for c in cells]
    assert all(len([o for o in s.outcomes if o.status == "done"]) >= 1 for s in sweeps)  # both did work
    assert {o.status for s in sweeps for o in s.outcomes} <= {"done", "busy", "skipped"}


# -- the real thing --------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_sweep_end_to_end_then_rerun_skips_then_summarize(tmp_path, capsys):
    root = tmp_path / "data"
    make_zhou(root, "dtd")
    out = tmp_path / "sweep"
    args = ["sweep", "--datasets", "dtd", "--shots", "1,2", "--seeds", "1", "--root", str(root), "--output",
            str(out), "--devices", "cpu:2", *TINY, "train.lr=1e-2"]
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "2 cells: 2 done" in text
    for k in (1, 2):
        r = json.loads((out / "dtd" / f"shots{k}" / "seed1" / "results.json").read_text())
        assert r["shots"] == k and r["seed"] == 1 and r["iters"] == 4 and r["config"]["train"]["lr"] == 0.01
        assert r["device"] == "cpu"
    assert json.loads((out / "sweep.json").read_text())["overrides"] == ["train.lr=1e-2"]
    assert main(args) == 0
    assert "2 cells: 2 skipped" in capsys.readouterr().out
    assert main([*args[:-1], "train.lr=1e-3"]) == 2  # other options into the same directory: refused
    assert "was swept with other train options" in capsys.readouterr().err
    assert main(["summarize", str(out)]) == 0
    md = (out / "summary.md").read_text()
    assert "| dtd |" in md and "1 shot" in md and "2 shots" in md
    assert (out / "summary.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_slurm_array_cells_run_locally_then_resubmission_does_nothing(tmp_path, capsys):
    """--emit slurm: every array task of the script, run here with its SLURM_ARRAY_TASK_ID, trains one cell;
    summarize sees the full grid; running the array again changes nothing."""
    root = tmp_path / "data"
    make_zhou(root, "dtd")
    out = tmp_path / "sweep"
    grid = ["sweep", "--datasets", "dtd", "--shots", "1,2", "--seeds", "1,2", "--root", str(root), "--output",
            str(out), *TINY]
    assert main([*grid, "--emit", "slurm", "--slurm-gpus", "0", "--slurm-partition", "short",
                 "--slurm-max-parallel", "2"]) == 0
    script = out / "sweep.slurm"
    assert str(script) in capsys.readouterr().out
    text = script.read_text()
    assert "#SBATCH --array=0-3%2" in text and "#SBATCH --partition=short" in text and "--gpus" not in text
    assert '--cell "$SLURM_ARRAY_TASK_ID"' in text and "#   3: dtd shots1 seed2" in text
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    for k in range(4):
        subprocess.run(["bash", str(script)], env={**env, "SLURM_ARRAY_TASK_ID": str(k)}, check=True,
                       capture_output=True)
    results = sorted(out.glob("dtd/shots*/seed*/results.json"))
    assert len(results) == 4
    stamps = [p.stat().st_mtime_ns for p in results]
    assert main(["summarize", str(out)]) == 0
    md = (out / "summary.md").read_text()
    assert "| dtd |" in md and "1 shot" in md and "2 shots" in md
    for k in range(4):  # the second submission
        done = subprocess.run(["bash", str(script)], env={**env, "SLURM_ARRAY_TASK_ID": str(k)}, check=True,
                              capture_output=True, text=True)
        assert "1 cell: 1 skipped" in done.stdout
    assert [p.stat().st_mtime_ns for p in results] == stamps
    manifest = [json.loads(x) for x in (out / "sweep.jsonl").read_text().splitlines()]
    assert [m["status"] for m in manifest] == ["done"] * 4 + ["skipped"] * 4
    assert main([*grid, "--cell", "4"]) == 2
    assert "cells 0..3" in capsys.readouterr().err
