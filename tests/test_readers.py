"""Every file blocklora reads goes through one validating reader (blocklora/reading.py; docs/reliability.md):
regular files only (a FIFO never blocks a command), JSON / TOML nesting bounded, each record's fields checked, and
each file cross-checked against what lies beside it: a split file against the dataset's own splits and its header,
a zero-shot cache entry against the test items, a checkpoint against the run's adapters, schedule and activation,
an adapter's run record against itself. What fails is one error naming the file; a cache entry that fails is a miss.

FIFO tests run under `no_hang`: a regression fails the test after a timeout instead of hanging the suite.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

import blocklora.pipeline.run as api
from blocklora import reading
from blocklora.adapters.io import CONFIG_FILE, WEIGHTS_FILE, load_adapter, read_adapter_meta
from blocklora.checks import num, one_of, text
from blocklora.cli.main import main
from blocklora.config.run_config import RunConfig
from blocklora.data import load_dataset, read_split_file, read_split_header, sample_few_shot, write_split_file
from blocklora.data.fashion_mnist import read_idx
from blocklora.data.fewshot import file_sha256
from blocklora.data.types import Item
from blocklora.engine import evaluate as ev
from blocklora.engine.checkpoint import truncate_metrics
from blocklora.engine.files import load_torch
from blocklora.engine.rundir import RunDir
from blocklora.errors import AdapterMismatchError, BlockLoRAError, ConfigError, DataError
from blocklora.grid.sweep import _read_options
from blocklora.ownership import MARKER, marker_kind
from blocklora.pipeline.trained import run_meta
from conftest import make_openclip
from gen_data import make_folder_dataset
from test_fault_matrix import refused, snapshot, train_args

DEEP = 100_000  # nesting levels: far past Python's recursion limit


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_folder_dataset(tmp_path_factory.mktemp("readers") / "d", n_classes=3, train_per_class=4,
                               test_per_class=2, val_per_class=2)


@pytest.fixture(scope="module")
def run(data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("run") / "run"
    assert main([str(a) for a in train_args(data, out)]) == 0
    return out


@pytest.fixture(scope="module")
def stopped(data, tmp_path_factory) -> tuple[Path, list[str]]:
    """A run stopped right after its first checkpoint (as a kill would), through the seam api.run writes it by."""
    out = tmp_path_factory.mktemp("stopped") / "run"
    argv = [str(a) for a in train_args(data, out, "--iters", "12", "--checkpoint-every", "4")]
    real = api.save_torch

    def save_then_stop(path, obj):
        real(path, obj)
        raise KeyboardInterrupt

    api.save_torch = save_then_stop
    try:
        assert main(argv) == 130
    finally:
        api.save_torch = real
    assert (out / "checkpoint.pt").exists() and not (out / "results.json").exists()
    return out, argv


def copy_run(stopped, tmp_path) -> tuple[Path, list[str]]:
    out, argv = stopped
    mine = tmp_path / "run"
    shutil.copytree(out, mine)
    return mine, [str(mine) if a == str(out) else a for a in argv]


@contextlib.contextmanager
def no_hang(fifo: Path, seconds: float = 30.0) -> Iterator[None]:
    """Fail instead of hanging when the code inside blocks on `fifo`: after `seconds` a watchdog opens the FIFO's
    other ends (a reader blocked in open() waits for a writer, a writer for a reader), which releases it."""
    done, hung = threading.Event(), threading.Event()

    def watch() -> None:
        while not done.wait(seconds):
            hung.set()
            fds = []
            for flags in (os.O_RDONLY | os.O_NONBLOCK, os.O_WRONLY | os.O_NONBLOCK):
                with contextlib.suppress(OSError):
                    fds.append(os.open(fifo, flags))
            time.sleep(0.2)
            for fd in fds:
                os.close(fd)

    watchdog = threading.Thread(target=watch, daemon=True)
    watchdog.start()
    try:
        yield
    finally:
        done.set()
        watchdog.join()
        assert not hung.is_set(), f"blocked on the FIFO {fifo} (released after {seconds} s)"


def fifo_at(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists() or path.is_symlink():
        path.unlink()
    os.mkfifo(path)
    return path


def deep_json() -> str:
    return '{"a": ' * DEEP + "1" + "}" * DEEP


# -- the shared reader: regular files only, nesting bounded ----------------------------------------------------------
def _special(kind: str, tmp_path: Path) -> Path:
    path = tmp_path / f"x.{kind}"
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "socket":
        sock = socket.socket(socket.AF_UNIX)
        sock.bind(str(path))
        sock.close()
    elif kind == "folder":
        path.mkdir()
    else:
        return Path("/dev/zero")  # a character device that never ends
    return path


LOW_LEVEL: dict[str, Callable[[Path], object]] = {
    "read_bytes": reading.read_bytes, "read_text": reading.read_text, "open_text": lambda p: reading.open_text(p),
    "file_sha256": file_sha256,
}
CHECKED: dict[str, Callable[[Path], object]] = {
    "read_json": lambda p: reading.read_json(p, "x"), "read_toml": lambda p: reading.read_toml(p, "x"),
    "load_torch": load_torch,
}


@pytest.mark.parametrize("kind", ["fifo", "socket", "folder", "device"])
@pytest.mark.parametrize("reader", [*LOW_LEVEL, *CHECKED])
def test_only_regular_files_are_read(tmp_path, kind, reader):
    path = _special(kind, tmp_path)
    named = {"fifo": "FIFO", "socket": "socket", "folder": "folder", "device": "character device"}[kind]
    with no_hang(path, 10):
        if reader in LOW_LEVEL:
            with pytest.raises(reading.NotRegularFile, match=f"not a regular file: it is a.* {named}"):
                LOW_LEVEL[reader](path)
        else:
            with pytest.raises(BlockLoRAError, match=f"{path}.*not a regular file: it is a.* {named}"):
                CHECKED[reader](path)


def test_regular_files_and_links_to_them_read(tmp_path):
    (tmp_path / "a.json").write_text('{"a": [1, 2]}')
    os.symlink(tmp_path / "a.json", tmp_path / "b.json")
    assert reading.read_json(tmp_path / "b.json", "x") == {"a": [1, 2]}
    (tmp_path / "c.toml").write_text("[train]\nlr = 1e-4\n")
    assert reading.read_toml(tmp_path / "c.toml", "x") == {"train": {"lr": 1e-4}}
    with reading.open_text(tmp_path / "a.json") as fh:
        assert fh.read() == '{"a": [1, 2]}'


@pytest.mark.parametrize(("text", "deep"), [
    ("[" * (reading.MAX_DEPTH + 1) + "]" * (reading.MAX_DEPTH + 1), True),
    ("[" * reading.MAX_DEPTH + "]" * reading.MAX_DEPTH, False),
    ('{"a": ' * (reading.MAX_DEPTH + 1) + "1" + "}" * (reading.MAX_DEPTH + 1), True),
    (deep_json(), True), ("[" * DEEP + "]" * DEEP, True),
])
def test_json_nesting_is_bounded(text, deep):
    if deep:
        with pytest.raises(reading.TooDeep, match="nested"):
            reading.loads(text)
    else:
        assert reading.depth(reading.loads(text)) == reading.MAX_DEPTH


@pytest.mark.parametrize("levels", [reading.MAX_DEPTH + 1, DEEP])
def test_toml_nesting_is_bounded(levels):
    with pytest.raises(reading.TooDeep):
        reading.loads_toml("x = " + "[" * levels + "]" * levels)


def test_depth_counts_containers():
    assert [reading.depth(v) for v in (1, [], {"a": [1]}, [[[]], 2], {"a": {"b": {}}})] == [0, 1, 2, 3, 3]


@pytest.mark.parametrize(("content", "needle"), [
    (b"\xff\xfe{}", "not UTF-8 text"), (b'{"a": 1,\n "b": }', "not valid JSON (line 2, column"),
    (deep_json().encode(), "nested deeper"), (None, "no such file"),
])
def test_one_error_names_the_file_and_why(tmp_path, content, needle):
    path = tmp_path / "f.json"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(DataError) as e:
        reading.read_json(path, "split file", DataError, "get it again")
    message = str(e.value)
    assert message.startswith(f"cannot read split file {path} (") and needle in message
    assert message.endswith(": get it again") and "\n" not in message


# -- fields: a record's fields checked by checks.py's rules -----------------------------------------------------------
RULES = {"step": num(0, 40, integer=True), "loss": one_of("softmax", "sigmoid"), "name": text(empty=False),
         "names": reading.listof(text(), lo=2), "state": reading.mapping, "bias": num(-5, 5, optional=True)}
GOOD = {"step": 4, "loss": "softmax", "name": "x", "names": ["a", "b"], "state": {}, "bias": None}


@pytest.mark.parametrize(("key", "value", "needle"), [
    ("step", "4", "r.step must be an integer"), ("step", True, "r.step"), ("step", 4.5, "r.step"),
    ("step", 41, "<= 40"), ("step", -1, ">= 0"), ("step", None, "r.step"), ("loss", "xyz", "unknown loss 'xyz'"),
    ("loss", 5, "unknown loss"), ("name", "", "non-empty string"), ("name", ["x"], "r.name"),
    ("names", ["a"], "at least 2 items"), ("names", "ab", "must be a list"), ("names", ["a", 2], r"r.names\[1\]"),
    ("state", [], "r.state must be a JSON object"), ("bias", math.nan, "r.bias"), ("bias", 1e308, "<= 5"),
    ("bias", "abc", "r.bias"),
])
def test_fields_refuse_damaged_values_of_every_type(key, value, needle):
    with pytest.raises(ConfigError, match=needle):
        reading.fields({**GOOD, key: value}, RULES, "r")


def test_fields_require_keys_and_check_defaults():
    assert reading.fields(GOOD, RULES, "r") == GOOD
    assert reading.fields({**GOOD, "extra": 1}, RULES, "r") == GOOD  # other keys are not the rules' business
    with pytest.raises(ConfigError, match="r has no 'step'"):
        reading.fields({k: v for k, v in GOOD.items() if k != "step"}, RULES, "r")
    assert reading.fields({k: v for k, v in GOOD.items() if k != "bias"}, RULES, "r", {"bias": 1})["bias"] == 1
    with pytest.raises(ConfigError, match="r must be a JSON object"):
        reading.fields([GOOD], RULES, "r")
    with pytest.raises(AdapterMismatchError, match=r"^/x/f.json: unknown loss .*; the file is damaged$"), \
            reading.damaged("/x/f.json", AdapterMismatchError):
        reading.fields({**GOOD, "loss": "xyz"}, RULES, "r")


# -- every reader: a FIFO is refused, never waited on; deep nesting is one error ------------------------------------
def _reader_cases(data: Path, run: Path, stopped: tuple[Path, list[str]], tmp: Path) -> dict[str, tuple]:
    """reader -> (the file it reads, a call reading it, the error expected or None for a cache miss)."""
    out, _ = stopped
    runs = tmp / "run"
    shutil.copytree(out, runs)
    adapter = tmp / "adapter"
    shutil.copytree(run / "adapter", adapter)
    sweep = tmp / "sweep"
    sweep.mkdir()
    cache_key = "0" * 24
    ds = load_dataset("folder", data)
    return {
        "--config (JSON)": (tmp / "c.json", lambda p: RunConfig.from_file(p), ConfigError),
        "--config (TOML)": (tmp / "c.toml", lambda p: RunConfig.from_file(p), ConfigError),
        "--split-file": (tmp / "s.json", read_split_header, DataError),
        "CSV dataset": (tmp / "d.csv", lambda p: load_dataset("csv", p), DataError),
        "run config.json": (runs / "config.json", lambda p: RunDir(runs).read_config(), BlockLoRAError),
        "run results.json": (runs / "results.json", lambda p: RunDir(runs).read_results(), BlockLoRAError),
        "metrics.jsonl": (runs / "metrics.jsonl", lambda p: truncate_metrics(p, 4), BlockLoRAError),
        "checkpoint.pt": (runs / "checkpoint.pt", load_torch, BlockLoRAError),
        "run lock": (runs / ".lock", lambda p: RunDir(runs).lock().__enter__(), BlockLoRAError),
        "adapter config": (adapter / CONFIG_FILE, lambda p: read_adapter_meta(adapter), AdapterMismatchError),
        "adapter weights": (adapter / WEIGHTS_FILE, lambda p: load_adapter(make_openclip(), adapter),
                            AdapterMismatchError),
        "sweep options": (sweep / "sweep.json", lambda p: _read_options(sweep), BlockLoRAError),
        "idx file": (tmp / "train-images-idx3-ubyte.gz", read_idx, DataError),
        "zero-shot cache entry": (ev.cache_dir() / "zeroshot" / f"{cache_key}.json",
                                  lambda p: ev.read_cached(cache_key, ds.test, ds.classnames), None),
    }


READERS = ["--config (JSON)", "--config (TOML)", "--split-file", "CSV dataset", "run config.json", "run results.json",
           "metrics.jsonl", "checkpoint.pt", "run lock", "adapter config", "adapter weights", "sweep options",
           "idx file", "zero-shot cache entry"]


@pytest.mark.parametrize("reader", READERS)
def test_a_fifo_is_refused_by_every_reader(monkeypatch, data, run, stopped, tmp_path, reader):
    monkeypatch.setenv("BLOCKLORA_CACHE", str(tmp_path / "cache"))
    path, call, error = _reader_cases(data, run, stopped, tmp_path)[reader]
    fifo_at(path)
    with no_hang(path):
        if error is None:  # a cache: a miss
            assert call(path) is None
        else:
            with pytest.raises(error, match="is a FIFO"):
                call(path)


DEEP_READERS = ["--config (JSON)", "--config (TOML)", "--split-file", "run config.json", "run results.json",
                "adapter config", "sweep options", "zero-shot cache entry"]


@pytest.mark.parametrize("reader", DEEP_READERS)
def test_deep_nesting_is_one_error_in_every_json_reader(monkeypatch, data, run, stopped, tmp_path, reader):
    monkeypatch.setenv("BLOCKLORA_CACHE", str(tmp_path / "cache"))
    path, call, error = _reader_cases(data, run, stopped, tmp_path)[reader]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("x = " + "[" * DEEP + "]" * DEEP if path.suffix == ".toml" else deep_json())
    if error is None:
        assert call(path) is None
    else:
        with pytest.raises(error, match="nested"):
            call(path)


def test_deep_lines_and_markers_are_damaged_lines_and_no_marker(stopped, tmp_path):
    out, _ = copy_run(stopped, tmp_path)
    lines = (out / "metrics.jsonl").read_text().splitlines()
    (out / "metrics.jsonl").write_text("\n".join([lines[0], deep_json(), *lines[1:]]) + "\n")
    truncate_metrics(out / "metrics.jsonl", 4)  # a damaged line ends what is kept, as a line cut by a kill does
    assert (out / "metrics.jsonl").read_text().splitlines() == lines[:1]
    (out / MARKER).write_text(deep_json())
    assert marker_kind(out) is None


def test_the_cli_refuses_a_fifo_config_and_lock_on_one_line(capsys, data, stopped, tmp_path):
    config = fifo_at(tmp_path / "c.json")
    with no_hang(config, 120):
        refused(capsys, train_args(data, tmp_path / "new", "--config", config), str(config), "FIFO")
    assert not (tmp_path / "new").exists()
    out, argv = copy_run(stopped, tmp_path)
    lock = fifo_at(out / ".lock")
    before = snapshot(out)
    with no_hang(lock, 120):
        refused(capsys, [*argv, "--resume"], str(lock), "FIFO", "move it away")
    assert snapshot(out) == before


# -- split files: against the dataset's own splits and their header -------------------------------------------------
@pytest.fixture(scope="module")
def split(data, tmp_path_factory) -> tuple[dict, Path]:
    ds = load_dataset("folder", data)
    path = tmp_path_factory.mktemp("split") / "split.json"
    write_split_file(path, ds, sample_few_shot(ds, 2, 1))
    return json.loads(path.read_text()), data


def _entries(data: Path, part: str, per_class: int) -> list[list]:
    names = sorted(p.name for p in (data / "train").iterdir())
    return [[f"{part}/{c}/{i:03d}.png", k] for k, c in enumerate(names) for i in range(per_class)]


SPLIT_DAMAGE = {
    "test images as train": (lambda s, d: s.update(train=_entries(d, "test", 2)), "dataset's test split"),
    "val images as train": (lambda s, d: s.update(train=_entries(d, "val", 2)), "dataset's val split, not of its "
                                                                                "train"),
    "test images as val": (lambda s, d: s.update(val=_entries(d, "test", 2)), "leaks them"),
    "a class missing": (lambda s, d: s.update(train=[e for e in s["train"] if e[1] != 2]), "no training entry for"),
    "more entries than shots": (lambda s, d: s.update(train=_entries(d, "train", 4)), 'but its "shots" is 2'),
    "fewer entries than shots": (lambda s, d: s.update(shots=3), 'but its "shots" is 3'),
    "a repeat without replace": (lambda s, d: s.update(replace=False, train=[[*s["train"][0]], *s["train"][:1],
                                                                              *s["train"][2:]]),
                                 'repeats a training image of .* but its "replace" is false'),
}


@pytest.mark.parametrize("damage", SPLIT_DAMAGE)
def test_split_files_are_checked_against_the_dataset_and_their_header(split, tmp_path, damage):
    good, data = split
    ds = load_dataset("folder", data)
    edit, needle = SPLIT_DAMAGE[damage]
    damaged = json.loads(json.dumps(good))
    edit(damaged, data)
    path = tmp_path / "split.json"
    path.write_text(json.dumps(damaged))
    with pytest.raises(DataError, match=needle) as e:
        read_split_file(path, ds)
    assert str(path) in str(e.value) and "\n" not in str(e.value)


def test_a_hand_made_entry_linking_to_a_test_image_is_refused(split, tmp_path):
    good, data = split
    ds = load_dataset("folder", data)
    os.symlink(data / "test" / "red_apple" / "000.png", tmp_path / "mine.png")  # outside the dataset's lists
    shutil.copy(data / "train" / "red_apple" / "001.png", tmp_path / "real.png")
    label = ds.classnames.index("red apple")
    first = next(i for i, e in enumerate(good["train"]) if e[1] == label)
    for name, ok in (("real.png", True), ("mine.png", False)):
        edited = json.loads(json.dumps(good))
        edited["train"][first] = [str(tmp_path / name), label]
        (tmp_path / "s.json").write_text(json.dumps(edited))
        if ok:
            assert Item(str(tmp_path / name), label) in read_split_file(tmp_path / "s.json", ds)[0].train
        else:
            with pytest.raises(DataError, match="an image of the dataset's test split, not of its train .*leaks"):
                read_split_file(tmp_path / "s.json", ds)


def test_published_splits_train_only_on_training_images_of_every_class(split, tmp_path):
    _, data = split
    ds = load_dataset("folder", data)
    path = tmp_path / "shot_2-seed_1.jsonl"
    rows = [{"impath": p, "label": y} for p, y in _entries(data, "train", 2)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert len(read_split_file(path, ds)[0].train) == 6
    path.write_text("".join(json.dumps(r) + "\n" for r in [*rows[1:], {"impath": "test/red_apple/000.png",
                                                                       "label": rows[0]["label"]}]))
    with pytest.raises(DataError, match="a training entry, but an image of the dataset's test split"):
        read_split_file(path, ds)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows if r["label"] != 1))
    with pytest.raises(DataError, match="lists no training image of class 1"):
        read_split_file(path, ds)


def test_a_run_on_a_leaking_split_file_writes_nothing(capsys, split, tmp_path):
    good, data = split
    path = tmp_path / "split.json"
    path.write_text(json.dumps({**good, "train": _entries(data, "test", 2)}))
    out = tmp_path / "run"
    refused(capsys, train_args(data, out, "--split-file", path), str(path), "test split")
    assert not out.exists()


# -- the zero-shot cache: an entry is the accuracy of these test items, or a miss ------------------------------------
ITEMS = [Item(f"/d/test/{c}/{i}.png", k) for k, c in enumerate("abc") for i in range(3)]
NAMES = ["a", "b", "c"]


def _entry(correct=(3, 1, 0), total=(3, 3, 3), unreadable=()) -> dict:
    return {**ev.summarize(torch.tensor(correct), torch.tensor(total), NAMES),
            "unreadable": [list(u) for u in unreadable]}


CACHE_DAMAGE = {
    "a list": lambda e: [1, 2], "top1 text": lambda e: {**e, "top1": "abc"},
    "a number nobody measured": lambda e: {**e, "top1": 99.9, "mean_per_class": 99.9},
    "per_class emptied": lambda e: {**e, "per_class": []},
    "a class count off": lambda e: {**e, "per_class": [{**e["per_class"][0], "n": 4}, *e["per_class"][1:]]},
    "a class top1 not k/n": lambda e: {**e, "per_class": [{**e["per_class"][0], "top1": 50.0},
                                                          *e["per_class"][1:]]},
    "a class renamed": lambda e: {**e, "per_class": [{**e["per_class"][0], "class": "z"}, *e["per_class"][1:]]},
    "top1 over 100": lambda e: {**e, "top1": 400.0}, "top1 NaN": lambda e: {**e, "top1": math.nan},
    "n a bool": lambda e: {**e, "n": True}, "n beyond the items": lambda e: {**e, "n": 10},
    "an extra field": lambda e: {**e, "cached": True},
    "unreadable not evaluated": lambda e: {**e, "unreadable": [["/elsewhere.png", "bad"]]},
    "unreadable not pairs": lambda e: {**e, "unreadable": ["/d/test/a/0.png"]},
}


@pytest.mark.parametrize("damage", CACHE_DAMAGE)
def test_damaged_zero_shot_cache_entries_fail_the_check(damage):
    with pytest.raises(ConfigError):
        ev.check_cached(CACHE_DAMAGE[damage](_entry()), ITEMS, NAMES)


def test_measured_entries_pass_the_check():
    assert ev.check_cached(_entry(), ITEMS, NAMES) == _entry()
    skipped = _entry((2, 1, 0), (2, 3, 3), [("/d/test/a/2.png", "truncated")])
    assert ev.check_cached(json.loads(json.dumps(skipped)), ITEMS, NAMES)["unreadable"] == [("/d/test/a/2.png",
                                                                                              "truncated")]


def test_a_damaged_cache_entry_is_measured_again_and_replaced(monkeypatch, caplog, data, tmp_path):
    monkeypatch.setenv("BLOCKLORA_CACHE", str(tmp_path))
    kwargs = dict(model="tiny-clip", pretrained=None, dataset="folder", root=str(data), workers=0)
    first = api.evaluate_zero_shot(**kwargs)
    (entry,) = (tmp_path / "zeroshot").glob("*.json")
    good = json.loads(entry.read_text())
    assert api.evaluate_zero_shot(**kwargs)["cached"]  # the measured entry is a hit
    entry.write_text(json.dumps({**good, "top1": 99.9, "mean_per_class": 99.9}))
    again = api.evaluate_zero_shot(**kwargs)
    assert not again["cached"] and again["top1"] == first["top1"] != 99.9
    assert "ignoring the zero-shot cache entry" in caplog.text and "a number nobody measured" in caplog.text
    assert json.loads(entry.read_text()) == good


# -- checkpoints: against the run's adapters, schedule, step budget and activation -----------------------------------
# (a genuine checkpoint resumes to the end: tests/test_fault_runs.py and tests/test_faults.py, exactly)
def _edit_state(name: str) -> Callable[[dict], None]:
    def first(s: dict) -> str:
        return next(iter(s["adapter"]))

    edits = {
        "step beyond the run": lambda s: s.update(step=10**6),
        "step negative": lambda s: s.update(step=-3),
        "step a float": lambda s: s.update(step=4.5),
        "step a tensor": lambda s: s.update(step=torch.tensor(4)),
        "skipped beyond the step": lambda s: s.update(skipped=5),
        "no adapter tensors": lambda s: s.update(adapter={}),
        "some adapter tensors": lambda s: s.update(adapter=dict(list(s["adapter"].items())[:3])),
        "an unexpected tensor": lambda s: s["adapter"].update(extra=torch.zeros(1)),
        "a tensor of another shape": lambda s: s["adapter"].update({first(s): torch.zeros(3, 3)}),
        "an integer tensor": lambda s: s["adapter"].update({first(s): s["adapter"][first(s)].long()}),
        "a NaN tensor": lambda s: s["adapter"][first(s)].fill_(math.nan),
        "the schedule at another step": lambda s: s["scheduler"].update(last_epoch=3),
        "another learning rate": lambda s: s["optimizer"]["param_groups"][0].update(lr=1.0),
        "other betas": lambda s: s["optimizer"]["param_groups"][0].update(betas=(0.5, 0.5)),
        "a moment of another shape": lambda s: s["optimizer"]["state"][0].update(exp_avg=torch.zeros(2)),
        "more optimizer steps than steps": lambda s: s["optimizer"]["state"][0].update(step=torch.tensor(99.0)),
        "another activation": lambda s: s.update(activation="quick_gelu"),
        "no torch RNG": lambda s: s["rng"].pop("torch"),
    }
    return edits[name]


CHECKPOINT_DAMAGE = {
    "step beyond the run": "checkpoint.step must be an integer >= 0 and <= 12, got 1000000",
    "step negative": "checkpoint.step", "step a float": "checkpoint.step", "step a tensor": "checkpoint.step",
    "skipped beyond the step": "checkpoint.skipped", "no adapter tensors": "checkpoint.adapter lacks",
    "some adapter tensors": "adapter tensors missing", "an unexpected tensor": "has 'extra'",
    "a tensor of another shape": "of shape (3, 3)", "an integer tensor": "torch.int64",
    "a NaN tensor": "NaN or infinite", "the schedule at another step": "last_epoch is 3",
    "another learning rate": "lr is 1.0", "other betas": "betas is (0.5, 0.5)",
    "a moment of another shape": "exp_avg has shape (2,)", "more optimizer steps than steps": "step is 99",
    "another activation": "MLP activation 'quick_gelu'", "no torch RNG": "checkpoint.rng has no 'torch'",
}


@pytest.mark.parametrize("damage", CHECKPOINT_DAMAGE)
def test_damaged_checkpoints_are_refused_on_resume(capsys, stopped, tmp_path, damage):
    out, argv = copy_run(stopped, tmp_path)
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    _edit_state(damage)(state)
    torch.save(state, out / "checkpoint.pt")
    before = snapshot(out)
    refused(capsys, [*argv, "--resume"], str(out / "checkpoint.pt"), CHECKPOINT_DAMAGE[damage], "--overwrite")
    after = snapshot(out)
    for lock in (before, after):  # the lock file records its last holder (pid, command, start): it changes
        lock.pop(".lock")
    assert after.pop("train.log").startswith(before.pop("train.log")) and after == before  # the log tells of it


@pytest.mark.parametrize(("value", "needle"), [
    ("xyz", "config.json.quick_gelu must be true or false, got 'xyz'"), (1, "quick_gelu must be true or false"),
    (True, "MLP activation 'gelu', this run builds 'quick_gelu'"),
    ("asked yes", "records quick_gelu=False but its config asked quick_gelu=yes"),
])
def test_the_recorded_activation_is_checked_on_resume(capsys, stopped, tmp_path, value, needle):
    out, argv = copy_run(stopped, tmp_path)
    config = json.loads((out / "config.json").read_text())
    if value == "asked yes":
        config["config"]["quick_gelu"] = "yes"
    else:
        config["quick_gelu"] = value
    (out / "config.json").write_text(json.dumps(config))
    refused(capsys, [*argv, "--resume"], needle)


# -- an adapter's run record ----------------------------------------------------------------------------------------
RUN_DAMAGE = {
    "loss unknown": ({"loss": "xyz"}, "unknown loss 'xyz'"), "loss a number": ({"loss": 5}, "run.loss"),
    "sigmoid without a bias": ({"loss": "sigmoid"}, "|bias| < run.logit_scale"),
    "sigmoid bias beyond the scale": ({"loss": "sigmoid", "logit_bias": 1e308}, "run.logit_bias"),
    "sigmoid bias at the scale": ({"loss": "sigmoid", "logit_bias": -100.0}, "|bias| < run.logit_scale (100)"),
    "bias text": ({"loss": "sigmoid", "logit_bias": "abc"}, "run.logit_bias must be a finite number"),
    "bias NaN": ({"logit_bias": math.nan}, "run.logit_bias"),
    "softmax with a bias": ({"logit_bias": -10.0}, "run.loss is softmax, which has no bias"),
    "class names not text": ({"classnames": [1, 2]}, r"run.classnames\[0\]"),
    "class names a string": ({"classnames": "ab"}, "run.classnames must be a list"),
    "frozen dtype unknown": ({"frozen_dtype": "fp8"}, "run.frozen_dtype"),
    "tokenizer a number": ({"tokenizer": 5}, "run.tokenizer"),
    "pretrained a list": ({"pretrained": ["x"]}, "run.pretrained"),
    "quick_gelu a bool": ({"quick_gelu": True}, "run.quick_gelu"),
    "split hash a number": ({"split_sha256": 5}, "run.split_sha256"),
}


@pytest.mark.parametrize("damage", RUN_DAMAGE)
def test_every_run_record_field_is_checked(run, damage):
    meta = read_adapter_meta(run / "adapter")
    edit, needle = RUN_DAMAGE[damage]
    with pytest.raises(AdapterMismatchError, match=needle) as e:
        run_meta({**meta, "run": {**meta["run"], **edit}}, run / "adapter")
    assert str(run / "adapter" / CONFIG_FILE) in str(e.value) and "the file is damaged" in str(e.value)


def test_run_records_take_defaults(run):
    meta = read_adapter_meta(run / "adapter")
    older = {k: v for k, v in meta["run"].items() if k in ("model", "classnames", "template")}
    checked = run_meta({**meta, "run": older}, run / "adapter")
    assert (checked["loss"], checked["logit_bias"], checked["logit_scale"]) == ("softmax", None, 100.0)


def test_predict_refuses_a_damaged_record_and_warns_about_repeated_classes(capsys, caplog, data, run, tmp_path):
    image = data / "test" / "red_apple" / "000.png"
    adapter = tmp_path / "adapter"

    def edited(**fields) -> Path:
        shutil.rmtree(adapter, ignore_errors=True)
        shutil.copytree(run / "adapter", adapter)
        meta = json.loads((adapter / CONFIG_FILE).read_text())
        meta["run"].update(fields)
        (adapter / CONFIG_FILE).write_text(json.dumps(meta))
        return adapter

    refused(capsys, ["predict", "--adapter", edited(loss="sigmoid", logit_bias="abc"), image], "run.logit_bias")
    capsys.readouterr()
    assert main(["predict", "--adapter", str(edited(loss="sigmoid", logit_bias=-10.0)), str(image)]) == 0
    assert "SigLIP's per-class sigmoid" in capsys.readouterr().out  # a sound sigmoid record is used as recorded
    caplog.clear()
    assert main(["predict", "--adapter", str(edited(classnames=["cat", "cat", "cat"])), str(image)]) == 0
    assert "classes 0 ('cat') and 1 ('cat') and 2 ('cat') have the same prompt" in caplog.text
