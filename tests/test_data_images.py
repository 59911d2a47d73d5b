"""ImageDataset and verify_images on real (tiny) image files, including broken ones."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from blocklora.data import ImageDataset, Item, verify_images
from blocklora.errors import DataError
from data_trees import write_image


def to_tensor(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(image, dtype=np.float32)).permute(2, 0, 1) / 255


def noisy_jpeg(size: int = 96) -> bytes:
    pixels = np.random.default_rng(0).integers(0, 256, (size, size, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "JPEG", quality=95)
    return buf.getvalue()


def test_image_dataset(tmp_path):
    a = write_image(tmp_path / "a.jpg", size=(7, 5))
    b = write_image(tmp_path / "b.png", color=(0, 255, 0), size=(4, 4))
    grey = tmp_path / "grey.png"
    Image.new("L", (3, 3), 128).save(grey)
    ds = ImageDataset([Item(str(a), 1), Item(str(b), 0), Item(str(grey), 2)], to_tensor)
    assert len(ds) == 3
    x, y = ds[1]
    assert y == 0 and x.shape == (3, 4, 4) and torch.allclose(x[1], torch.ones(4, 4))
    assert ds[2][0].shape == (3, 3, 3)  # grey -> RGB
    assert ds[0][0].shape == (3, 5, 7)
    image, label = ImageDataset([Item(str(a), 1)])[0]  # no transform: the PIL image
    assert isinstance(image, Image.Image) and image.mode == "RGB" and label == 1
    loader = DataLoader(ImageDataset([Item(str(b), 0)] * 2, to_tensor), batch_size=2)
    images, labels = next(iter(loader))
    assert images.shape == (2, 3, 4, 4) and labels.tolist() == [0, 0]


def test_image_dataset_custom_reader_and_errors(tmp_path):
    ds = ImageDataset([Item("k/1", 3)], to_tensor, reader=lambda key: Image.new("RGB", (2, 2)))
    assert ds[0][0].shape == (3, 2, 2) and ds[0][1] == 3
    (tmp_path / "bad.jpg").write_text("not an image")
    with pytest.raises(DataError, match=r"cannot read image .*bad\.jpg"):
        ImageDataset([Item(str(tmp_path / "bad.jpg"), 0)], to_tensor)[0]


def test_verify_images_finds_broken_files(tmp_path):
    good_jpg = tmp_path / "good.jpg"
    good_jpg.write_bytes(noisy_jpeg())
    good_png = write_image(tmp_path / "good.png")
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(noisy_jpeg()[: len(noisy_jpeg()) // 2])
    text = tmp_path / "notes.jpg"
    text.write_text("this is not an image")
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    missing = tmp_path / "missing.jpg"
    items = [Item(str(p), 0) for p in (good_jpg, truncated, good_png, text, empty, missing)] + [Item(str(text), 1)]
    bad = verify_images(items, workers=3)
    assert [p for p, _ in bad] == [str(truncated), str(text), str(empty), str(missing)]  # once each, in order
    reasons = dict(bad)
    assert "truncated" in reasons[str(truncated)]
    assert "cannot identify image file" in reasons[str(text)]
    assert reasons[str(missing)] == "file not found"
    assert verify_images([Item(str(good_jpg), 0)]) == []
    assert verify_images([]) == []


def test_verify_images_custom_reader():
    def reader(key: str) -> Image.Image:
        if key == "bad":
            raise DataError("no such key")
        return Image.new("RGB", (1, 1))

    assert verify_images([Item("ok", 0), Item("bad", 0)], reader) == [("bad", "no such key")]


def test_verify_images_is_fast(tmp_path):
    import time

    data = noisy_jpeg(64)
    paths = []
    for i in range(400):
        paths.append(tmp_path / f"{i}.jpg")
        paths[-1].write_bytes(data)
    t = time.perf_counter()
    assert verify_images([Item(str(p), 0) for p in paths]) == []
    assert time.perf_counter() - t < 5
