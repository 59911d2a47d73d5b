"""The fault classes of docs/reliability.md, driven through the CLI (in process, for speed) as a user would.

Every refusal is checked for the contract: a non-zero exit, exactly one line starting with "error:" that names the
problem, and nothing written, overwritten or deleted (the files involved are compared before and after).
"""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from blocklora.cli.main import main
from blocklora.ownership import MARKER
from gen_data import make_folder_dataset

FAST = ["--model", "tiny-clip", "--pretrained", "none", "--workers", "0", "--batch-size", "4"]


def cli(capsys, *argv: str) -> tuple[int, str]:
    capsys.readouterr()
    try:
        code = main([str(a) for a in argv])
    except SystemExit as e:  # argparse's own errors
        code = e.code
    return code, capsys.readouterr().err


def refused(capsys, argv, *needles: str) -> str:
    code, err = cli(capsys, *argv)
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert code not in (0, None) and len(errors) == 1 and "Traceback" not in err, err[-2000:]
    for needle in needles:
        assert needle in errors[0], errors[0]
    return errors[0]


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def train_args(data: Path, out: Path, *extra: str) -> list[str]:
    return ["train", *FAST, "--dataset", "folder", "--root", data, "--shots", "2", "--iters", "2", "--no-zero-shot",
            "--output", out, *extra]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_folder_dataset(tmp_path_factory.mktemp("matrix") / "d", n_classes=3, train_per_class=4,
                               test_per_class=2)


