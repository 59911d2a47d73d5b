"""Fault injection, driven through the CLI as a user would: bad data, kills, full disks, bad adapters, NaNs.

Each case checks the contract: one line starting with "error:", a non-zero exit, no traceback, nothing
half-written, and (for interrupted runs) a --resume that ends exactly where an uninterrupted run ends.
"""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from blocklora.cli.main import main
from gen_data import make_folder_dataset

FAST = ["--model", "tiny-clip", "--pretrained", "none", "--workers", "0", "--batch-size", "8", "--lr", "1e-2"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _cli(*args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "blocklora", *args], capture_output=True, text=True, env=ENV, **kw)


def _one_line_error(proc: subprocess.CompletedProcess, *needles: str) -> str:
    assert proc.returncode != 0, proc.stdout
    lines = [line for line in proc.stderr.splitlines() if line.strip() and not line.startswith(("train:", "eval"))]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert len(lines) >= 1 and lines[-1].startswith("error:"), proc.stderr[-3000:]
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1, proc.stderr
    for needle in needles:
        assert needle in errors[0], errors[0]
    return errors[0]


def _adapter(run: Path) -> dict[str, torch.Tensor]:
    return load_file(run / "adapter" / "blocklora_adapter.safetensors")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_folder_dataset(tmp_path_factory.mktemp("faults") / "d", n_classes=3, train_per_class=6,
                               test_per_class=3)


# -- bad input --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("extra", "needle"), [
    (["--dataset", "no_such_set"], "unknown dataset"),
    (["--dataset", "folder", "--model", "ViT-Q-99"], "unknown model 'ViT-Q-99'"),
    (["--dataset", "folder", "--n-blocks", "5"], "n_blocks=5 does not divide"),
    (["--dataset", "folder", "train.lr=fast"], "bad value 'fast' for train.lr"),
    (["--dataset", "folder", "--shots", "50", "data.replace=false"], "fewer than the 50 to draw"),
    (["--dataset", "folder", "--split-file", "/nonexistent/split.json"], "/nonexistent/split.json"),
])
def test_user_errors_leave_no_output(data, tmp_path, extra, needle):
    out = tmp_path / "run"
    args = ["train", *FAST, "--root", str(data), "--shots", "2", "--iters", "2", "--output", str(out)]
    _one_line_error(_cli(*args, *extra), needle)  # a repeated option: the last one wins
    assert not out.exists()


def test_debug_shows_the_traceback(data, tmp_path):
    proc = _cli("--debug", "train", *FAST, "--dataset", "folder", "--root", str(data), "--n-blocks", "5",
                "--output", str(tmp_path / "r"))
    assert proc.returncode != 0 and "Traceback" in proc.stderr


def test_truncated_image_stops_before_training_or_is_skipped(tmp_path):
    root = make_folder_dataset(tmp_path / "d", n_classes=2, train_per_class=3, test_per_class=2)
    bad = root / "train" / "red_apple" / "001.png"
    bad.write_bytes(bad.read_bytes()[:60])  # truncated PNG
    out = tmp_path / "run"
    proc = _cli("train", *FAST, "--dataset", "folder", "--root", str(root), "--shots", "3", "--iters", "2",
                "--output", str(out))
    _one_line_error(proc, str(bad), "skip_bad_images")
    assert not out.exists()
    proc = _cli("train", *FAST, "--dataset", "folder", "--root", str(root), "--shots", "3", "--iters", "2",
                "--output", str(out), "--skip-bad-images")
    assert proc.returncode == 0, proc.stderr[-2000:]
    results = json.loads((out / "results.json").read_text())
    assert [s["path"] for s in results["skipped_images"]] == [str(bad)]


def test_empty_class_folder(tmp_path):
    root = make_folder_dataset(tmp_path / "d", n_classes=2, train_per_class=2, test_per_class=2)
    (root / "train" / "empty_class").mkdir()
    _one_line_error(_cli("train", *FAST, "--dataset", "folder", "--root", str(root), "--output",
                         str(tmp_path / "r")), "empty_class")
    assert not (tmp_path / "r").exists()


