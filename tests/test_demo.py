"""`blocklora demo` end to end in a reduced mode: real packaged weights, real Fashion-MNIST, the real CLI."""

from __future__ import annotations

import json

import pytest

from blocklora.cli import main
from blocklora.demo import ITERS, SHOTS, TEST_IMAGES, demo_config


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
    assert r["trainable_params"] == 24_048  # default Block-LoRA (n=8, r=2, q,k,v) on both towers of effnet-minilm
    assert r["config"]["model"] == "effnet-minilm" and r["config"]["data"]["dataset"] == "fashion-mnist"
    assert (out / "demo.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(r["examples"]) == 8
    for e in r["examples"]:
        assert (out / "examples").joinpath(e["image"].rsplit("/", 1)[-1]).is_file()
        names = [c["class"] for c in r["per_class"]]  # per class index, with its name
        assert e["true"] in names and e["adapted"] in names
    assert (out / "adapter" / "blocklora_adapter.safetensors").is_file() and (out / "split.json").is_file()


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
    assert main(["predict", "--adapter", str(out / "adapter"), str(out / "examples"), "--topk", "2", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert len(rows) == 8 and all(len(row["top"]) == 2 for row in rows)


def test_demo_defaults():
    cfg = demo_config()
    assert (cfg.data.shots, cfg.train.iters, cfg.eval.limit) == (SHOTS, ITERS, TEST_IMAGES)
    assert cfg.adapter.method == "block_lora" and cfg.adapter.n_blocks == 8
