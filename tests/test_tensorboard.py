"""--log tensorboard: the run's scalars read back with TensorBoard's own event reader equal metrics.jsonl and
results.json; without the package the option is one error line before anything is written."""

from __future__ import annotations

import json
import sys

import pytest

from blocklora.cli.main import main
from blocklora.engine.tensorboard import check_available
from blocklora.errors import ConfigError
from gen_data import make_folder_dataset

pytest.importorskip("tensorboard",
                    reason="the tensorboard extra is not installed (pip install 'blocklora[tensorboard]')")


def _scalars(directory) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(directory))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_scalars_match_metrics_and_results(tmp_path, capsys):
    data = make_folder_dataset(tmp_path / "data", n_classes=3, train_per_class=2, test_per_class=2)
    run = tmp_path / "run"
    assert main(["train", "--model", "tiny-clip", "--pretrained", "none", "--dataset", "folder", "--root", str(data),
                 "--shots", "2", "--iters", "4", "--batch-size", "3", "--workers", "0", "--log", "tensorboard",
                 "--output", str(run)]) == 0, capsys.readouterr().err
    scalars = _scalars(run / "tensorboard")
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    results = json.loads((run / "results.json").read_text())
    assert [s for s, _ in scalars["train/loss"]] == [1, 2, 3, 4]
    for tag, key in (("train/loss", "loss"), ("train/lr", "lr"), ("train/step_time_s", "step_s"),
                     ("train/batch_accuracy", "acc")):
        assert [v for _, v in scalars[tag]] == pytest.approx([line[key] for line in lines], rel=1e-6), tag
    assert scalars["eval/top1"] == [(4, pytest.approx(results["top1"], rel=1e-6))]
    assert scalars["eval/zero_shot_top1"] == [(0, pytest.approx(results["zero_shot_top1"], rel=1e-6))]
    # --overwrite clears the folder it wrote (it carries blocklora's marker) with the rest of the run
    assert main(["train", "--model", "tiny-clip", "--pretrained", "none", "--dataset", "folder", "--root", str(data),
                 "--shots", "2", "--iters", "2", "--batch-size", "3", "--workers", "0", "--no-zero-shot",
                 "--output", str(run), "--overwrite"]) == 0
    assert not (run / "tensorboard").exists()


def test_missing_package_is_one_line(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # what an environment without the extra sees
    with pytest.raises(ConfigError, match=r"blocklora\[tensorboard\]"):
        check_available()
    data = make_folder_dataset(tmp_path / "data", n_classes=2, train_per_class=1, test_per_class=1)
    assert main(["train", "--model", "tiny-clip", "--pretrained", "none", "--dataset", "folder", "--root", str(data),
                 "--shots", "1", "--iters", "1", "--workers", "0", "--log", "tensorboard",
                 "--output", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --log tensorboard needs")
    assert not (tmp_path / "run").exists()


def test_resumed_run_purges_the_steps_after_its_checkpoint(tmp_path, capsys, monkeypatch):
    """Killed at step 4 with its last checkpoint at step 2: the resumed run's event files hold steps 1..6 once
    each (SummaryWriter's purge_step drops the stale 3 and 4), equal to its metrics.jsonl."""
    import blocklora.pipeline.run as api

    data = make_folder_dataset(tmp_path / "data", n_classes=3, train_per_class=2, test_per_class=2)
    run = tmp_path / "run"
    argv = ["train", "--model", "tiny-clip", "--pretrained", "none", "--dataset", "folder", "--root", str(data),
            "--shots", "2", "--iters", "6", "--batch-size", "3", "--workers", "0", "--log", "tensorboard",
            "--checkpoint-every", "2", "--no-zero-shot", "--output", str(run)]
    real, calls = api.save_torch, []

    def killed_at_second_checkpoint(path, obj):
        calls.append(obj["step"])
        if len(calls) == 2:
            raise KeyboardInterrupt  # before writing: the checkpoint on disk stays at step 2
        real(path, obj)

    monkeypatch.setattr(api, "save_torch", killed_at_second_checkpoint)
    assert main(argv) == 130
    monkeypatch.undo()
    assert calls == [2, 4] and [s for s, _ in _scalars(run / "tensorboard")["train/loss"]] == [1, 2, 3, 4]
    assert main([*argv, "--resume"]) == 0, capsys.readouterr().err
    scalars = _scalars(run / "tensorboard")
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [s for s, _ in scalars["train/loss"]] == [line["step"] for line in lines] == [1, 2, 3, 4, 5, 6]
    assert [v for _, v in scalars["train/loss"]] == pytest.approx([line["loss"] for line in lines], rel=1e-6)
