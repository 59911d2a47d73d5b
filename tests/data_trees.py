"""Tiny dataset trees in the exact on-disk layouts of the benchmark datasets (written independently of the readers,
from CoOp's DATASETS.md and docs/protocol.md), for the data tests."""

from __future__ import annotations

import json
from pathlib import Path

from PIL import Image

# key -> (CoOp folder, CLIP-LoRA folder, image folder inside it, split file)
ZHOU_LAYOUT = {
    "caltech101": ("caltech-101", "Caltech101", "101_ObjectCategories", "split_zhou_Caltech101.json"),
    "oxford_pets": ("oxford_pets", "OxfordPets", "images", "split_zhou_OxfordPets.json"),
    "stanford_cars": ("stanford_cars", "StanfordCars", "", "split_zhou_StanfordCars.json"),
    "oxford_flowers": ("oxford_flowers", "Flower102", "jpg", "split_zhou_OxfordFlowers.json"),
    "food101": ("food-101", "Food101", "images", "split_zhou_Food101.json"),
    "sun397": ("sun397", "SUN397", "SUN397", "split_zhou_SUN397.json"),
    "dtd": ("dtd", "DTD", "images", "split_zhou_DescribableTextures.json"),
    "eurosat": ("eurosat", "eurosat", "2750", "split_zhou_EuroSAT.json"),
    "ucf101": ("ucf101", "UCF101", "UCF-101-midframes", "split_zhou_UCF101.json"),
}

ZHOU_CLASSES = ["golden_retriever", "Sea or Lake", "abbey"]  # an underscore name, a name with spaces
ZHOU_COUNTS = {"train": 4, "val": 2, "test": 3}  # per class

WNIDS = {"n01440764": "tench", "n01443537": "goldfish", "n01484850": "great white shark",
         "n01491361": "tiger shark", "n01494475": "hammerhead shark"}


def write_image(path: Path, color: tuple[int, int, int] = (200, 30, 30), size: tuple[int, int] = (6, 5)) -> Path:
    """A tiny real image; the format follows the extension (JPEG, PNG, ...)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)
    return path


def make_zhou(root: Path, key: str, scheme: str = "coop", classes: list[str] = ZHOU_CLASSES,
              counts: dict[str, int] = ZHOU_COUNTS) -> dict:
    """A Zhou-split dataset under root; returns what the reader should find."""
    coop, cliplora, images, split_file = ZHOU_LAYOUT[key]
    ddir = root / (coop if scheme == "coop" else cliplora)
    image_dir = ddir / images if images else ddir
    split: dict[str, list] = {}
    for part, n in counts.items():
        entries = []
        for j in range(n):  # interleaved classes, as the real files are not sorted by label
            for y, name in enumerate(classes):
                rel = f"{name.replace(' ', '')}/{part}_{j:03d}.jpg"
                write_image(image_dir / rel, color=(40 * y, 10 * j, 90))
                entries.append([rel, y, name])
        split[part] = entries
    ddir.mkdir(parents=True, exist_ok=True)
    (ddir / split_file).write_text(json.dumps(split, indent=4))
    return {"dir": ddir, "image_dir": image_dir, "split_file": ddir / split_file, "split": split}


FGVC_VARIANTS = ["707-320", "A300B4", "F-16A/B"]


def make_fgvc(root: Path, per_class: dict[str, int] = ZHOU_COUNTS) -> Path:
    ddir = root / "fgvc_aircraft"
    (ddir / "images").mkdir(parents=True, exist_ok=True)
    (ddir / "variants.txt").write_text("".join(v + "\n" for v in FGVC_VARIANTS))
    image_id = 1000000
    for part, n in per_class.items():
        lines = []
        for _ in range(n):
            for variant in FGVC_VARIANTS:
                image_id += 1
                write_image(ddir / "images" / f"{image_id}.jpg")
                lines.append(f"{image_id} {variant}\n")
        (ddir / f"images_variant_{part}.txt").write_text("".join(lines))
    return ddir


def write_classnames(path: Path, wnids: dict[str, str] = WNIDS) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{w} {n}\n" for w, n in sorted(wnids.items())))
    return path


def make_imagenet(root: Path, layout: str = "coop", wnids: list[str] | None = None, n_train: int = 6,
                  n_val: int = 2, classnames: bool = True) -> Path:
    """root/imagenet/images/{train,val}/<wnid>/ (coop) or root/imagenet/{train,val}/<wnid>/ (clip-lora)."""
    ddir = root / "imagenet"
    base = ddir / "images" if layout == "coop" else ddir
    for w in wnids or list(WNIDS)[:3]:
        for j in range(n_train):
            write_image(base / "train" / w / f"{w}_{j}.JPEG")
        for j in range(n_val):
            write_image(base / "val" / w / f"ILSVRC2012_val_{w}_{j}.JPEG")
    if classnames:
        write_classnames(ddir / "classnames.txt")
    return ddir


def make_class_tree(folder: Path, counts: dict[str, int], ext: str = ".jpg") -> None:
    """folder/<class>/<i><ext> for each class."""
    for name, n in counts.items():
        (folder / name).mkdir(parents=True, exist_ok=True)
        for j in range(n):
            write_image(folder / name / f"{j}{ext}")
