"""The other evaluation protocols end to end on tiny-clip and generated data: base-to-new (CoCoOp's rule),
cross-dataset and domain generalization (`train --eval-datasets`, `eval --dataset a,b`), and their summary tables."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from blocklora.cli.main import main
from data_trees import make_class_tree, make_imagenet, make_zhou, write_classnames
from gen_data import make_folder_dataset

FAST = ["--model", "tiny-clip", "--pretrained", "none", "--iters", "30", "--batch-size", "8", "--workers", "0",
        "--lr", "1e-2"]
DG = ["imagenet_v2", "imagenet_sketch", "imagenet_a", "imagenet_r"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("runs")


@pytest.fixture(scope="module")
def base_to_new(tmp_path_factory, runs):
    # 5 classes, sorted: black_cat blue_sky green_leaf | red_apple yellow_sun (base = the first ceil(5/2) = 3)
    root = make_folder_dataset(tmp_path_factory.mktemp("b2n") / "colours", n_classes=5, train_per_class=4,
                               test_per_class=3)
    out = runs / "colours_base"
    assert main(["train", *FAST, "--shots", "2", "--dataset", "folder", "--root", str(root), "--classes", "base",
                 "--output", str(out)]) == 0
    return root, out


def test_base_to_new_follows_cocoop(base_to_new, capsys):
    root, out = base_to_new
    r = json.loads((out / "results.json").read_text())
    b, n = r["base_top1"], r["new_top1"]
    assert r["top1"] == b and r["harmonic_mean"] == pytest.approx(2 * b * n / (b + n), abs=1e-3)
    assert r["dataset"]["classes"] == 3 and r["dataset"]["classes_subset"] == "base" and r["n_test"] == 9
    split = json.loads((out / "split.json").read_text())
    assert split["classnames"] == ["black cat", "blue sky", "green leaf"]
    assert {label for _, label in split["train"]} == {0, 1, 2}
    assert all(path.split("/")[1] in ("black_cat", "blue_sky", "green_leaf") for path, _ in split["train"])
    capsys.readouterr()
    # the same adapter, evaluated by hand on the new half: the run's new_top1 (the text side encodes the new names)
    assert main(["eval", "--adapter", str(out / "adapter"), "--dataset", "folder", "--root", str(root),
                 "--classes", "new", "--workers", "0", "--json"]) == 0
    new = json.loads(capsys.readouterr().out)
    assert new["top1"] == n and new["n"] == 6
    assert [(c["index"], c["class"]) for c in new["per_class"]] == [(0, "red apple"), (1, "yellow sun")]


@pytest.fixture(scope="module")
def imagenet_tree(tmp_path_factory) -> Path:
    """ImageNet (3 classes) with its four domain-shift test sets and two other datasets, in their usual layouts."""
    root = tmp_path_factory.mktemp("benchmark")
    wnids = ["n01440764", "n01443537", "n01484850"]
    make_imagenet(root, wnids=wnids, n_train=4, n_val=2)
    write_classnames(root / "imagenet" / "classnames.txt")  # 5 wnids: the "1000" classes of this tree
    make_class_tree(root / "imagenetv2" / "imagenetv2-matched-frequency-format-val", {"0": 2, "2": 1, "4": 1})
    make_class_tree(root / "imagenet-sketch" / "images", {"n01443537": 2, "n01491361": 1}, ext=".JPEG")
    make_class_tree(root / "imagenet-adversarial" / "imagenet-a", {"n01494475": 1, "n01443537": 2})
    make_class_tree(root / "imagenet-rendition" / "imagenet-r", {"n01440764": 2, "n01484850": 1})
    for key in ("caltech101", "dtd"):
        make_zhou(root, key)
    return root


@pytest.fixture(scope="module")
def imagenet_run(imagenet_tree, runs):
    out = runs / "imagenet"
    assert main(["train", *FAST, "--shots", "2", "--dataset", "imagenet", "--root", str(imagenet_tree),
                 "--output", str(out), "--eval-datasets", ",".join(["caltech101", "dtd", *DG])]) == 0
    return out


def test_cross_dataset_and_domain_generalization(imagenet_tree, imagenet_run, capsys):
    r = json.loads((imagenet_run / "results.json").read_text())
    assert list(r["cross_dataset"]) == ["caltech101", "dtd", *DG]
    assert r["config"]["eval"]["datasets"] == ["caltech101", "dtd", *DG]
    detail = r["cross_dataset_detail"]
    # each target scored over its own classes: A and R over the classes they cover (200 of 1000 in the real sets)
    assert {k: (v["classes"], v["n"]) for k, v in detail.items()} == {
        "caltech101": (3, 9), "dtd": (3, 9), "imagenet_v2": (5, 4), "imagenet_sketch": (5, 3),
        "imagenet_a": (2, 3), "imagenet_r": (2, 3)}
    assert all(0 <= v <= 100 for v in r["cross_dataset"].values())
    capsys.readouterr()
    # `blocklora eval` with the same adapter gives the same numbers
    assert main(["eval", "--adapter", str(imagenet_run / "adapter"), "--dataset", "imagenet_a,dtd", "--root",
                 str(imagenet_tree), "--workers", "0", "--json"]) == 0
    got = {x["dataset"]: x["top1"] for x in json.loads(capsys.readouterr().out)}
    assert got == {"imagenet_a": r["cross_dataset"]["imagenet_a"], "dtd": r["cross_dataset"]["dtd"]}


def test_unknown_eval_dataset_fails_before_writing(imagenet_tree, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", *FAST, "--dataset", "imagenet", "--root", str(imagenet_tree), "--output", str(out),
                 "--eval-datasets", "dtd,oxford_pets"]) == 2
    err = capsys.readouterr().err
    assert "eval dataset oxford_pets" in err and str(imagenet_tree / "oxford_pets") in err
    assert not out.exists()


def test_summary_has_the_protocol_columns(runs, base_to_new, imagenet_run):
    assert main(["summarize", str(runs), "--no-plot"]) == 0
    md = (runs / "summary.md").read_text()
    assert "## Base-to-new" in md and "| colours |" in md
    assert "## Cross-dataset" in md and "| imagenet (2) |" in md
    dg_header = next(line for line in md.splitlines() if line.startswith("| source") and "imagenet_v2" in line)
    assert dg_header.split(" | ")[2:] == [*DG, "average |"]
    with open(runs / "summary.csv") as fh:
        rows = {row["dataset"]: row for row in csv.DictReader(fh)}
    r = json.loads((imagenet_run / "results.json").read_text())
    assert float(rows["imagenet"]["2-shot -> imagenet_r"]) == pytest.approx(r["cross_dataset"]["imagenet_r"])
    b = json.loads((base_to_new[1] / "results.json").read_text())
    assert float(rows["colours"]["2-shot HM"]) == pytest.approx(b["harmonic_mean"])
    assert rows["colours"]["2-shot mean"] == ""  # a base-to-new run is not an all-classes result
