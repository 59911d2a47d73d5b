"""Evaluation protocols on top of a dataset: base-to-new class splits (CoCoOp).

CoCoOp's rule (KaiyangZhou/CoOp datasets/oxford_pets.py, OxfordPets.subsample_classes): sort the labels, base = the
first ceil(C / 2), new = the rest; the kept classes are relabelled 0..m-1 in label order and every split is filtered.
CoCoOp subsamples after drawing the shots from all classes; to reproduce its base-class draws exactly, draw on the
full dataset and pass the result through subsample_fewshot (drawing on the base half alone consumes the random
stream differently whenever groups of both halves interleave, and in clip-lora order always).
"""

from __future__ import annotations

import math
import typing
from dataclasses import replace

from ..choices import ClassSubset
from ..errors import ConfigError
from .fewshot import FewShotSplit
from .types import DatasetSplits, Item

CLASS_SUBSETS = typing.get_args(ClassSubset)


def class_subset(n_classes: int, subset: str) -> list[int]:
    """The original labels kept by `subset`: "all", "base" (first ceil(C/2) sorted labels) or "new" (the rest)."""
    if subset not in CLASS_SUBSETS:
        raise ConfigError(f"unknown class subset {subset!r}: use one of {', '.join(CLASS_SUBSETS)}")
    labels = list(range(n_classes))
    m = math.ceil(n_classes / 2)
    return labels if subset == "all" else labels[:m] if subset == "base" else labels[m:]


def _relabel(items: list[Item], mapping: dict[int, int]) -> list[Item]:
    return [Item(i.path, mapping[i.label]) for i in items if i.label in mapping]


def check_classes(splits: DatasetSplits, what: str, subset: str = "all") -> None:
    """Raise a ConfigError unless the whole dataset `splits` has at least 2 classes or, for a class subset (subset =
    "base" or "new", the base-to-new protocol), each half has: with 1 class, classification is trivially 100%."""
    n = len(splits.classnames)
    if subset in ("base", "new"):
        m = math.ceil(n / 2)
        if n - m < 2:
            raise ConfigError(f"base-to-new needs at least 2 classes on each side, and {splits.name} has {n} "
                              f"({m} base, {n - m} new): use data.classes=all, or a dataset with 4 classes or more")
    elif n < 2:
        raise ConfigError(f"{what} needs at least 2 classes, and {splits.name} has {n}: add classes")


def subsample_classes(splits: DatasetSplits, subset: str) -> DatasetSplits:
    """The dataset restricted to the base or new half of its classes, relabelled 0..m-1 ("all": unchanged)."""
    kept = class_subset(len(splits.classnames), subset)
    if subset == "all":
        return splits
    mapping = {old: new for new, old in enumerate(kept)}
    changes = dict(classnames=[splits.classnames[y] for y in kept], train=_relabel(splits.train, mapping),
                   val=_relabel(splits.val, mapping), test=_relabel(splits.test, mapping))
    indices = getattr(splits, "imagenet_indices", None)  # ImageNet variants: keep the map to the 1000 classes
    if indices:
        changes["imagenet_indices"] = [indices[y] for y in kept]
    return replace(splits, **changes)


def subsample_fewshot(fewshot: FewShotSplit, n_classes: int, subset: str) -> FewShotSplit:
    """A split drawn on all `n_classes` classes, restricted and relabelled as subsample_classes does (CoCoOp order)."""
    kept = class_subset(n_classes, subset)
    if subset == "all":
        return fewshot
    mapping = {old: new for new, old in enumerate(kept)}
    return replace(fewshot, train=_relabel(fewshot.train, mapping), val=_relabel(fewshot.val, mapping))


def evenly_spaced(items: list[Item], limit: int | None) -> list[Item]:
    """A fixed subset of `limit` items spread evenly through `items` (all of them when limit is None or larger).

    Index floor(i * len / limit) for i < limit: deterministic, independent of any seed, and class-balanced when
    the list is sorted by class (as the folder readers produce it) or shuffled (as Fashion-MNIST's test file is).
    """
    if limit is None or limit >= len(items):
        return list(items)
    return [items[i * len(items) // limit] for i in range(limit)]


def limit_split(splits: DatasetSplits, split: str, limit: int | None) -> DatasetSplits:
    """`splits` with its `split` ("test" or "val") cut to evenly_spaced(limit)."""
    return replace(splits, **{split: evenly_spaced(getattr(splits, split), limit)}) if limit is not None else splits
