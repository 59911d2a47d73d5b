"""The data types every reader returns and the engine consumes."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class Item:
    """One labelled image. `path` is absolute (readers resolve it against their root)."""

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
