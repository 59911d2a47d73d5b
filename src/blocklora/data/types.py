"""The data types every reader returns and the engine consumes."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from .decode import open_benchmark_image, open_image_file

__all__ = ["DatasetSplits", "Item", "open_benchmark_image", "open_image_file"]


@dataclass(frozen=True)
class Item:
    """One labelled image. `path` is absolute for file-based datasets (readers resolve it against their root);
    datasets that hold images in arrays use their own keys (e.g. "train/123") and set DatasetSplits.image_reader."""

    path: str
    label: int


@dataclass
class DatasetSplits:
    """A dataset as read from disk: class names (index = label) and its train / val / test items."""

    name: str
    root: Path
    classnames: list[str]
    train: list[Item]
    val: list[Item] = field(default_factory=list)
    test: list[Item] = field(default_factory=list)
    template: str = "a photo of a {}."  # the per-dataset hand-made zero-shot template (CoOp)
    # Item.path -> RGB PIL image: open_image_file for users' data (EXIF orientation applied), open_benchmark_image for
    # the benchmark readers (stored pixels, as the peers), or a reader of images held in arrays (Fashion-MNIST)
    image_reader: Callable[[str], Image.Image] = open_image_file
    # a folder dataset whose test split was held out of its class folders (--test-fraction): {"test_fraction",
    # "seed", "layout"}, recorded in results.json; None: the dataset's own test split
    held_out: dict | None = None