def test_split_file_pointing_at_missing_images(data, tmp_path):
    split = tmp_path / "split.json"
    run = tmp_path / "first"
    assert main(["train", *FAST, "--dataset", "folder", "--root", str(data), "--shots", "2", "--iters", "1",
                 "--output", str(run), "--no-zero-shot"]) == 0
    doc = json.loads((run / "split.json").read_text())
    doc["train"][0][0] = "train/red_apple/does_not_exist.png"
    split.write_text(json.dumps(doc))
    _one_line_error(_cli("train", *FAST, "--dataset", "folder", "--root", str(data), "--split-file", str(split),
                         "--output", str(tmp_path / "r")), "does_not_exist.png")
    assert not (tmp_path / "r").exists()


def test_mismatched_adapter(data, tmp_path):
    run = tmp_path / "run"
    assert main(["train", *FAST, "--dataset", "folder", "--root", str(data), "--shots", "2", "--iters", "2",
                 "--output", str(run), "--no-zero-shot"]) == 0
    # other frozen weights: a tiny-clip checkpoint with one weight changed
    import open_clip
    from safetensors.torch import save_file

    from blocklora.backbones.openclip import TINY_CLIP

    torch.manual_seed(0)
    other = open_clip.CLIP(**TINY_CLIP).state_dict()
    other["visual.conv1.weight"] = other["visual.conv1.weight"] + 0.1
    save_file({k: v.contiguous() for k, v in other.items()}, tmp_path / "other.safetensors")
    args = ["eval", "--adapter", str(run / "adapter"), "--dataset", "folder", "--root", str(data), "--workers", "0"]
    _one_line_error(_cli(*args, "--pretrained", str(tmp_path / "other.safetensors")), "other frozen weights",
                    "force")
    assert _cli(*args, "--pretrained", str(tmp_path / "other.safetensors"), "--force").returncode == 0
    # another architecture: the adapter's config asks for more blocks / other widths than the model has
    meta = json.loads((run / "adapter" / "blocklora_adapter.json").read_text())
    meta["run"]["model"] = meta["backbone"]["name"] = "ViT-S-32"  # both records name the one model
    meta["run"]["pretrained"] = None
    (run / "adapter" / "blocklora_adapter.json").write_text(json.dumps(meta))
    _one_line_error(_cli(*args, "--force"), "does not fit this model")


# -- interrupted runs -------------------------------------------------------------------------------------------------
def _long_run(data: Path, out: Path, *extra: str) -> list[str]:
    return ["train", *FAST, "--dataset", "folder", "--root", str(data), "--shots", "4", "--iters", "120",
            "--checkpoint-every", "10", "--output", str(out), "--no-zero-shot", *extra]


@pytest.fixture(scope="module")
def uninterrupted(data, tmp_path_factory) -> dict[str, torch.Tensor]:
    # Same process set-up as the interrupted runs (a subprocess with ENV's thread count): float sums split over a
    # different number of threads may round differently, and the claim is "same seed, same machine, same result".
    out = tmp_path_factory.mktemp("ref") / "run"
    proc = _cli(*_long_run(data, out))
    assert proc.returncode == 0, proc.stderr[-2000:]
    return _adapter(out)


def test_kill_9_mid_run_then_resume_is_exact(data, tmp_path, uninterrupted):
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "blocklora", *_long_run(data, out)], env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if (out / "checkpoint.pt").exists() and len((out / "metrics.jsonl").read_text().splitlines()) >= 25:
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "results.json").exists(), "the run finished before it could be killed"
    assert (out / "checkpoint.pt").exists()
    resumed = _cli(*_long_run(data, out, "--resume"))
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    got = _adapter(out)
    assert got.keys() == uninterrupted.keys()
    for k in got:
        assert torch.equal(got[k], uninterrupted[k]), k
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 121))  # steps after the checkpoint were redone, not duplicated


