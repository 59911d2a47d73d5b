"""Images for the model: a torch Dataset over Items, and checks that every image can be used.

`verify_images(items, level)` at three costs: "decode" decodes every image (the few training shots, each read many
times); "header" reads headers only (missing files, special files, non-images, bombs, unsupported modes; a test set
whose first decode would come after training); "file" only looks for a regular file (a test set whose first decode,
the evaluation pass, comes next anyway). The evaluation pass decodes each image once and reports every image it
cannot use (truncation included) through `ImageDataset(report=True)` instead of failing the pass.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch
from PIL import Image
from torch.utils.data import Dataset

from ..errors import DataError
from .decode import file_problem, header_problem, open_image_file, reads_files, reason, shape_problem
from .types import Item

CHUNK = 4096  # images handed to the thread pool at a time (bounds the number of pending futures)


class ImageDataset(Dataset):
    """Items -> (transform(image), label); images are read with `reader` (DatasetSplits.image_reader).

    An unreadable image raises DataError naming it; with report=True it yields (None, label, path, reason) instead
    of (image, label, path, None), and `collate_reported` drops it from the batch and lists it."""

    def __init__(self, items: Sequence[Item], transform: Callable | None = None,
                 reader: Callable[[str], Image.Image] = open_image_file, report: bool = False) -> None:
        self.items = list(items)
        self.transform = transform
        self.reader = reader
        self.report = report

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int):
        item = self.items[index]
        try:
            image = read_image(self.reader, item.path)
        except DataError as e:
            if not self.report:
                raise
            return None, item.label, item.path, str(e).removeprefix(f"cannot read image {item.path}: ")
        out = self.transform(image) if self.transform is not None else image
        return (out, item.label, item.path, None) if self.report else (out, item.label)


def collate_reported(batch: list[tuple[Any, int, str, str | None]]) -> tuple[torch.Tensor | None, torch.Tensor,
                                                                              list[tuple[str, str]]]:
    """(stacked images of the readable items or None, their labels, [(path, reason)] of the unreadable ones)."""
    good = [b for b in batch if b[3] is None]
    images = torch.stack([b[0] for b in good]) if good else None
    labels = torch.tensor([b[1] for b in good], dtype=torch.long)
    return images, labels, [(b[2], b[3]) for b in batch if b[3] is not None]


def read_image(reader: Callable[[str], Image.Image], path: str) -> Image.Image:
    """reader(path) with every failure as DataError("cannot read image PATH: reason"); an image no transform may
    resize (decode.shape_problem: a custom reader's too) is one."""
    try:
        image = reader(path)
    except DataError:
        raise
    except Exception as e:  # noqa: BLE001 - a custom reader's failure is a finding about that image
        raise DataError(f"cannot read image {path}: {reason(e)}") from None
    why = shape_problem(*image.size) if isinstance(image, Image.Image) else None
    if why:
        raise DataError(f"cannot read image {path}: {why}")
    return image


LEVELS = ("file", "header", "decode")
LEVEL_WORDS = {"file": "files", "header": "headers", "decode": "full decode"}
PROGRESS_FROM = 1000  # images: below this the check is over in a moment


def _check(reader: Callable[[str], Image.Image], path: str, level: str) -> str | None:
    """None if the image passes the check at `level`, else why not. Only "decode" applies to custom readers (images
    held in memory: reading one is the cheap part)."""
    if reads_files(reader) and level == "file":
        return file_problem(path)
    if reads_files(reader) and level == "header":
        return header_problem(path)
    if level != "decode":
        return None
    try:
        image = read_image(reader, path)
        image.load()  # readers may return lazily loaded images; force the full decode
    except DataError as e:
        return str(e).removeprefix(f"cannot read image {path}: ")
    return None


def verify_images(items: Iterable[Item], reader: Callable[[str], Image.Image] = open_image_file,
                  workers: int | None = None, level: str = "decode") -> list[tuple[str, str]]:
    """(path, reason) for every image that fails the check at `level` (see the module docstring): "file" finds
    missing and special files, "header" also non-images, too many pixels and unsupported modes, "decode" also
    corrupt and truncated files.

    Each distinct path is checked once, in a thread pool (PIL releases the GIL while decoding); the result follows
    the order of first appearance. PIL's ImageFile.LOAD_TRUNCATED_IMAGES, if a program sets it, hides truncation."""
    if level not in LEVELS:
        raise ValueError(f"level must be one of {', '.join(LEVELS)}, got {level!r}")
    paths = list(dict.fromkeys(i.path for i in items))
    if not paths:
        return []
    workers = workers or min(32, (os.cpu_count() or 1) + 4)
    bad: list[tuple[str, str]] = []
    # a bar on large sets (a decode pass over thousands of photos takes minutes on a CPU): say what is going on
    from ..engine.progress import progress

    bar = progress(total=len(paths), desc=f"check images ({LEVEL_WORDS[level]})", unit="image", leave=False,
                   disable=len(paths) < PROGRESS_FROM)
    with bar, ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="verify-images") as pool:
        for start in range(0, len(paths), CHUNK):
            chunk = paths[start:start + CHUNK]
            for path, why in zip(chunk, pool.map(lambda p: _check(reader, p, level), chunk)):
                if why is not None:
                    bad.append((path, why))
                bar.update(1)
    return bad
