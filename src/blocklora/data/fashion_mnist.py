"""Fashion-MNIST (Xiao et al. 2017): 60,000 train + 10,000 test 28x28 grey images of 10 clothing classes, MIT.

The one real image data set this project can have offline (Debian package `dataset-fashion-mnist`, which puts
the four idx files in /usr/share/datasets/fashion-mnist). Read from any folder holding
{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz], from torchvision's layout (ROOT/FashionMNIST/raw), or, where a
network exists and `root` was given, downloaded there by torchvision.

Images stay in memory as one uint8 array per split (47 MB for train + test); Item.path is a key "train/123" or
"test/45" (the index in the original file), and DatasetSplits.image_reader turns a key into an RGB PIL image
(28x28, grey copied to three channels; the transforms resize it). There is no official validation split:
`val` is empty (few-shot validation, if wanted, is sampled from train by the caller).

Inversion (on by default, `invert=False` gives the files' pixels): the data set's authors negated the product
photos' intensities when they made it (light garment on black, like MNIST). The reader undoes that, so images look
like what they were, a dark garment on a white background, which is what ImageNet-trained models know: zero-shot
with effnet-minilm on the first 2,000 test images rises from 0.21 to 0.25 (128 px) and from 0.21 to 0.30 (224 px).

Class names: the data set's own labels made prompt-friendly ("T-shirt/top" -> "t-shirt", "Trouser" ->
"trouser", "Ankle boot" -> "ankle boot", ...: lower case, singular, no slash), in label order 0..9.
"""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np
from PIL import Image

from ..errors import DataError
from ..reading import open_regular
from .types import DatasetSplits, Item

DEFAULT_ROOT = Path("/usr/share/datasets/fashion-mnist")
CLASSNAMES = ["t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot"]
TEMPLATE = "a photo of a {}."
FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
INSTALL_HINT = ("install it with `apt-get install dataset-fashion-mnist` (as root), or pass --root to a folder "
                "with the four idx files")


def _find(folder: Path, stem: str) -> Path | None:
    for name in (stem + ".gz", stem):  # torchvision keeps both the .gz and the extracted file
        if (folder / name).is_file():
            return folder / name
    return None


def _folder_with_files(root: Path) -> Path | None:
    """The folder under `root` holding all four idx files: root itself or torchvision's FashionMNIST/raw."""
    for folder in (root, root / "FashionMNIST" / "raw", root / "raw"):
        if all(_find(folder, stem) for pair in FILES.values() for stem in pair):
            return folder
    return None


def read_idx(path: Path) -> np.ndarray:
    """An idx file (LeCun's MNIST format, optionally gzipped) as a uint8 array of its stated shape."""
    try:
        with open_regular(path) as raw:  # a FIFO or device by that name is refused, never blocked on
            data = gzip.GzipFile(fileobj=raw).read() if path.suffix == ".gz" else raw.read()
    except (OSError, EOFError) as e:
        raise DataError(f"cannot read {path}: {e}; the file is damaged, reinstall or download it again") from None
    if len(data) < 8 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise DataError(f"{path} is not an idx file of unsigned bytes (bad magic number)")
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim))
    offset = 4 + 4 * ndim
    if len(data) - offset != int(np.prod(shape)):
        raise DataError(f"{path} is truncated: header says {shape}, the file holds {len(data) - offset} values")
    return np.frombuffer(data, dtype=np.uint8, offset=offset).reshape(shape)


def _network_reachable(host: str = "fashion-mnist.s3-website.eu-central-1.amazonaws.com", timeout: float = 3.0) -> bool:
    import socket

    try:
        with socket.create_connection((host, 80), timeout=timeout):
            return True
    except OSError:
        return False


def _download(root: Path) -> None:
    """torchvision's downloader (checksummed) into ROOT/FashionMNIST/raw."""
    from torchvision.datasets import FashionMNIST

    try:
        FashionMNIST(str(root), train=True, download=True)
        FashionMNIST(str(root), train=False, download=True)
    except Exception as e:  # noqa: BLE001 - network and disk errors: one line, with the way out
        raise DataError(f"cannot download Fashion-MNIST into {root}: {str(e).splitlines()[0][:160]}; "
                        f"{INSTALL_HINT}") from None


class ArrayImages:
    """Item.path key ("train/123") -> RGB PIL image, from in-memory uint8 arrays. Picklable for loader workers."""

    def __init__(self, arrays: dict[str, np.ndarray], invert: bool = True) -> None:
        self.arrays, self.invert = arrays, invert

    def __call__(self, key: str) -> Image.Image:
        split, _, index = key.partition("/")
        try:
            pixels = self.arrays[split][int(index)]
        except (KeyError, ValueError, IndexError):
            raise DataError(f"no Fashion-MNIST image {key!r}: keys are train/0..59999 and test/0..9999") from None
        return Image.fromarray(255 - pixels if self.invert else pixels).convert("RGB")


def load(root: str | os.PathLike | None = None, download: bool = True, invert: bool = True) -> DatasetSplits:
    """Fashion-MNIST from `root` (default $BLOCKLORA_FASHION_MNIST, else /usr/share/datasets/fashion-mnist), images
    dark-on-white unless `invert`
    is False. If the files are not there and `root` was given, torchvision downloads them into it where a network
    exists."""
    if root is None and os.environ.get("BLOCKLORA_FASHION_MNIST"):  # where scripts/get_fashion_mnist.sh points
        root = os.environ["BLOCKLORA_FASHION_MNIST"]
    given = root is not None
    root = Path(root).expanduser() if given else DEFAULT_ROOT
    folder = _folder_with_files(root)
    if folder is None and given and download and _network_reachable():
        _download(root)
        folder = _folder_with_files(root)
    if folder is None:
        raise DataError(f"Fashion-MNIST not found in {root} (need {FILES['train'][0]}.gz and the three other idx "
                        f"files): {INSTALL_HINT}")
    arrays: dict[str, np.ndarray] = {}
    items: dict[str, list[Item]] = {}
    for split, (images_stem, labels_stem) in FILES.items():
        images = read_idx(_find(folder, images_stem))
        labels = read_idx(_find(folder, labels_stem))
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise DataError(f"{folder}: {images_stem} {images.shape} and {labels_stem} {labels.shape} do not pair up")
        if labels.size and int(labels.max()) >= len(CLASSNAMES):
            raise DataError(f"{folder / labels_stem}: label {int(labels.max())} outside 0..{len(CLASSNAMES) - 1}")
        arrays[split] = images
        items[split] = [Item(f"{split}/{i}", int(y)) for i, y in enumerate(labels)]
    return DatasetSplits(name="fashion-mnist", root=folder, classnames=list(CLASSNAMES), train=items["train"],
                         val=[], test=items["test"], template=TEMPLATE, image_reader=ArrayImages(arrays, invert))
