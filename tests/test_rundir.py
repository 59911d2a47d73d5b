"""The run directory object and the ownership rules under it (what blocklora may delete), the strict JSON writer,
the Python API's safety: exact behaviour on small real folders."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import blocklora
from blocklora import (
    AdapterConfig,
    AdapterMismatchError,
    BlockLoRAError,
    ConfigError,
    inject,
    load_adapter,
    save_adapter,
)
from blocklora.engine.files import atomic_write, to_json
from blocklora.engine.rundir import RunDir
from blocklora.ownership import MARKER, Protected, conflict, mark, marker_kind, remove_stale_temps
from conftest import make_openclip, randomize_adapters


def test_open_for_decides_or_refuses(tmp_path):
    inputs = [Protected("the dataset root", tmp_path / "data")]
    (tmp_path / "data").mkdir()
    assert RunDir(tmp_path / "new").open_for(False, False, inputs) == "new"
    rd = RunDir(tmp_path / "run")
    assert rd.create() and marker_kind(rd.path) == "run"
    with pytest.raises(BlockLoRAError, match="already exists"):
        rd.open_for(False, False, inputs)
    assert rd.open_for(False, True, inputs) == "fresh"  # marked, never got to its config
    rd.config.write_text("{}")
    assert rd.open_for(False, True, inputs) == "resume" and rd.open_for(True, False, inputs) == "overwrite"
    with pytest.raises(BlockLoRAError, match="it is the dataset root"):
        RunDir(tmp_path / "data").open_for(True, False, inputs)
    with pytest.raises(BlockLoRAError, match="contains the dataset root"):
        RunDir(tmp_path).open_for(True, False, inputs)
    (tmp_path / "file").write_text("x")
    with pytest.raises(BlockLoRAError, match="is a file"):
        RunDir(tmp_path / "file").open_for(True, False, inputs)


def test_clear_removes_only_run_files_and_the_lock_removes_stale_temps(tmp_path):
    rd = RunDir(tmp_path / "run")
    rd.create()
    for name in (*RunDir.OWNED_FILES, "notes.txt"):
        (rd.path / name).write_text("x")
    rd.adapter.mkdir()
    mark(rd.adapter, "adapter")
    (rd.path / "adapter_copy").mkdir()  # a user's folder, even with a familiar name
    (rd.path / "examples").mkdir()  # not marked: not provably ours
    stale = rd.path / ".results.json.blocklora-1-abc.tmp"  # pid 1 is alive: only the lock knows it is stale
    stale.write_text("{")
    with rd.lock():
        assert not stale.exists()
        assert rd.clear() == ["adapter_copy", "examples", "notes.txt"]
    assert sorted(p.name for p in rd.path.iterdir()) == [".blocklora", ".lock", "adapter_copy", "examples",
                                                          "notes.txt"]


def test_conflicts_resolve_symbolic_links(tmp_path):
    (tmp_path / "data" / "train").mkdir(parents=True)
    (tmp_path / "link").symlink_to(tmp_path / "data")
    inputs = [Protected("the dataset root", tmp_path / "data"), Protected("home", tmp_path / "h", inside=False)]
    assert conflict(tmp_path / "link", inputs) == "it is the dataset root"
    assert conflict(tmp_path / "link" / "train", inputs).startswith("it lies inside the dataset root")
    assert conflict(tmp_path / "h" / "runs", inputs) is None  # inside home is fine; home itself is not
    assert conflict(tmp_path / "h", inputs) == "it is home"
    assert conflict(tmp_path / "elsewhere", inputs) is None


def test_stale_temporary_files_of_dead_processes_go(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    mine = tmp_path / f".x.json.blocklora-{os.getpid()}-a.tmp"
    gone = tmp_path / f".x.json.blocklora-{dead}-b.tmp"
    other = tmp_path / f".y.json.blocklora-{dead}-c.tmp"
    user = tmp_path / ".notes.tmp"
    for f in (mine, gone, other, user):
        f.write_text("")
    assert remove_stale_temps(tmp_path, name="x.json") == [gone.name]
    atomic_write(tmp_path / "y.json", lambda fh: fh.write(b"{}"))  # a write cleans its own leftovers
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([mine.name, user.name, "y.json"])


def test_json_is_strict():
    text = to_json({"loss": float("nan"), "x": [float("inf"), 1.5], "t": torch.tensor([1.0, float("-inf")])})
    assert json.loads(text, parse_constant=lambda c: pytest.fail(c)) == {"loss": None, "x": [None, 1.5],
                                                                          "t": [1.0, None]}


# -- the Python API is as safe as the CLI ----------------------------------------------------------------------------
def test_load_into_a_merged_model_is_refused_even_with_force(tmp_path):
    a = make_openclip()
    inject(a)
    randomize_adapters(a, 1)
    save_adapter(a, tmp_path / "a")
    m = make_openclip()
    load_adapter(m, tmp_path / "a")
    blocklora.merge(m)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    with pytest.raises(AdapterMismatchError, match="unmerge"):
        load_adapter(m, tmp_path / "a", force=True)
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())


def test_save_adapter_keeps_its_metadata_and_replaces_only_its_own_folder(tmp_path):
    model = make_openclip()
    inject(model)
    with pytest.raises(ConfigError, match="'config'"):
        save_adapter(model, tmp_path / "a", extra={"config": {"r": 64}})
    save_adapter(model, tmp_path / "a", extra={"note": "mine"})
    assert json.loads((tmp_path / "a" / "blocklora_adapter.json").read_text())["note"] == "mine"
    (tmp_path / "a" / "README.md").write_text("my notes")
    with pytest.raises(BlockLoRAError, match="README.md"):
        save_adapter(model, tmp_path / "a", overwrite=True)
    (tmp_path / "a" / "README.md").unlink()
    save_adapter(model, tmp_path / "a", overwrite=True)
    (tmp_path / "user").mkdir()
    (tmp_path / "user" / "photo.jpg").write_bytes(b"x")
    with pytest.raises(BlockLoRAError, match="is not an adapter directory blocklora made"):
        save_adapter(model, tmp_path / "user", overwrite=True)
    old = tmp_path / "old"  # written by a blocklora older than the marker
    save_adapter(model, old)
    (old / MARKER).unlink()
    with pytest.raises(BlockLoRAError, match="earlier blocklora version"):
        save_adapter(model, old, overwrite=True)
    load_adapter(make_openclip(), old)  # still read
    with torch.no_grad():
        next(p for n, p in model.named_parameters() if "lora_B" in n).fill_(float("nan"))
    with pytest.raises(BlockLoRAError, match="NaN"):
        save_adapter(model, tmp_path / "nan")
    assert not (tmp_path / "nan").exists()


def test_adapters_stay_float32_on_half_precision_weights():
    model = make_openclip().half()
    inject(model, AdapterConfig())
    lora = [p for n, p in model.named_parameters() if ".lora_" in n]
    assert lora and all(p.dtype == torch.float32 for p in lora)
    frozen = [p for n, p in model.named_parameters() if ".lora_" not in n]
    assert all(p.dtype == torch.float16 for p in frozen)
    images = torch.randn(2, 3, 32, 32).half()
    out = model.encode_image(images)
    assert out.dtype == torch.float16 and torch.isfinite(out).all()
    out.float().sum().backward()
    vision = [p for n, p in model.named_parameters() if ".lora_" in n and n.startswith("visual.")]
    assert vision and all(p.grad is not None and p.grad.dtype == torch.float32 for p in vision)


def test_public_names_load_lazily():
    code = "import sys, blocklora.cli.main; print('torch' in sys.modules); from blocklora import inject; print(inject)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.split("\n")
    assert out[0] == "False" and "function inject" in out[1]
    assert Path(blocklora.__file__).name == "__init__.py" and set(blocklora.__all__) <= set(dir(blocklora))
