"""Images for the model: a torch Dataset over Items, and a fast check that every image decodes."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor

from PIL import Image
from torch.utils.data import Dataset

from ..errors import DataError
from .types import Item, open_image_file

CHUNK = 4096  # images handed to the thread pool at a time (bounds the number of pending futures)


class ImageDataset(Dataset):
    """Items -> (transform(image), label); images are read with `reader` (DatasetSplits.image_reader)."""

    def __init__(self, items: Sequence[Item], transform: Callable | None = None,
                 reader: Callable[[str], Image.Image] = open_image_file) -> None:
        self.items = list(items)
        self.transform = transform
        self.reader = reader

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int):
        item = self.items[index]
        try:
            image = self.reader(item.path)
        except DataError:
            raise
        except (OSError, ValueError, SyntaxError) as e:  # PIL raises these for missing, corrupt and truncated files
            raise DataError(f"cannot read image {item.path}: {_reason(e)}") from None
        return (self.transform(image) if self.transform is not None else image), item.label


def _reason(e: BaseException) -> str:
    if isinstance(e, FileNotFoundError):
        return "file not found"
    text = str(e).splitlines()[0] if str(e) else ""
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def _decode_file(path: str) -> Image.Image:
    """open_image_file without the RGB copy: a full decode is all a check needs."""
    with Image.open(path) as image:
        image.load()
        return image


def _check(reader: Callable[[str], Image.Image], path: str) -> str | None:
    """None if the image decodes completely, else why not."""
    try:
        image = _decode_file(path) if reader is open_image_file else reader(path)
        image.load()  # readers may return lazily loaded images; force the full decode
        if image.width < 1 or image.height < 1:
            return "empty image"
    except Exception as e:  # noqa: BLE001 - any failure to decode is a finding, not a crash
        return _reason(e)
    return None


def verify_images(items: Iterable[Item], reader: Callable[[str], Image.Image] = open_image_file,
                  workers: int | None = None) -> list[tuple[str, str]]:
    """(path, reason) for every image that cannot be fully decoded: missing, not an image, corrupt or truncated.

    Each distinct path is decoded once, in a thread pool (PIL releases the GIL while decoding); the result follows
    the order of first appearance. PIL's ImageFile.LOAD_TRUNCATED_IMAGES, if a program sets it, hides truncation."""
    paths = list(dict.fromkeys(i.path for i in items))
    if not paths:
        return []
    workers = workers or min(32, (os.cpu_count() or 1) + 4)
    bad: list[tuple[str, str]] = []
    with ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="verify-images") as pool:
        for start in range(0, len(paths), CHUNK):
            chunk = paths[start:start + CHUNK]
            for path, why in zip(chunk, pool.map(lambda p: _check(reader, p), chunk)):
                if why is not None:
                    bad.append((path, why))
    return bad
