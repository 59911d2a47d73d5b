"""`blocklora sweep`: the grid and its method / hyper-parameter axes, cell locks, resume after a killed worker, two
sweep processes racing on one directory, a manifest that cannot be written; one real sweep of two methods and an
n_blocks axis on tiny-clip with generated benchmark-layout datasets, then summarized."""

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
from blocklora.grid.sweep import (
    Cell,
    Slot,
    Sweep,
    cell_action,
    cell_argv,
    expand,
    parse_devices,
    plan,
    train_options,
    try_lock,
)
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


def _plan(tmp_path, *words):
    root = tmp_path / "data"
    if not root.exists():
        make_zhou(root, "dtd")
    args = build_parser().parse_args(["sweep", "--datasets", "dtd", "--shots", "1,4", "--seeds", "1", "--root",
                                      str(root), "--output", str(tmp_path / "sweep"), *TINY, *words])
    return plan(args, parse_devices("cpu", {}))


def test_axes_run_every_combination_in_readable_unique_folders(tmp_path, capsys):
    g = _plan(tmp_path, "--methods", "lora,block_lora", "adapter.n_blocks=2,4", "train.lr=1e-3,2e-4",
              "train.flip=false", "adapter.towers=vision|vision,text")
    # n_blocks does not apply to LoRA (the config refuses every value): its cells run without that axis
    assert "note: adapter.n_blocks does not apply to method lora" in capsys.readouterr().err
    folders = list(dict.fromkeys(c.folder for c in g.cells))
    assert folders == [f"method={m}{n},lr={lr},towers={t}" for m, n in (("lora", ""), ("block_lora", ",n_blocks=2"),
                                                                        ("block_lora", ",n_blocks=4"))
                       for lr in ("0.001", "0.0002") for t in ("vision", "vision+text")]
    assert len(g.cells) == 2 * len(folders) and [c.shots for c in g.cells[:12]] == [4] * 12  # longest first
    cell = next(c for c in g.cells if c.folder == "method=block_lora,n_blocks=2,lr=0.001,towers=vision+text")
    assert cell.run_dir(g.out) == g.out / cell.folder / "dtd" / "shots4" / "seed1"
    argv = cell_argv(cell, g.root, g.out, g.options, g.fixed, "start")
    assert argv[-5:] == ["train.flip=false", "adapter.method=block_lora", "adapter.n_blocks=2", "train.lr=1e-3",
                         "adapter.towers=vision,text"]  # the fixed overrides, then the cell's axis values
    args = build_parser().parse_args(["train", *argv[1:]])  # what the cell's train process builds
    from blocklora.cli.flags import run_config

    cfg = run_config(args)
    assert (cfg.adapter.method, cfg.adapter.n_blocks, cfg.train.lr, cfg.adapter.towers, cfg.train.flip) == \
        ("block_lora", 2, 1e-3, ("vision", "text"), False)
    assert g.axis_words == ["--methods", "lora,block_lora", "adapter.n_blocks=2,4", "train.lr=1e-3,2e-4",
                            "adapter.towers=vision|vision,text"]
    template = _plan(tmp_path, "train.template=a {}, in a photo.")  # free text: a comma is part of the value
    assert [c.folder for c in template.cells] == ["", ""] and template.fixed == ["train.template=a {}, in a photo."]


def test_a_method_runs_once_for_an_axis_it_does_not_read(tmp_path, capsys):
    """tip_adapter reads neither n_blocks nor lr (methods.registry.reads): one cell per dataset, shots and seed, not
    one per combination; the plan line counts 3 configurations; a fixed option it ignores is one warning line."""
    g = _plan(tmp_path, "--methods", "block_lora,tip_adapter", "adapter.n_blocks=2,4", "train.lr=1e-3,2e-4",
              "--alpha", "2")
    err = capsys.readouterr().err
    assert "note: method tip_adapter does not read adapter.n_blocks: its cells run once, without that axis" in err
    assert "note: method tip_adapter does not read train.lr" in err
    assert "warning: method tip_adapter does not read --alpha, --iters, --batch-size: ignored by those cells" \
        in err.splitlines()  # TINY gives --iters and --batch-size
    folders = list(dict.fromkeys(c.folder for c in g.cells))
    assert folders == [f"method=block_lora,n_blocks={n},lr={lr}" for n in (2, 4) for lr in ("0.001", "0.0002")] + \
        ["method=tip_adapter"]
    assert len(g.cells) == 2 * 5  # 5 configurations x 2 shot counts
    assert g.describe().startswith("10 cells: 5 configurations (method=block_lora,n_blocks=2,lr=0.001; ") and \
        g.describe().endswith("; method=tip_adapter) x 1 dataset x 2 shot counts x 1 seed")
    tip = next(c for c in g.cells if c.folder == "method=tip_adapter")
    assert cell_argv(tip, g.root, g.out, g.options, g.fixed, "start")[-1] == "adapter.method=tip_adapter"
    # LoRA (n_blocks 1) folds one chunk: sum and mean are one computation, so one LoRA configuration
    fold = _plan(tmp_path, "--methods", "lora,block_lora", "adapter.fold=sum,mean")
    assert list(dict.fromkeys(c.folder for c in fold.cells)) == ["method=lora", "method=block_lora,fold=sum",
                                                                 "method=block_lora,fold=mean"]