def test_kill_during_checkpoint_write(data, tmp_path, uninterrupted):
    """The process dies half-way through writing its second checkpoint: the first one must survive intact."""
    out = tmp_path / "run"
    script = f"""
import os
import blocklora.engine.files as files
calls = [0]
real_write = files.atomic_write
def dying_write(path, write):
    calls[0] += path.name == "checkpoint.pt"
    if calls[0] == 2:
        def half(fh):
            fh.write(b"half a checkpoint")
            fh.flush()
            os._exit(137)  # killed mid-write
        return real_write(path, half)
    return real_write(path, write)
files.atomic_write = dying_write
from blocklora.cli.main import main
main({_long_run(data, out)!r})
"""
    proc = subprocess.run([sys.executable, "-c", script], env=ENV, capture_output=True, text=True)
    assert proc.returncode == 137
    assert list(out.glob(".checkpoint.pt.*.tmp")), "the interrupted write should have left only a temp file"
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    assert state["step"] == 10
    resumed = _cli(*_long_run(data, out, "--resume"))
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert not list(out.glob(".*.tmp"))
    got = _adapter(out)
    assert all(torch.equal(got[k], uninterrupted[k]) for k in got)


def test_two_runs_into_one_directory(data, tmp_path):
    out = tmp_path / "run"
    args = ["train", *FAST, "--dataset", "folder", "--root", str(data), "--shots", "4", "--iters", "100000",
            "--output", str(out), "--no-zero-shot"]
    proc = subprocess.Popen([sys.executable, "-m", "blocklora", *args], env=ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 60
        while time.time() < deadline and not (out / "metrics.jsonl").exists():
            time.sleep(0.02)
        _one_line_error(_cli(*args, "--resume"), "another blocklora run is writing")
        _one_line_error(_cli(*args, "--overwrite"), "another blocklora run is writing")
        assert proc.poll() is None and (out / "config.json").exists()  # the first run was not disturbed
    finally:
        proc.kill()
        proc.wait()


def test_existing_output_is_never_overwritten(data, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    _one_line_error(_cli("train", *FAST, "--dataset", "folder", "--root", str(data), "--output", str(out)),
                    "already exists", "--overwrite")
    assert (out / "precious.txt").read_text() == "keep me"


def _limit_file_size():
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead of killing
    resource.setrlimit(resource.RLIMIT_FSIZE, (2000, 2000))


def test_full_disk_fails_cleanly_without_half_written_files(data, tmp_path):
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "blocklora", "train", *FAST, "--dataset", "folder", "--root",
                           str(data), "--shots", "2", "--iters", "3", "--output", str(out), "--no-zero-shot"],
                          env=ENV, capture_output=True, text=True, preexec_fn=_limit_file_size)
    _one_line_error(proc, "File too large")
    for f in out.rglob("*.json"):
        json.loads(f.read_text())  # every JSON that exists is complete
    assert not (out / "results.json").exists()
    assert not list(out.rglob("*.tmp"))


def test_nan_loss_stops_with_the_step_and_keeps_the_checkpoint(data, tmp_path, monkeypatch, capsys):
    from blocklora.engine import stream

    real = stream.AugmentedImages.__getitem__
    seen = [0]

    def poisoned(self, key):
        x, y = real(self, key)
        seen[0] += 1
        return (x * float("nan"), y) if seen[0] > 8 * 25 else (x, y)  # batches of 8: poison from step 26

    monkeypatch.setattr(stream.AugmentedImages, "__getitem__", poisoned)
    out = tmp_path / "run"
    code = main(_long_run(data, out))
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 2 and "at step 26" in err and "step 20" in err, err
    assert torch.load(out / "checkpoint.pt", weights_only=True)["step"] == 20
    assert not (out / "results.json").exists()
    seen[0] = 0
    out2 = tmp_path / "skip"
    assert main(_long_run(data, out2, "train.nan_policy=skip")) == 0
    results = json.loads((out2 / "results.json").read_text())
    assert results["skipped_steps"] == 120 - 25