@pytest.fixture(scope="module")
def run(data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("run") / "run"
    assert main([str(a) for a in train_args(data, out)]) == 0
    return out


# -- kind 2: every value checked before anything is written -------------------------------------------------------
@pytest.mark.parametrize(("extra", "needle"), [
    (["--lr", "nan"], "train.lr must be a finite number > 0"), (["--lr", "inf"], "train.lr"),
    (["train.betas=2,3"], "train.betas"), (["train.weight_decay=-1"], "train.weight_decay"),
    (["train.grad_clip=-1"], "train.grad_clip"), (["train.grad_clip=0"], "train.grad_clip"),
    (["--iters", "0"], "train.iters"), (["train.iters_per_shot=0", "train.iters=none"], "train.iters_per_shot"),
    (["--shots", "100000"], "data.shots"), (["--seed", "1180591620717411303424"], "data.seed"),
    (["--seed", "-1"], "data.seed"), (["eval.batch_size=0"], "eval.batch_size"),
    (["--batch-size", "0"], "train.batch_size"), (["--device", "meta"], "device 'meta'"),
    (["train.template={}{}"], "2 fields"), (["train.template={} {x}"], "{x}"),
    (["train.template={name} {}"], "{name}"), (["train.template=a photo"], "no '{}'"),
    (["train.aug_scale_min=-1"], "train.aug_scale_min"), (["--alpha", "nan"], "adapter.alpha"),
    (["--alpha", "0"], "adapter.alpha"), (["--dropout", "1"], "adapter.dropout"),
    (["train.logit_scale=nan"], "train.logit_scale"), (["train.warmup_iters=5"], "warmup_iters"),
    (["train.min_lr=1"], "min_lr"), (["--workers", "-5"], "data.workers"),
    (["--classes", "base"], "base-to-new needs at least 2 classes on each side"),
])
def test_bad_values_are_refused_before_the_run_directory_exists(capsys, data, tmp_path, extra, needle):
    out = tmp_path / "run"
    refused(capsys, train_args(data, out, *extra), needle)
    assert not out.exists()


EVAL = ["eval", "--adapter", "{adapter}", "--dataset", "folder", "--root", "{data}"]


@pytest.mark.parametrize(("argv", "needle"), [
    ([*EVAL, "--batch-size", "0"], "--batch-size"), ([*EVAL, "--limit", "0"], "--limit"),
    ([*EVAL, "--device", "meta"], "--device"),
    (["zeroshot", *FAST[:4], "--dataset", "folder", "--root", "{data}", "--template", "a photo"], "no '{}'"),
    (["predict", "--adapter", "{adapter}", "--topk", "0", "{image}"], "--topk"),
    (["sweep", "--datasets", "folder", "--root", "{data}", "--output", "{tmp}/sw", "--shots", "2", "--seeds", "1",
      *FAST, "--lr", "nan"], "train.lr"),
    (["sweep", "--datasets", "folder", "--root", "{data}", "--output", "{tmp}/sw", "--shots", "2", "--seeds", "1",
      *FAST, "--classes", "base"], "base-to-new"),
])
def test_bad_values_of_the_other_commands(capsys, data, run, tmp_path, argv, needle):
    image = data / "test" / "red_apple" / "000.png"
    fill = {"{adapter}": run / "adapter", "{data}": data, "{image}": image}
    argv = [str(fill.get(a, a)).replace("{tmp}", str(tmp_path)) for a in argv]
    refused(capsys, argv, needle)
    assert not (tmp_path / "sw").exists()


# -- kind 1: delete only what blocklora made -------------------------------------------------------------------------
@pytest.mark.parametrize("where", ["dataset root", "parent of the dataset root", "current directory", "home",
                                   "folder of the split file", "folder of the pretrained file"])
def test_overwrite_never_touches_the_run_inputs(capsys, monkeypatch, data, run, tmp_path, where):
    root = tmp_path / "d"
    shutil.copytree(data, root)
    extra: list[str] = []
    target = {"dataset root": root, "parent of the dataset root": tmp_path}.get(where)
    if where == "current directory":
        target = tmp_path / "cwd"
        target.mkdir()
        monkeypatch.chdir(target)
    elif where == "home":
        target = tmp_path / "home"
        (target / ".config").mkdir(parents=True)
        monkeypatch.setenv("HOME", str(target))
    elif where == "folder of the split file":
        target = tmp_path / "splits"
        target.mkdir()
        shutil.copy(run / "split.json", target / "split.json")
        extra = ["--split-file", str(target / "split.json")]
    elif where == "folder of the pretrained file":
        import open_clip

        from blocklora.backbones.openclip import TINY_CLIP

        target = tmp_path / "weights"
        target.mkdir()
        save_file(open_clip.CLIP(**TINY_CLIP).state_dict(), target / "w.safetensors")
        extra = ["--pretrained", str(target / "w.safetensors")]
    before = snapshot(tmp_path)
    refused(capsys, train_args(root, target, "--overwrite", *extra), "refusing to delete or replace")
    assert snapshot(tmp_path) == before


def test_overwrite_and_resume_refuse_folders_blocklora_did_not_make(capsys, data, run, tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "train.log").write_text("my notes")
    (mine / "results.json").write_text('{"mine": true}')
    refused(capsys, train_args(data, mine, "--overwrite"), "not a blocklora run directory", MARKER)
    refused(capsys, train_args(data, mine, "--resume"), "not a blocklora run directory", "--resume")
    assert (mine / "train.log").read_text() == "my notes" and len(list(mine.iterdir())) == 2
    # a run of an earlier version (no marker): still read, never cleared or resumed
    old = tmp_path / "old"
    shutil.copytree(run, old)
    for marker in old.rglob(MARKER):
        marker.unlink()
    before = snapshot(old)
    refused(capsys, train_args(data, old, "--overwrite"), "earlier blocklora version", "delete it yourself")
    refused(capsys, train_args(data, old, "--resume"), "earlier blocklora version")
    assert snapshot(old) == before
    assert cli(capsys, "eval", "--adapter", old / "adapter", "--dataset", "folder", "--root", data,
               "--workers", "0")[0] == 0


def test_overwrite_clears_only_the_run_files(capsys, data, tmp_path):
    out = tmp_path / "run"
    assert cli(capsys, *train_args(data, out))[0] == 0
    (out / "notes.txt").write_text("keep me")
    (out / "adapter-old").mkdir()
    assert cli(capsys, *train_args(data, out, "--overwrite", "--seed", "2"))[0] == 0
    assert (out / "notes.txt").read_text() == "keep me" and (out / "adapter-old").is_dir()
    assert json.loads((out / "results.json").read_text())["seed"] == 2


@pytest.mark.parametrize("case", ["folder holding the adapter", "user folder", "non-weights file",
                                  "inside the adapter"])
def test_export_replaces_only_what_it_exported(capsys, run, tmp_path, case):
    if case == "folder holding the adapter":
        target = run.parent
    elif case == "user folder":
        target = tmp_path / "mine"
        target.mkdir()
        (target / "notes.txt").write_text("keep")
    elif case == "non-weights file":
        target = tmp_path / "notes.txt"
        target.write_text("keep")
    else:
        target = run / "adapter" / "merged.safetensors"
    before = snapshot(run.parent) if case != "user folder" else snapshot(target)
    needle = {"folder holding the adapter": "contains the adapter being read", "user folder": "did not export",
              "non-weights file": "not a weights file", "inside the adapter": "lies inside the adapter"}[case]
    refused(capsys, ["export", "--adapter", run / "adapter", "--output", target, "--overwrite"], needle)
    assert (snapshot(run.parent) if case != "user folder" else snapshot(target)) == before


def _file_size_limit():
    import resource
    import signal

    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead of killing
    resource.setrlimit(resource.RLIMIT_FSIZE, (4000, 4000))


def test_export_replaces_its_own_output_and_fails_cleanly_on_a_full_disk(capsys, run, tmp_path):
    import subprocess
    import sys

    out = tmp_path / "merged.safetensors"
    for _ in range(2):
        assert cli(capsys, "export", "--adapter", run / "adapter", "--output", out, "--overwrite")[0] == 0
    full = tmp_path / "full"
    full.mkdir()
    proc = subprocess.run([sys.executable, "-m", "blocklora", "export", "--adapter", str(run / "adapter"),
                           "--output", str(full / "m.safetensors")], capture_output=True, text=True,
                          preexec_fn=_file_size_limit)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 1 and len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert "m.safetensors" in errors[0] and not list(full.iterdir())  # no half-written file, no temporary


# -- kind 4: damaged and hostile files -------------------------------------------------------------------------------
ADAPTER_DAMAGE = {
    "no config": lambda m: m.pop("config"), "config null": lambda m: m.update(config=None),
    "alpha text": lambda m: m["config"].update(alpha="abc"), "alpha NaN": lambda m: m["config"].update(alpha=math.nan),
    "towers number": lambda m: m["config"].update(towers=5), "extra list": lambda m: m["config"].update(extra=[1]),
    "backbone null": lambda m: m.update(backbone=None), "version text": lambda m: m.update(format_version="2"),
    "model number": lambda m: m["run"].update(model=5), "no class names": lambda m: m["run"].pop("classnames"),
    "no classes": lambda m: m["run"].update(classnames=[]),
    "template fields": lambda m: m["run"].update(template="{} {x}"),
    "logit scale text": lambda m: m["run"].update(logit_scale="abc"),
    # the model in the adapter's identity and the one the CLI rebuilds: one hand-edited, neither is chosen
    "backbone name edited": lambda m: m["backbone"].update(name="effnet-minilm"),
    "run model edited": lambda m: m["run"].update(model="ViT-B-32"),
}


@pytest.mark.parametrize("damage", [*ADAPTER_DAMAGE, "not UTF-8", "weights garbage", "weights NaN"])
def test_damaged_adapters_are_one_line(capsys, data, run, tmp_path, damage):
    adapter = tmp_path / "adapter"
    shutil.copytree(run / "adapter", adapter)
    meta_path, weights = adapter / "blocklora_adapter.json", adapter / "blocklora_adapter.safetensors"
    if damage == "not UTF-8":
        meta_path.write_bytes(b"\xff\xfe" + meta_path.read_bytes())
    elif damage == "weights garbage":
        weights.write_bytes(os.urandom(512))
    elif damage == "weights NaN":
        save_file({k: torch.full_like(v, math.nan) for k, v in load_file(weights).items()}, weights)
    else:
        meta = json.loads(meta_path.read_text())
        ADAPTER_DAMAGE[damage](meta)
        meta_path.write_text(json.dumps(meta))
    refused(capsys, ["predict", "--adapter", adapter, data / "test" / "red_apple" / "000.png"], str(adapter))
    refused(capsys, ["eval", "--adapter", adapter, "--dataset", "folder", "--root", data, "--workers", "0"],
            str(adapter))


def test_an_hf_adapter_loaded_from_another_folder_than_its_model_name_records_one_model(tmp_path):
    """--model hf:A --pretrained B loads B: the adapter's backbone.name is hf:B, its run.model hf:A (and
    run.pretrained B), one model; any other backbone.name is refused."""
    from blocklora.errors import AdapterMismatchError
    from blocklora.pipeline.trained import run_meta

    run = {"model": "hf:/models/base", "pretrained": "/models/tuned", "classnames": ["a", "b"], "template": "a {}."}
    assert run_meta({"backbone": {"name": "hf:/models/tuned"}, "run": run}, tmp_path)["model"] == "hf:/models/base"
    with pytest.raises(AdapterMismatchError, match="backbone.name 'hf:/models/other' and run.model 'hf:/models/base'"):
        run_meta({"backbone": {"name": "hf:/models/other"}, "run": run}, tmp_path)


@pytest.mark.parametrize("edited", ["split.json reordered", "run.classnames renamed"])
def test_a_run_folder_whose_split_and_adapter_disagree_on_the_classes_is_refused_naming_both(capsys, data, run,
                                                                                             tmp_path, edited):
    """split.json and the adapter's run.classnames are written with one class list (its order is the labels'): a
    run folder where they differ was edited, and eval, predict and export use neither."""
    mine = tmp_path / "run"
    shutil.copytree(run, mine)
    split, meta_path = mine / "split.json", mine / "adapter" / "blocklora_adapter.json"
    if edited == "split.json reordered":
        record = json.loads(split.read_text())
        record["classnames"] = record["classnames"][::-1]
        split.write_text(json.dumps(record))
    else:
        meta = json.loads(meta_path.read_text())
        meta["run"]["classnames"][0] = "zebra"
        meta_path.write_text(json.dumps(meta))
    before = snapshot(mine)
    for argv in (["predict", "--adapter", mine, data / "test" / "red_apple" / "000.png"],
                 ["eval", "--adapter", mine, "--workers", "0"],
                 ["export", "--adapter", mine / "adapter", "--output", tmp_path / "merged"]):
        refused(capsys, argv, f"{split} and {meta_path} disagree on the run's classes (class 0 is ")
    assert snapshot(mine) == before and not (tmp_path / "merged").exists()