@pytest.mark.parametrize(("words", "message"), [
    (["train.lr=1e-3,0.001"], "train.lr=1e-3 and train.lr=0.001 give the same configuration"),
    (["--methods", "lora,block_lora", "adapter.n_blocks=1,4"],
     "the cells with adapter.method=lora adapter.n_blocks=4: method 'lora' means n_blocks=1"),
    (["--methods", "lora,nope"], "the cells with adapter.method=nope: unknown method 'nope'"),
    (["--method", "lora", "--methods", "lora,block_lora"], "adapter.method is both fixed (--method) and an axis"),
    (["--lr", "1e-3", "lr=1e-3,1e-2"], "train.lr is both fixed (--lr) and an axis"),
    (["data.shots=1,2"], "data.shots is set per cell by the sweep: give its values with --shots"),
    (["train.lr=1e-3,1e-3"], "an axis needs two or more distinct values"),
    (["lr=1,2", "train.lr=3,4"], "train.lr is given as an axis twice"),
    (["train.lr=1e-3,fast"], "the cells with train.lr=fast: bad value 'fast' for train.lr"),
    (["nope.key=1,2"], "unknown config key 'nope.key'"),
    (["--method", "tip_adapter", "adapter.n_blocks=2,4"],
     "adapter.n_blocks=2,4: no method of the sweep (tip_adapter) reads adapter.n_blocks: drop the axis"),
    (["--methods", "probe,tip_adapter", "train.lr=1e-3,2e-4"],
     "train.lr=1e-3,2e-4: no method of the sweep (probe, tip_adapter) reads train.lr"),
    (["--methods", "block_lora,lora", "baseline.n_ctx=4,8"],
     "no method of the sweep (block_lora, lora) reads baseline.n_ctx"),
])
def test_bad_axes_fail_before_anything_is_written(tmp_path, capsys, words, message):
    root = tmp_path / "data"
    make_zhou(root, "dtd")
    out = tmp_path / "sweep"
    assert main(["sweep", "--datasets", "dtd", "--shots", "1", "--seeds", "1", "--root", str(root), "--output",
                 str(out), "--devices", "cpu", *TINY, *words]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and len(err.splitlines()) == 1, err
    assert not out.exists()


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


RACER = textwrap.dedent("""
    import json, os, sys, time
    from pathlib import Path
    from blocklora.engine.rundir import RunDir  # imported before the race (cell_action reads run folders)
    from blocklora.grid.sweep import Cell, Slot, Sweep, _report
    out, fake, go = Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3])
    print("ready", flush=True)
    cells = [Cell(f"d{i}", 1, 1) for i in range(4)]
    def argv(cell, action, slot):
        flag = {"resume": ["--resume"], "overwrite": ["--overwrite"]}.get(action, [])
        return ["--dataset", cell.dataset, "--output", str(cell.run_dir(out)), *flag]
    while not go.exists():  # both processes start the sweep at the same moment
        time.sleep(0.001)
    sweep = Sweep(cells, [Slot("cpu 0")], out, argv, [sys.executable, fake], poll=0.05)
    outcomes = sweep.run()
    code = _report(outcomes, len(cells), out, 0.0, 0, sweep.errors)
    print(json.dumps({"code": code, "outcomes": [[o.cell.dataset, o.status, o.action] for o in outcomes]}))
""")


def test_two_sweep_processes_race_for_the_same_cells(tmp_path):
    """Two sweep processes on one folder: each cell trains once, and both end when the whole grid is finished
    (a cell the other holds is waited for, then found done), each with exit status 0."""
    (tmp_path / "fake_train.py").write_text(FAKE_TRAIN)
    (tmp_path / "racer.py").write_text(RACER)
    out, go = tmp_path / "sweep", tmp_path / "go"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "FAKE_SLEEP": "0.3"}
    procs = [subprocess.Popen([sys.executable, str(tmp_path / "racer.py"), str(out), str(tmp_path / "fake_train.py"),
                               str(go)], stdout=subprocess.PIPE, text=True, env=env) for _ in range(2)]
    assert [p.stdout.readline() for p in procs] == ["ready\n"] * 2
    go.touch()
    reports = [json.loads(p.communicate(timeout=120)[0].splitlines()[-1]) for p in procs]
    cells = [Cell(f"d{i}", 1, 1) for i in range(4)]
    assert all(_attempts(out, c) == ["start"] for c in cells)  # every cell trained exactly once
    for r in reports:
        assert r["code"] == 0 and sorted(d for d, _, _ in r["outcomes"]) == [c.dataset for c in cells]
        assert {status for _, status, _ in r["outcomes"]} <= {"done", "skipped"}
    done = sorted(d for r in reports for d, status, _ in r["outcomes"] if status == "done")
    assert done == [c.dataset for c in cells]  # each done by exactly one of them


