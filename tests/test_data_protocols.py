"""Base-to-new class splits (CoCoOp's rule)."""

from __future__ import annotations

import math
import random
from pathlib import Path

import pytest

from blocklora.data import (
    DatasetSplits,
    Item,
    class_subset,
    imagenet_indices,
    load_dataset,
    sample_few_shot,
    subsample_classes,
    subsample_fewshot,
)
from blocklora.errors import ConfigError
from data_trees import make_class_tree, write_classnames


def five_classes() -> DatasetSplits:
    items = lambda part: [Item(f"/d/{part}/{y}_{j}.jpg", y) for j in range(3) for y in (4, 1, 0, 3, 2)]  # noqa: E731
    return DatasetSplits("five", Path("/d"), ["a", "b", "c", "d", "e"], items("train"), items("val"), items("test"),
                         "{} texture.")


def cocoop_subsample(items, labels_source, subsample):
    """CoOp's OxfordPets.subsample_classes, written out."""
    labels = sorted({item.label for item in labels_source})
    m = math.ceil(len(labels) / 2)
    selected = labels[:m] if subsample == "base" else labels[m:]
    relabeler = {y: y_new for y_new, y in enumerate(selected)}
    return [Item(i.path, relabeler[i.label]) for i in items if i.label in selected]


@pytest.mark.parametrize("which,names", [("base", ["a", "b", "c"]), ("new", ["d", "e"])])
def test_subsample_classes(which, names):
    d = five_classes()
    sub = subsample_classes(d, which)
    assert sub.classnames == names and sub.name == "five" and sub.template == "{} texture."
    for part in ("train", "val", "test"):
        assert getattr(sub, part) == cocoop_subsample(getattr(d, part), d.train, which)
    assert {i.label for i in sub.test} == set(range(len(names)))
    assert d.classnames == ["a", "b", "c", "d", "e"] and len(d.train) == 15  # the input is not modified


def test_all_and_errors():
    d = five_classes()
    assert subsample_classes(d, "all") is d
    assert class_subset(4, "base") == [0, 1] and class_subset(4, "new") == [2, 3] and class_subset(1, "new") == []
    with pytest.raises(ConfigError, match="unknown class subset 'old'"):
        subsample_classes(d, "old")


def test_subsample_fewshot_reproduces_cocoop_draw():
    """CoCoOp draws on all classes, then subsamples: the base half of that draw, relabelled."""
    d = five_classes()
    full = sample_few_shot(d, 2, 1, "coop")
    base = subsample_fewshot(full, len(d.classnames), "base")
    random.seed(1)
    assert base.train == cocoop_subsample(full.train, full.train, "base")
    assert base.val == cocoop_subsample(full.val, full.train, "base") and base.shots == 2


def test_subsample_keeps_imagenet_indices(tmp_path):
    make_class_tree(tmp_path / "imagenet-r", {"n01440764": 1, "n01484850": 1, "n01494475": 1})
    write_classnames(tmp_path / "imagenet" / "classnames.txt")
    r = load_dataset("imagenet_r", tmp_path)
    assert imagenet_indices(r) == [0, 2, 4]
    new = subsample_classes(r, "new")
    assert new.classnames == ["hammerhead shark"] and imagenet_indices(new) == [4]
    assert [i.label for i in new.test] == [0]
