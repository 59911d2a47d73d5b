"""Fashion-MNIST reader: the real files (Debian package dataset-fashion-mnist), torchvision's layout, bad files."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest

from blocklora import DataError
from blocklora.data import fashion_mnist as fm

REAL = fm.DEFAULT_ROOT
MISSING = f"Fashion-MNIST is not installed in {REAL} (apt-get install dataset-fashion-mnist)"
needs_real = pytest.mark.skipif(not (REAL / "t10k-labels-idx1-ubyte.gz").is_file(), reason=MISSING)


@pytest.fixture(scope="module")
def real():
    if not (REAL / "t10k-labels-idx1-ubyte.gz").is_file():
        pytest.skip(MISSING)
    return fm.load()


def _idx(path: Path, array: np.ndarray, compress: bool) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(n).to_bytes(4, "big") for n in array.shape)
    data = header + array.astype(np.uint8).tobytes()
    if compress:
        path = path.with_name(path.name + ".gz")
        data = gzip.compress(data)
    path.write_bytes(data)


def _write_small(folder: Path, n: int = 5, compress: bool = False) -> np.ndarray:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
    for img_stem, lab_stem in fm.FILES.values():
        _idx(folder / img_stem, images, compress)
        _idx(folder / lab_stem, np.arange(n) % 10, compress)
    return images


def test_real_files(real):
    assert real.name == "fashion-mnist" and real.classnames == fm.CLASSNAMES and len(real.classnames) == 10
    assert (len(real.train), len(real.val), len(real.test)) == (60_000, 0, 10_000)
    assert real.template == "a photo of a {}."
    assert real.train[123].path == "train/123" and real.test[45].path == "test/45"
    counts = np.bincount([it.label for it in real.test], minlength=10)
    assert counts.tolist() == [1000] * 10
    assert real.test[0].label == 9  # the first test image is an ankle boot
    image = real.image_reader("test/0")
    assert image.mode == "RGB" and image.size == (28, 28)


def test_inverted_by_default(real):
    raw = fm.ArrayImages(real.image_reader.arrays, invert=False)("train/7")  # what load(invert=False) reads
    inverted = real.image_reader("train/7")
    a, b = np.asarray(raw), np.asarray(inverted)
    assert np.array_equal(a.astype(int) + b.astype(int), np.full_like(a, 255, dtype=int))
    assert a[0, 0, 0] == 0 and b[0, 0, 0] == 255  # black background in the files, white after inversion


def test_bad_keys(real):
    with pytest.raises(DataError, match="no Fashion-MNIST image"):
        real.image_reader("test/10000")
    with pytest.raises(DataError, match="no Fashion-MNIST image"):
        real.image_reader("val/0")


@needs_real
def test_torchvision_layout(tmp_path):
    raw = tmp_path / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    for stems in fm.FILES.values():
        for stem in stems:
            (raw / f"{stem}.gz").symlink_to(REAL / f"{stem}.gz")
    data = fm.load(tmp_path, download=False)
    assert data.root == raw and len(data.test) == 10_000


def test_uncompressed_files(tmp_path):
    images = _write_small(tmp_path, compress=False)
    data = fm.load(tmp_path, download=False, invert=False)
    assert [it.label for it in data.train] == [0, 1, 2, 3, 4]
    assert np.array_equal(np.asarray(data.image_reader("train/3"))[:, :, 1], images[3])


def test_environment_variable_points_at_the_files(tmp_path, monkeypatch):
    _write_small(tmp_path, compress=False)
    monkeypatch.setenv("BLOCKLORA_FASHION_MNIST", str(tmp_path))
    assert fm.load(download=False).root == tmp_path


def test_missing_data_names_the_fix(tmp_path):
    with pytest.raises(DataError) as err:
        fm.load(tmp_path, download=False)
    msg = str(err.value)
    assert "\n" not in msg and "apt-get install dataset-fashion-mnist" in msg and "--root" in msg
    assert str(tmp_path) in msg


def test_damaged_files(tmp_path):
    _write_small(tmp_path, compress=True)
    labels = tmp_path / "t10k-labels-idx1-ubyte.gz"
    labels.write_bytes(gzip.compress(bytes([0, 0, 8, 1]) + (9).to_bytes(4, "big") + bytes(3)))
    with pytest.raises(DataError, match="truncated"):
        fm.load(tmp_path, download=False)
    labels.write_bytes(b"not gzip at all")
    with pytest.raises(DataError, match="cannot read"):
        fm.load(tmp_path, download=False)
    labels.write_bytes(gzip.compress(b"\x00\x00\x0d\x01" + bytes(8)))
    with pytest.raises(DataError, match="magic"):
        fm.load(tmp_path, download=False)