CLAIMER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from blocklora.errors import BlockLoRAError
    from blocklora.grid.sweep import _claim_options
    out, go, lr = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
    print("ready", flush=True)
    while not go.exists():
        time.sleep(0.0005)
    try:  # both at once: the read of sweep.json finds nothing for either
        _claim_options(out, {"train_options": ["--lr", lr], "overrides": []})
        print("claimed")
    except BlockLoRAError as e:
        print("refused:", e)
""")


def test_two_sweeps_with_other_options_at_once_the_second_refuses(tmp_path):
    """sweep.json is created exclusively: of two sweeps started at once with other options, one records its own and
    the other refuses naming them, whatever the timing (two rounds)."""
    (tmp_path / "claim.py").write_text(CLAIMER)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    for round_ in range(2):
        out, go = tmp_path / f"sweep{round_}", tmp_path / f"go{round_}"
        out.mkdir()
        procs = [subprocess.Popen([sys.executable, str(tmp_path / "claim.py"), str(out), str(go), lr],
                                  stdout=subprocess.PIPE, text=True, env=env) for lr in ("0.1", "0.2")]
        assert [p.stdout.readline() for p in procs] == ["ready\n"] * 2
        go.touch()
        said = [p.communicate(timeout=60)[0].strip() for p in procs]
        winner = json.loads((out / "sweep.json").read_text())["train_options"][1]
        assert sorted(x.split(":")[0] for x in said) == ["claimed", "refused"], said
        loser = next(x for x in said if x.startswith("refused"))
        assert f"was swept by blocklora sweep (pid {procs[0 if winner == '0.1' else 1].pid} on " in loser
        assert f"with other train options (--lr {winner} vs --lr" in loser
        assert [p.name for p in out.iterdir()] == ["sweep.json"]  # no temporary file left behind


@pytest.mark.parametrize("kind", ["folder", "fifo", "link"])
def test_a_manifest_that_cannot_be_written_runs_nothing(tmp_path, capsys, kind):
    root = tmp_path / "data"
    make_zhou(root, "dtd")
    out = tmp_path / "sweep"
    out.mkdir()
    manifest = out / "sweep.jsonl"
    if kind == "folder":
        manifest.mkdir()
    elif kind == "fifo":
        os.mkfifo(manifest)  # would block an open() for writing: never a hang
    else:
        (tmp_path / "elsewhere.txt").write_text("keep\n")
        manifest.symlink_to(tmp_path / "elsewhere.txt")
    assert main(["sweep", "--datasets", "dtd", "--shots", "1", "--seeds", "1,2", "--root", str(root), "--output",
                 str(out), "--devices", "cpu", *TINY]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: cannot write the sweep's manifest {manifest}") and "nothing was run" in err
    assert len(err.splitlines()) == 1
    assert sorted(p.name for p in out.iterdir()) == ["sweep.jsonl"]  # no cell, no sweep.json
    if kind == "link":
        assert (tmp_path / "elsewhere.txt").read_text() == "keep\n"


def test_a_manifest_failing_mid_sweep_stops_it_and_exits_non_zero(tmp_path, fake, capsys):
    """The manifest's disk fills after the first cell (/dev/full: every write is ENOSPC): the sweep stops with one
    error line naming it, starts no other cell, and does not claim success. No worker thread dies silently."""
    from blocklora.grid.sweep import _report

    out = tmp_path / "sweep"
    cells = [Cell(f"d{i}", 1, 1) for i in range(3)]
    with open("/dev/full", "ab", buffering=0) as full:
        sweep = fake(out, cells)
        sweep.manifest = full
        outcomes = sweep.run()
    assert [o.status for o in outcomes] == ["done"] and len(sweep.errors) == 1
    assert _report(outcomes, 3, out, 1.0, 0, sweep.errors) == 1
    captured = capsys.readouterr()
    assert "1 done, 2 not started" in captured.out
    assert captured.err == "error: the sweep stopped: d0 shots1 seed1: No space left on device; 2 cell(s) not " \
                           "started (fix it and rerun the same command to continue)\n"
    assert _attempts(out, cells[1]) == [] and _attempts(out, cells[2]) == []


# -- the real thing --------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_sweep_of_two_methods_and_an_n_axis_then_rerun_skips_then_summarize(tmp_path, capsys):
    root = tmp_path / "data"
    make_zhou(root, "dtd")
    out = tmp_path / "sweep"
    args = ["sweep", "--datasets", "dtd", "--shots", "1", "--seeds", "1", "--root", str(root), "--output", str(out),
            "--devices", "cpu:2", *TINY, "--methods", "lora,block_lora", "adapter.n_blocks=2,4"]
    assert main(args) == 0
    captured = capsys.readouterr()
    assert "3 cells: 3 done" in captured.out and "adapter.n_blocks does not apply to method lora" in captured.err
    for folder, method, n in (("method=lora", "lora", 1), ("method=block_lora,n_blocks=2", "block_lora", 2),
                              ("method=block_lora,n_blocks=4", "block_lora", 4)):
        r = json.loads((out / folder / "dtd" / "shots1" / "seed1" / "results.json").read_text())
        assert (r["shots"], r["seed"], r["iters"], r["device"]) == (1, 1, 4, "cpu")
        assert (r["config"]["adapter"]["method"], r["config"]["adapter"]["n_blocks"]) == (method, n)
    manifest = [json.loads(line) for line in (out / "sweep.jsonl").read_text().splitlines()]
    assert sorted(m["axes"].get("adapter.n_blocks", "-") for m in manifest) == ["-", "2", "4"]
    assert main(args) == 0
    assert "3 cells: 3 skipped" in capsys.readouterr().out
    assert main([*args, "train.lr=1e-3"]) == 2  # other fixed options into the same directory: refused
    assert "with other train options (--model tiny-clip" in capsys.readouterr().err
    assert main(["summarize", str(out)]) == 0
    md = capsys.readouterr().out
    assert "3 runs of 3 configurations" in md
    rows = [line.split(" | ")[0].strip("| ") for line in md.split("## 1 shot")[1].split("###")[0].splitlines()
            if line.startswith("| ") and "---" not in line]
    assert rows == ["method", "lora", "block_lora n_blocks=2", "block_lora n_blocks=4"]
    assert "### 1 shot: block_lora n_blocks=2 minus each row" in md  # the first Block-LoRA row of equal run counts
    assert (out / "summary.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_slurm_array_cells_run_locally_then_resubmission_does_nothing(tmp_path, capsys):
    """--emit slurm: every array task of the script, run here with its SLURM_ARRAY_TASK_ID, trains one cell;
    summarize sees the full grid; running the array again changes nothing."""
    root = tmp_path / "data"
    make_zhou(root, "dtd")
    out = tmp_path / "sweep"
    grid = ["sweep", "--datasets", "dtd", "--shots", "1,2", "--seeds", "1", "--root", str(root), "--output",
            str(out), *TINY]
    assert main([*grid, "--emit", "slurm", "--slurm-gpus", "0", "--slurm-partition", "short",
                 "--slurm-max-parallel", "2"]) == 0
    script = out / "sweep.slurm"
    assert str(script) in capsys.readouterr().out
    text = script.read_text()
    assert "#SBATCH --array=0-1%2" in text and "#SBATCH --partition=short" in text and "--gpus" not in text
    assert '--cell "$SLURM_ARRAY_TASK_ID"' in text and "#   1: dtd shots1 seed1" in text
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    for k in range(2):
        subprocess.run(["bash", str(script)], env={**env, "SLURM_ARRAY_TASK_ID": str(k)}, check=True,
                       capture_output=True)
    results = sorted(out.glob("dtd/shots*/seed*/results.json"))
    assert len(results) == 2
    stamps = [p.stat().st_mtime_ns for p in results]
    assert main(["summarize", str(out)]) == 0
    md = (out / "summary.md").read_text()
    assert "| dtd |" in md and "1 shot" in md and "2 shots" in md
    for k in range(2):  # the second submission
        done = subprocess.run(["bash", str(script)], env={**env, "SLURM_ARRAY_TASK_ID": str(k)}, check=True,
                              capture_output=True, text=True)
        assert "1 cell: 1 skipped" in done.stdout
    assert [p.stat().st_mtime_ns for p in results] == stamps
    manifest = [json.loads(x) for x in (out / "sweep.jsonl").read_text().splitlines()]
    assert [m["status"] for m in manifest] == ["done"] * 2 + ["skipped"] * 2
    assert main([*grid, "--cell", "2"]) == 2
    assert "cells 0..1" in capsys.readouterr().err
