"""`blocklora train` end to end on tiny-clip and generated data; eval, predict, export; truncation exactness."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from blocklora.cli.main import main
from conftest import make_hf_dir
from gen_data import make_folder_dataset

FAST = ["--model", "tiny-clip", "--pretrained", "none", "--shots", "8", "--iters", "60", "--batch-size", "16",
        "--workers", "0", "--lr", "1e-2"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = make_folder_dataset(tmp_path_factory.mktemp("data") / "colours")
    out = tmp_path_factory.mktemp("runs") / "run"
    assert main(["train", *FAST, "--dataset", "folder", "--root", str(root), "--output", str(out)]) == 0
    return root, out


def test_results_have_the_promised_keys(trained):
    _, out = trained
    r = json.loads((out / "results.json").read_text())
    for key in ("top1", "zero_shot_top1", "trainable_params", "split_sha256", "config", "wall_time_s", "peak_memory",
                "per_class", "mean_per_class"):
        assert key in r, key
    assert r["trainable_params"] == 1728 and r["iters"] == 60 and r["config"]["adapter"]["n_blocks"] == 8
    assert {p.name for p in out.iterdir()} >= {"results.json", "adapter", "split.json", "metrics.jsonl", "train.log",
                                               "config.json"}
    assert not (out / "checkpoint.pt").exists()
    import hashlib

    assert hashlib.sha256((out / "split.json").read_bytes()).hexdigest() == r["split_sha256"]
    steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [s["step"] for s in steps] == list(range(1, 61)) and all("loss" in s and "lr" in s for s in steps)


def test_training_learns(trained):
    _, out = trained
    r = json.loads((out / "results.json").read_text())
    assert r["top1"] >= r["zero_shot_top1"] + 20, r  # random tiny CLIP: learning shows up clearly


def test_eval_reproduces_top1(trained, capsys):
    root, out = trained
    capsys.readouterr()
    assert main(["eval", "--adapter", str(out / "adapter"), "--dataset", "folder", "--root", str(root),
                 "--workers", "0", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["top1"] == json.loads((out / "results.json").read_text())["top1"]


def test_predict(trained, capsys):
    root, out = trained
    capsys.readouterr()
    assert main(["predict", "--adapter", str(out / "adapter"), str(root / "test" / "red_apple"), "--json",
                 "--topk", "2"]) == 0
    rows = json.loads(capsys.readouterr().out)  # one JSON array
    assert len(rows) == 6 and all(len(r["top"]) == 2 for r in rows)
    assert all(abs(sum(t["prob"] for t in r["top"]) - 1) < 0.5 for r in rows)
    assert sum(r["top"][0]["class"] == "red apple" for r in rows) >= 3


def test_export_loads_into_stock_open_clip_and_predicts_the_same(trained, tmp_path):
    import open_clip

    from blocklora.backbones.openclip import TINY_CLIP
    from blocklora.pipeline.run import load_trained

    root, out = trained
    target = tmp_path / "merged.safetensors"
    assert main(["export", "--adapter", str(out / "adapter"), "--output", str(target)]) == 0
    stock = open_clip.CLIP(**TINY_CLIP)
    open_clip.load_checkpoint(stock, str(target), strict=True)
    stock.eval()
    backbone, _, _ = load_trained(out / "adapter", device="cpu")
    images = torch.randn(4, 3, 32, 32)
    tokens = backbone.tokenize(["a photo of a red apple.", "a photo of a blue sky."])
    with torch.no_grad():
        torch.testing.assert_close(stock.encode_image(images), backbone.encode_images(images), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(stock.encode_text(tokens), backbone.encode_texts(tokens), rtol=1e-4, atol=1e-5)
    assert main(["export", "--adapter", str(out / "adapter"), "--output", str(target)]) == 2  # no overwrite


def test_refuses_existing_output_and_split_file_reuse(trained, tmp_path):
    root, out = trained
    before = sorted(p.name for p in out.iterdir())
    assert main(["train", *FAST, "--dataset", "folder", "--root", str(root), "--output", str(out)]) == 2
    assert sorted(p.name for p in out.iterdir()) == before
    again = tmp_path / "again"
    assert main(["train", *FAST, "--iters", "2", "--dataset", "folder", "--root", str(root), "--output", str(again),
                 "--split-file", str(out / "split.json"), "--no-zero-shot"]) == 0
    a = json.loads((out / "results.json").read_text())["split_sha256"]
    b = json.loads((again / "results.json").read_text())["split_sha256"]
    assert a == b


def test_same_seed_same_adapter(tmp_path):
    from safetensors.torch import load_file

    root = make_folder_dataset(tmp_path / "d", n_classes=3, train_per_class=4, test_per_class=2)
    outs = []
    for name in ("a", "b"):
        out = tmp_path / name
        assert main(["train", *FAST, "--iters", "5", "--shots", "2", "--dataset", "folder", "--root", str(root),
                     "--output", str(out), "--no-zero-shot", "--deterministic"]) == 0
        outs.append(load_file(out / "adapter" / "blocklora_adapter.safetensors"))
    assert outs[0].keys() == outs[1].keys()
    assert all(torch.equal(outs[0][k], outs[1][k]) for k in outs[0])


def test_prompt_truncation_is_exact_open_clip():
    from blocklora.backbones import load_backbone

    b = load_backbone("tiny-clip")
    torch.manual_seed(0)
    with torch.no_grad():
        for p in b.model.parameters():
            p.add_(torch.randn_like(p) * 0.02)  # break symmetries of the init
    texts = ["a photo of a cat.", "a photo of a Welsh springer spaniel, a type of pet.", "dtd texture."]
    tokens = b.tokenize(texts)
    with torch.no_grad():
        full = b.model.encode_text(tokens)  # open_clip's own path: all 77 positions
        cut = b.encode_texts(tokens)
    torch.testing.assert_close(cut, full, rtol=1e-5, atol=1e-6)


def test_hf_backbone_from_local_dir_trains(tmp_path, capsys):
    from blocklora.backbones import load_backbone

    model_dir = make_hf_dir(tmp_path / "hf")
    b = load_backbone(f"hf:{model_dir}")
    texts = ["a photo of a cat.", "a photo of a very long name of a thing, a type of thing."]
    tokens = b.tokenize(texts)
    assert tokens["input_ids"].shape[1] < 77  # padded to the longest prompt only
    padded = b.tokenizer(texts, padding="max_length", max_length=77, return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(b.encode_texts(tokens), b.encode_texts(dict(padded)), rtol=1e-5, atol=1e-6)
    root = make_folder_dataset(tmp_path / "d", n_classes=3, train_per_class=4, test_per_class=3)
    out = tmp_path / "run"
    assert main(["train", "--model", f"hf:{model_dir}", "--dataset", "folder", "--root", str(root), "--shots", "2",
                 "--iters", "3", "--workers", "0", "--output", str(out)]) == 0
    export = tmp_path / "merged"
    assert main(["export", "--adapter", str(out / "adapter"), "--output", str(export)]) == 0
    from transformers import CLIPModel

    stock = CLIPModel.from_pretrained(export, local_files_only=True)
    assert (export / "tokenizer_config.json").exists() and stock.config.vision_config.image_size == 32


def test_missing_root_is_one_line_error(tmp_path, capsys):
    code = main(["train", *FAST, "--dataset", "oxford_pets", "--root", str(tmp_path / "nope"), "--output",
                 str(tmp_path / "out")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1].startswith("error:") and str(tmp_path / "nope") in err[-1]
    assert not (tmp_path / "out").exists()


def test_unknown_pretrained_tag_offline_is_fast_and_clear(tmp_path, capsys):
    import time

    t = time.perf_counter()
    code = main(["params", "--model", "ViT-B-32", "--pretrained", "openai"])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 2 and "pass the local file" in err and time.perf_counter() - t < 30
    assert Path(err) is not None
