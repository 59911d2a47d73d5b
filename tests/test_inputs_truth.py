"""Caches and files say what they hold: the zero-shot cache key, split files as the truth about a run, prompts cut
to the model's context, and an ImageNet val folder left flat."""

from __future__ import annotations

import json
import logging
import os

import pytest
import torch
from PIL import Image

from blocklora.backbones import load_backbone
from blocklora.cli.main import main
from blocklora.data import load_dataset
from blocklora.engine import evaluate as ev
from blocklora.engine.runtime import make_runtime
from conftest import make_hf_dir
from data_trees import make_imagenet
from gen_data import make_folder_dataset

TINY = ["--model", "tiny-clip", "--pretrained", "none", "--workers", "0"]


@pytest.fixture(scope="module")
def colours(tmp_path_factory):
    return make_folder_dataset(tmp_path_factory.mktemp("data") / "colours", n_classes=4, train_per_class=3,
                               test_per_class=2)


def test_the_zero_shot_key_covers_every_input(colours, tmp_path):
    data = load_dataset("folder", colours)
    gelu, quick = load_backbone("tiny-clip", "none", "no"), load_backbone("tiny-clip", "none", "yes")
    cpu, bf16 = make_runtime("cpu"), make_runtime("cpu", "bf16")
    key = lambda b=gelu, rt=cpu, split="test", items=data.test, t=("a photo of a {}.",): ev.zero_shot_key(  # noqa: E731
        b, rt, data, split, items, t)
    base = key()
    assert base == key()
    assert base != key(b=quick)  # same weights (fingerprint), other activation
    assert base != key(rt=bf16)  # other arithmetic
    assert base != key(split="val") and base != key(t=("{} texture.",)) and base != key(items=data.test[:-1])
    half = load_backbone("tiny-clip", "none", "no")
    half.cast_frozen(torch.bfloat16)
    assert half.fingerprint == gelu.fingerprint and base != key(b=half)  # same weights as loaded, stored in bf16
    image = data.test[0].path
    Image.new("RGB", (40, 40), (0, 0, 0)).save(image)  # replaced in place: same path, other content
    os.utime(image, ns=(1, 1))
    assert base != key()


def test_replaced_images_and_other_activation_are_recomputed(colours, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("BLOCKLORA_CACHE", str(tmp_path / "cache"))
    args = ["zeroshot", *TINY, "--dataset", "folder", "--root", str(colours), "--json"]

    def top1(*extra):
        capsys.readouterr()
        assert main([*args, *extra]) == 0
        return json.loads(capsys.readouterr().out)

    assert top1("--quick-gelu", "yes")["cached"] is False
    assert top1("--quick-gelu", "no")["cached"] is False  # the other activation is not served the first number
    assert top1("--quick-gelu", "no")["cached"] is True


def test_an_empty_split_is_an_error(colours, capsys):
    assert main(["zeroshot", *TINY, "--dataset", "folder", "--root", str(colours), "--split", "val"]) == 2
    assert "has no val images" in capsys.readouterr().err


def test_the_split_file_decides(colours, tmp_path, capsys):
    base = ["train", *TINY, "--root", str(colours), "--batch-size", "4", "--no-zero-shot"]
    first = tmp_path / "first"
    assert main([*base, "--dataset", "folder", "--shots", "1", "--seed", "3", "--classes", "base", "--iters", "2",
                 "--sampler", "coop", "--output", str(first)]) == 0
    reuse = tmp_path / "reuse"  # no --dataset, --shots, --seed, --sampler or --classes: all from the file
    assert main([*base, "--split-file", str(first / "split.json"), "--iters", "2", "--output", str(reuse)]) == 0
    r = json.loads((reuse / "results.json").read_text())
    assert (r["shots"], r["seed"], r["sampler"], r["dataset"]["name"], r["dataset"]["classes_subset"]) == \
        (1, 3, "coop", "colours", "base") and r["config"]["data"]["dataset"] == "folder"
    assert r["split_sha256"] == json.loads((first / "results.json").read_text())["split_sha256"]
    capsys.readouterr()
    for flag in (["--shots", "4"], ["--seed", "1"], ["--sampler", "clip-lora"], ["--classes", "all"]):
        assert main([*base, *flag, "--split-file", str(first / "split.json"), "--output", str(tmp_path / "x")]) == 2
        assert "the split file" in capsys.readouterr().err
        assert not (tmp_path / "x").exists()
    from blocklora.config.run_config import RunConfig
    from blocklora.pipeline.run import resolve

    cfg, _ = resolve(RunConfig().with_overrides([f"data.root={colours}", f"data.split_file={first / 'split.json'}"]))
    assert cfg.train.total_iters(cfg.data.shots) == 500  # the default schedule follows the file's K


@pytest.mark.parametrize("family", ["open_clip", "transformers"])
def test_long_prompts_are_cut_to_the_context_with_a_warning(family, tmp_path, caplog):
    backbone = load_backbone("tiny-clip", "none") if family == "open_clip" else \
        load_backbone(f"hf:{make_hf_dir(tmp_path / 'hf')}")  # its tokenizer sets no model_max_length
    long = "dog, " + " ".join(f"a very long descriptive phrase number {i}" for i in range(15))
    names = ["cat", long + " ending one", long + " ending two"]
    with caplog.at_level(logging.WARNING, logger="blocklora"):
        txt = ev.encode_classes(backbone, names, ["a photo of a {}."], make_runtime("cpu"))
    assert txt.shape[0] == 3 and torch.isfinite(txt).all()
    torch.testing.assert_close(txt[1], txt[2])  # cut to 77 tokens, the two long names are one prompt
    assert "1 class prompt(s) become identical" in caplog.text


def test_a_flat_imagenet_val_folder_says_how_to_sort_it(tmp_path):
    ddir = make_imagenet(tmp_path, "cliplora", ["n01440764", "n01443537"], n_train=1, n_val=0)
    val = ddir / "val"  # the official archive's layout: every image directly in val/
    val.mkdir()
    for i in (1, 2):
        Image.new("RGB", (4, 4)).save(val / f"ILSVRC2012_val_{i:08d}.JPEG")
    from blocklora.errors import DataError

    with pytest.raises(DataError, match="one folder per wnid.*ILSVRC2012_validation_ground_truth.txt"):
        load_dataset("imagenet", tmp_path)


def test_an_unextracted_imagenet_train_folder_says_how_to_extract_it(tmp_path):
    from blocklora.errors import DataError

    train = tmp_path / "imagenet" / "train"  # the official training archive: one tar per class
    train.mkdir(parents=True)
    (tmp_path / "imagenet" / "val").mkdir()
    for wnid in ("n01440764", "n01443537"):
        (train / f"{wnid}.tar").write_bytes(b"")
    with pytest.raises(DataError, match=r"2 \.tar files there.*extract each"):
        load_dataset("imagenet", tmp_path)
