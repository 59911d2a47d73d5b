"""torchrun data parallelism on CPU (gloo, 2 processes): the same adapter as one process with the same global batch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from blocklora.cli.main import main
from blocklora.engine.distributed import Launch, from_env
from blocklora.errors import ConfigError
from gen_data import make_folder_dataset

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _args(data: Path, out: Path, *extra: str) -> list[str]:
    # dropout 0: masks are drawn per process; both towers adapted. 12 images in global batches of 11 with the last
    # partial batch kept: steps alternate 11 images (6 + 5 per rank) and 1 image, where rank 1's share is empty and
    # it joins the step with zero gradients
    return ["train", "--model", "tiny-clip", "--pretrained", "none", "--dataset", "folder", "--root", str(data),
            "--shots", "4", "--iters", "6", "--batch-size", "11", "train.drop_last=false", "--workers", "0", "--lr",
            "1e-2", "--dropout", "0", "--device", "cpu", "--checkpoint-every", "2", "--output", str(out), *extra]


def _torchrun(*args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "blocklora",
           *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=300)


def _adapter(run: Path) -> dict[str, torch.Tensor]:
    return load_file(run / "adapter" / "blocklora_adapter.safetensors")


def _assert_close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys() and a
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=k)
    assert any(v.abs().max() > 1e-3 for v in a.values())  # it trained (B starts at zero)


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    data = make_folder_dataset(tmp_path_factory.mktemp("ddp") / "d", n_classes=3, train_per_class=6,
                               test_per_class=3)
    out = tmp_path_factory.mktemp("single") / "run"
    assert main(_args(data, out)) == 0
    return data, out


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _scalars(directory: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(directory))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def _check_written_once(out: Path, stdout: str) -> dict:
    r = json.loads((out / "results.json").read_text())
    assert r["world_size"] == 2 and r["iters"] == 6
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 7))  # rank 0 alone writes metrics
    assert not list(out.glob(".*.tmp")) and not (out / "checkpoint.pt").exists()
    assert stdout.count("results.json") == 1  # one summary line, from rank 0
    return r


@pytest.mark.slow
def test_torchrun_two_processes_equal_one(single, tmp_path):
    data, ref = single
    out = tmp_path / "ddp"
    proc = _torchrun(*_args(data, out, "train.log=tensorboard"))  # (torchrun would take "--log" as its own)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = _check_written_once(out, proc.stdout)
    assert (out / "train.log").read_text().count(f"run {out}:") == 1
    _assert_close(_adapter(out), _adapter(ref))
    single_r = json.loads((ref / "results.json").read_text())
    # the recorded loss and batch accuracy are the global batch's (both shards), as one process records them: in
    # metrics.jsonl, TensorBoard and results.json's final_loss
    two, one = _metrics(out), _metrics(ref)
    assert [m["acc"] for m in two] == [m["acc"] for m in one]
    # two shards sum in another order: a step's loss agrees to float32 rounding carried over the steps
    assert [m["loss"] for m in two] == pytest.approx([m["loss"] for m in one], rel=1e-4, abs=1e-5)
    assert r["final_loss"] == pytest.approx(single_r["final_loss"], rel=1e-4) and r["final_loss"] == two[-1]["loss"]
    scalars = _scalars(out / "tensorboard")
    assert [v for _, v in scalars["train/loss"]] == pytest.approx([m["loss"] for m in one], rel=1e-4, abs=1e-5)
    assert [v for _, v in scalars["train/batch_accuracy"]] == pytest.approx([m["acc"] for m in one])  # (float32)
    # evaluation counts are summed over the two shards: the same test set, the same (or float-tie) accuracy
    assert r["n_test"] == single_r["n_test"] == 9
    assert abs(r["top1"] - single_r["top1"]) <= 100 / 9 + 1e-6


def test_two_ranks_resume_a_single_process_checkpoint(single, tmp_path, monkeypatch, capfd):
    """Interrupted on one process at step 4, resumed on two: every rank checks the checkpoint's split hash."""
    import blocklora.engine.fit as fit

    data, ref = single
    out = tmp_path / "run"
    real_step = fit.Trainer._step

    def interrupt_at_4(self, *a, **k):
        if self.state.step == 4:
            raise KeyboardInterrupt
        return real_step(self, *a, **k)

    monkeypatch.setattr(fit.Trainer, "_step", interrupt_at_4)
    assert main(_args(data, out)) == 130
    monkeypatch.undo()
    assert torch.load(out / "checkpoint.pt", weights_only=True)["step"] == 4
    capfd.readouterr()
    proc = _torchrun(*_args(data, out, "--resume"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    _check_written_once(out, proc.stdout)
    _assert_close(_adapter(out), _adapter(ref))


def test_step_shares_cover_the_global_batch_and_may_be_empty():
    from blocklora.engine.stream import StepBatches, collate_share

    shares = [list(StepBatches(3, 2, seed=0, start=0, total=2, rank=r, world_size=2, drop_last=False))
              for r in range(2)]
    assert [len(s) for s in shares[0]] == [1, 1] and [len(s) for s in shares[1]] == [1, 0]
    for step in range(2):
        assert sorted(shares[0][step] + shares[1][step]) == sorted(StepBatches(3, 2, 0, 0, 2, drop_last=False)
                                                                   .global_batch(step))
    assert collate_share([]) == (None, None)


def test_launch_from_env():
    assert from_env({}) == Launch(0, 1, 0)
    assert from_env({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1"}) == Launch(3, 4, 1)
    with pytest.raises(ConfigError, match="RANK=4"):
        from_env({"RANK": "4", "WORLD_SIZE": "4"})
    with pytest.raises(ConfigError, match="not integers"):
        from_env({"RANK": "x", "WORLD_SIZE": "2"})
