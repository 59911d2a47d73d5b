"""`blocklora demo` end to end in a reduced mode: real packaged weights, real Fashion-MNIST, the real CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from blocklora.cli.main import main
from blocklora.engine.rundir import RunDir
from blocklora.pipeline.demo import ITERS, SHOTS, TEST_IMAGES, demo_config, summary_lines


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    from blocklora.backbones import effnet_minilm
    from blocklora.data import fashion_mnist
    from blocklora.errors import BlockLoRAError

    try:  # the suite's set-up (make test) installs both; a bare checkout says what is missing
        effnet_minilm._packages()
        fashion_mnist.load()
    except BlockLoRAError as e:
        pytest.skip(str(e))
    out = tmp_path_factory.mktemp("demo") / "run"
    code = main(["demo", "--output", str(out), "--shots", "2", "--iters", "6", "--test-images", "120",
                 "--device", "cpu", "data.workers=0"])
    return code, out


def test_demo_writes_results_plot_examples_and_adapter(demo_run, capsys):
    code, out = demo_run
    assert code == 0
    r = json.loads((out / "results.json").read_text())
    assert r["shots"] == 2 and r["iters"] == 6 and r["n_test"] == 120
    assert 0 <= r["zero_shot_top1"] <= 100 and 0 <= r["top1"] <= 100
    assert r["trainable_params"] == 25_136  # default Block-LoRA (n=8, r=2, q,k,v) on both towers of effnet-minilm
    assert r["config"]["model"] == "effnet-minilm" and r["config"]["data"]["dataset"] == "fashion-mnist"
    assert (out / "demo.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "adapter" / "blocklora_adapter.safetensors").is_file() and (out / "split.json").is_file()


def _evaluated(out: Path):
    """The run's test subset, and the evaluation path's predictions for it: zero-shot and adapted."""
    import torch

    from blocklora.adapters.inject import adapters_disabled
    from blocklora.data import evenly_spaced, load_dataset
    from blocklora.engine import evaluate as ev
    from blocklora.pipeline.run import load_trained

    data = load_dataset("fashion-mnist", None)
    items = evenly_spaced(data.test, 120)
    backbone, meta, rt = load_trained(out / "adapter", device="cpu")

    def predictions() -> torch.Tensor:
        with torch.no_grad():
            txt = ev.encode_classes(backbone, data.classnames, [meta["run"]["template"]], rt)
        feats = ev.image_features(backbone, items, data.image_reader, rt, 128).feats
        return (feats @ txt.T).argmax(-1)

    after = predictions()
    with adapters_disabled(backbone.model):
        before = predictions()
    return data, items, before, after


def test_demo_examples_are_evaluated_images_with_the_evaluations_predictions(demo_run):
    """One example per class, each an image of the evaluated subset saved losslessly at its real size, with the
    prediction the evaluation made for it (the evaluation's predictions reproduce the reported accuracies)."""
    import numpy as np
    from PIL import Image

    _, out = demo_run
    r = json.loads((out / "results.json").read_text())
    data, items, before, after = _evaluated(out)
    labels = [it.label for it in items]
    # results.json's rounding (engine/evaluate.summarize): these are the predictions the reported accuracies count
    assert round(100 * sum(int(p) == y for p, y in zip(after, labels)) / len(items), 4) == r["top1"]
    assert round(100 * sum(int(p) == y for p, y in zip(before, labels)) / len(items), 4) == r["zero_shot_top1"]
    position = {it.path: i for i, it in enumerate(items)}
    examples = r["examples"]  # written with the run's results, once
    assert [e["true"] for e in examples] == data.classnames  # all 10 classes, in label order
    for e in examples:
        i = position[e["item"]]  # an evaluated image
        assert data.classnames[items[i].label] == e["true"]
        assert e["adapted"] == data.classnames[after[i]] and e["zero_shot"] == data.classnames[before[i]]
        with Image.open(e["image"]) as saved:
            assert saved.format == "PNG" and saved.size == (28, 28) == tuple(e["size"])
            assert np.array_equal(np.asarray(saved.convert("RGB")), np.asarray(data.image_reader(e["item"])))
    lines = "\n".join(summary_lines(RunDir(out).read_results(), examples, out))
    assert "one evaluated test image per class" in lines and "28x28 px" in lines
    assert f"next: blocklora predict --adapter {out / 'adapter'} {out / 'examples'}" in lines


def test_demo_refuses_to_overwrite(demo_run, capsys):
    code, out = demo_run
    before = (out / "results.json").read_bytes()
    capsys.readouterr()
    assert main(["demo", "--output", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "already exists" in err and len(err.splitlines()) == 1
    assert (out / "results.json").read_bytes() == before


def test_predict_on_the_demo_examples(demo_run, capsys):
    code, out = demo_run
    capsys.readouterr()
    assert main(["predict", "--adapter", str(out / "adapter"), str(out / "examples"), "--topk", "2", "--jsonl"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]  # JSON lines
    assert len(rows) == 10 and all(len(row["top"]) == 2 for row in rows)
    # the closing line's command gives the demo's own example predictions
    examples = {Path(e["image"]).name: e["adapted"]
                for e in json.loads((out / "results.json").read_text())["examples"]}
    assert {Path(row["image"]).name: row["top"][0]["class"] for row in rows} == examples


def test_demo_defaults():
    cfg = demo_config()
    assert (cfg.data.shots, cfg.train.iters, cfg.eval.limit) == (SHOTS, ITERS, TEST_IMAGES)
    assert cfg.adapter.method == "block_lora" and cfg.adapter.n_blocks == 8
