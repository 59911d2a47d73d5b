"""Dataset readers: CoOp's 11 few-shot benchmark datasets, ImageNet's four domain-shift test sets, and custom data.

    load_dataset(key, root) -> DatasetSplits          DATASETS: the known keys

The readers of the benchmark layouts are in data/benchmarks.py, those of custom data here, what they share (folder
scans, list and JSON files, CoOp's templates) in data/layout.py.

`root` is the folder that holds the dataset folders (CoOp's $DATA; a Zhou-split dataset's own folder is accepted
too), or the CSV file for key "csv". Both folder-naming schemes in use are read: CoOp's (caltech-101, oxford_pets,
stanford_cars, oxford_flowers, food-101, fgvc_aircraft, sun397, dtd, eurosat, ucf101) and CLIP-LoRA's (Caltech101,
OxfordPets, StanfordCars, Flower102, Food101, fgvc_aircraft, SUN397, DTD, eurosat, UCF101).

What is read, as the peers' readers do (checked against KaiyangZhou/CoOp datasets/*.py and MaxZanella/CLIP-LoRA
datasets/*.py):
- Nine datasets come with Kaiyang Zhou's split file split_zhou_<Name>.json: {"train"|"val"|"test": [[path relative
  to the dataset's image folder, label, class name], ...]}; labels are int(label); class names come from the entries
  (train first: CoOp's lab2cname reads them from the training set). One small spec per dataset (ZHOU) says where
  the dataset folder, its image folder and its split file are.
- fgvc_aircraft: variants.txt (one class name a line, label = line index) and images_variant_{train,val,test}.txt
  ("<image id> <variant name>" lines), images/<id>.jpg.
- imagenet: images/{train,val}/<wnid>/ (CoOp) or {train,val}/<wnid>/ (CLIP-LoRA); labels = index of the wnid among
  the sorted train folders; test = the val folder (both peers test on it); no val split (CLIP-LoRA draws its val
  shots from train, CoOp uses the test set as val). Files in a class folder are read in sorted order (torchvision
  ImageFolder's order, from which CLIP-LoRA samples; CoOp lists them with os.listdir, whose order depends on the file
  system); hidden files and other extensions than IMAGE_EXTENSIONS are skipped.
- imagenet_v2 (imagenetv2-matched-frequency-format-val/<0..999>/), imagenet_sketch (images/<wnid>/), imagenet_a and
  imagenet_r (<wnid>/ folders for 200 of the 1000 classes): test-only sets. v2 and sketch keep the 1000 ImageNet
  labels; A and R are labelled 0..199 in ImageNet (sorted-wnid) order with those 200 class names, and
  `imagenet_indices(splits)` gives each label's index among the 1000 ImageNet classes.
- ImageNet class names: from classnames.txt ("<wnid> <name>" lines, CoOp's file, copied from CLIP) in the dataset's
  folder or, for the variants, in root/imagenet/; without one, CLIP's curated names as open_clip ships them
  (open_clip.zero_shot_metadata.IMAGENET_CLASSNAMES), which are in the standard ImageNet index order = sorted-wnid
  order, matched to wnids through timm's packaged list of the 1000 sorted wnids (timm is a dependency of open_clip).

Class names are stored ready for prompts: "_" becomes a space (CoOp and CLIP-LoRA replace it when building prompts).
Each dataset carries CoOp's hand-made zero-shot template (TEMPLATES).

Custom data:
- "folder": root/train/<class>/<images>, root/test/<class>/<images>, optional root/val/<class>/<images> (searched
  recursively, in sorted order); classes = the sorted train folder names. torchvision's flat ImageFolder layout
  root/<class>/<images> (or root/train/<class>/ without test/) is read with `test_fraction` F (--test-fraction):
  each class keeps round(F x n) of its n images (at least 1, at most n - 1) as its test set, drawn by
  random.Random("blocklora-test/<class folder>").sample over the sorted files, so the split is the same on every
  machine and for every --seed (the K-shot draw varies with the seed, the test set does not) and a class's split
  does not move when another class is added. Without F such a folder is refused with the layout to use.
- Class names: a folder dataset's names are its folder names ("_" -> space) unless root holds classnames.txt (one
  name a line in sorted folder order, or CoOp's "<folder> <name>" lines) or classnames.json ({"<folder>": name}),
  data/classnames.py.
- "csv": root is a CSV file with header columns path,label,split (label = a class name, split = train|val|test, paths
  relative to the CSV's folder); classes = the sorted distinct labels. A row repeated exactly is read once (counted in
  a warning); an image listed with two labels or in two splits is an error.
- "fashion-mnist": data/fashion_mnist.py.
"""

from __future__ import annotations

import csv
import difflib
import logging
import os
import random
from collections.abc import Callable
from pathlib import Path

from ..errors import DataError
from ..reading import open_text
from .benchmarks import VARIANTS, ZHOU, read_fgvc, read_imagenet, read_variant, read_zhou
from .classnames import class_names
from .layout import (
    DEFAULT_TEMPLATE,
    distinct_images,
    existing_root,
    is_image,
    prompt_name,
    real_path,
    scan_classes,
    subfolders,
)
from .types import DatasetSplits, Item

log = logging.getLogger("blocklora")

DATASETS = ["imagenet", *ZHOU, "fgvc_aircraft", *VARIANTS, "folder", "csv", "fashion-mnist"]
ALIASES = {"fgvc": "fgvc_aircraft", "fashion_mnist": "fashion-mnist", "imagenetv2": "imagenet_v2",
           "imagenet-sketch": "imagenet_sketch", "imagenet-a": "imagenet_a", "imagenet-r": "imagenet_r"}


def load_dataset(key: str, root: str | os.PathLike | None, test_fraction: float | None = None) -> DatasetSplits:
    """Read dataset `key` (one of DATASETS) under `root`; every user-fixable problem raises a one-line DataError.
    `test_fraction`: a folder dataset without a test/ split holds out this fraction of each class (module docstring);
    refused for every other dataset."""
    name = ALIASES.get(key, key)
    if test_fraction is not None and name != "folder":
        raise DataError(f"--test-fraction (data.test_fraction) splits a folder dataset without a test/ folder; "
                        f"dataset {key} has its own test split: drop the option")
    if name == "fashion-mnist":
        from .fashion_mnist import load as load_fashion_mnist

        return load_fashion_mnist(root if root not in (None, "") else None)
    reader = _READERS.get(name)
    if reader is None:
        close = difflib.get_close_matches(key, DATASETS, n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        raise DataError(f"unknown dataset {key!r}{hint}: use one of {', '.join(DATASETS)}")
    if name == "folder":
        return _read_folder(name, existing_root(name, root), test_fraction)
    return reader(name, existing_root(name, root))


# -- custom data -----------------------------------------------------------------------------------------------------
TEST_SEED = "blocklora-test/{}"  # the held-out draw's per-class seed (random.Random(str): the same on every machine)


def _holds_images(folder: Path) -> bool:
    """Whether a class folder candidate holds an image file at its top (a quick look, not a full scan)."""
    with os.scandir(folder) as it:
        return any(is_image(e.name) for e in it if not e.is_dir())


def _read_folder(key: str, root: Path, test_fraction: float | None = None) -> DatasetSplits:
    if not root.is_dir():
        raise DataError(f"folder dataset: root {root} is not a folder: pass the folder holding train/ and test/ "
                        "(or use --dataset csv for a CSV file)")
    layout = f"{root}/train/<class>/<images> and {root}/test/<class>/<images> (optional {root}/val/<class>/...)"
    has_train, has_test = (root / "train").is_dir(), (root / "test").is_dir()
    if has_train and has_test:
        if test_fraction is not None:
            raise DataError(f"folder dataset: {root} has train/ and test/: its test/ is the test set; drop "
                            "--test-fraction (it splits a flat folder {root}/<class>/<images>)")
    elif has_train or (not has_test and subfolders(root)):  # train/ alone, or torchvision's flat ImageFolder
        # a flat folder may have a class named "train" (trains, in a vehicles dataset): images, no class folders
        flat = not has_train or (not subfolders(root / "train") and _holds_images(root / "train"))
        return _read_held_out(key, root, root if flat else root / "train", test_fraction)
    for part in ("train", "test"):
        if not (root / part).is_dir():
            raise DataError(f"folder dataset: {root / part} is missing: expected {layout}")
    classes = subfolders(root / "train")
    if not classes:
        raise DataError(f"folder dataset: {root / 'train'} has no class folders: expected {layout}")
    labels = {c: i for i, c in enumerate(classes)}
    parts: dict[str, list[Item]] = {}
    real: dict[str, str] = {}
    for part in ("train", "val", "test"):
        folder = root / part
        if not folder.is_dir():
            parts[part] = []
            continue
        for c in subfolders(folder):
            if c not in labels:
                raise DataError(f"folder dataset: class folder {folder / c} has no train folder {root / 'train' / c}:"
                                " every class needs training images")
        parts[part] = scan_classes(folder, labels, "folder dataset", real)
    names = class_names(root, classes, "folder dataset")
    parts = distinct_images(parts, real, names, f"folder dataset {root}")
    return DatasetSplits(root.name, root, names, parts["train"], parts["val"], parts["test"], DEFAULT_TEMPLATE)


def _read_held_out(key: str, root: Path, folder: Path, test_fraction: float | None) -> DatasetSplits:
    """A folder of class folders without a test split (`folder` = root or root/train): each class's test images
    drawn by test_fraction (module docstring); root/val/<class>/ stays the val split when there is one."""
    classes = subfolders(folder)
    if folder == root and not any(_holds_images(root / c) or subfolders(root / c) for c in classes):
        classes = []
    where = f"{root}/<class>/<images>" if folder == root else f"{root}/train/<class>/<images> ({root / 'test'} is " \
        "missing)"
    nested = [c for c in classes if folder == root and (root / c / "train").is_dir()]
    if nested:  # the folder above a dataset: point at the dataset
        raise DataError(f"folder dataset: {root} holds the dataset folder {root / nested[0]} (it has train/): pass "
                        f"--root {root / nested[0]}")
    if test_fraction is None:
        shown = f" ({len(classes)} class folders: {', '.join(classes[:3])}{', ...' if len(classes) > 3 else ''})" \
            if classes else ""
        raise DataError(f"folder dataset: {root} is laid out as {where}{shown}, with no test split: pass "
                        "--test-fraction 0.2 to hold out a seeded, recorded 20% of each class as the test set, or "
                        f"lay it out as {root}/train/<class>/<images> and {root}/test/<class>/<images>")
    if not classes:
        raise DataError(f"folder dataset: {folder} has no class folders: expected {where}")
    labels = {c: i for i, c in enumerate(classes)}
    real: dict[str, str] = {}
    every = scan_classes(folder, labels, "folder dataset", real)
    parts: dict[str, list[Item]] = {"train": [], "val": [], "test": []}
    for c, label in labels.items():
        files = [i for i in every if i.label == label]
        if len(files) < 2:
            raise DataError(f"folder dataset: class folder {folder / c} has {len(files)} image: holding out a test "
                            "set needs at least 2 images per class (one to train on, one to test)")
        n_test = min(len(files) - 1, max(1, round(test_fraction * len(files))))
        test = set(random.Random(TEST_SEED.format(c)).sample(range(len(files)), n_test))
        parts["train"] += [i for j, i in enumerate(files) if j not in test]
        parts["test"] += [i for j, i in enumerate(files) if j in test]
    if folder != root and (root / "val").is_dir():
        parts["val"] = scan_classes(root / "val", labels, "folder dataset", real)
    names = class_names(root, classes, "folder dataset")
    parts = distinct_images(parts, real, names, f"folder dataset {root}")
    return DatasetSplits(root.name, root, names, parts["train"], parts["val"], parts["test"], DEFAULT_TEMPLATE,
                         held_out={"test_fraction": test_fraction, "seed": TEST_SEED.format("<class folder>"),
                                   "layout": where})


CSV_COLUMNS = ("path", "label", "split")


def _csv_rows(path: Path) -> list[tuple[int, str, str, str]]:
    """(line number, path, class name, split) of each data row; the header is line 1."""
    rows = []
    with open_text(path, encoding="utf-8-sig", newline="") as f:  # a regular file only: a FIFO would block
        reader = csv.DictReader(f)
        header = [h.strip() for h in (reader.fieldnames or [])]
        missing = [c for c in CSV_COLUMNS if c not in header]
        if missing:
            raise DataError(f"csv dataset {path} line 1: header {','.join(header) or '(empty)'} lacks column "
                            f"{missing[0]!r}: the first line must name the columns {','.join(CSV_COLUMNS)}")
        twice = next((c for c in CSV_COLUMNS if header.count(c) > 1), None)
        if twice:  # DictReader would silently take the last of them
            raise DataError(f"csv dataset {path} line 1: header {','.join(header)} names column {twice!r} "
                            f"{header.count(twice)} times: keep one {twice!r} column")
        reader.fieldnames = header
        while True:
            try:
                row = next(reader)
            except StopIteration:
                break
            except csv.Error as e:  # raised before the reader counts the offending line
                raise DataError(f"csv dataset {path} line {reader.line_num + 1}: {e}") from None
            line = reader.line_num
            extra = row.pop(None, None) or []
            if extra or any(v is None for v in row.values()):
                n = sum(v is not None for v in row.values()) + len(extra)
                raise DataError(f"csv dataset {path} line {line} has {n} fields, the header has {len(header)}: "
                                "fix the row (quote fields that contain commas)")
            file, label, split = (row[c].strip() for c in CSV_COLUMNS)
            if not file or not label:
                raise DataError(f"csv dataset {path} line {line}: empty {'path' if not file else 'label'}")
            if split not in ("train", "val", "test"):
                raise DataError(f"csv dataset {path} line {line}: split {split!r} is not one of train, val, test")
            rows.append((line, file, label, split))
    return rows


def _read_csv(key: str, path: Path) -> DatasetSplits:
    if path.is_dir():
        raise DataError(f"csv dataset: root {path} is a folder: pass the CSV file itself (columns "
                        f"{','.join(CSV_COLUMNS)}), or use --dataset folder")
    try:
        rows = _csv_rows(path)
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise DataError(f"csv dataset {path}: cannot read it: {e}") from None
    if not rows:
        raise DataError(f"csv dataset {path} has no rows after the header: add 'path,label,split' rows")
    in_train = {label for _, _, label, split in rows if split == "train"}
    for line, _, label, _ in rows:
        if label not in in_train:
            raise DataError(f"csv dataset {path} line {line}: class {label!r} has no train rows: every class "
                            "needs training images")
    classes = sorted(in_train)
    labels = {c: i for i, c in enumerate(classes)}
    base = path.parent
    parts: dict[str, list[Item]] = {"train": [], "val": [], "test": []}
    absent = []
    # image (its real path: a row naming a link to another row's image names that image) -> its first row
    first: dict[str, tuple[int, str, str, str]] = {}
    real_dirs: dict[str, str] = {}
    repeats = []
    for line, file, label, split in rows:
        full = os.path.normpath(os.path.join(str(base), file))
        key = real_path(full, real_dirs)
        if key in first:
            line0, label0, split0, full0 = first[key]
            alias = "" if full0 == full else f" (as {full0}: the same file by another name)"
            if (label0, split0) == (label, split):
                repeats.append((line, line0))
                continue  # the same row again: counted below, read once
            what = (f"labels it {label!r}, line {line0}{alias} {label0!r}" if label0 != label else
                    f"puts it in {split}, line {line0}{alias} in {split0} (an image in two splits leaks test data)")
            raise DataError(f"csv dataset {path} line {line}: image {full} is listed twice: this row {what}; keep "
                            "one row per image")
        first[key] = (line, label, split, full)
        if not os.path.exists(full):
            absent.append((line, full))
        parts[split].append(Item(full, labels[label]))
    if repeats:
        log.warning("warning: csv dataset %s: %d repeated row(s) read once (line %d repeats line %d, the same image "
                    "file)", path, len(repeats), *repeats[0])
    if absent:
        line, full = absent[0]
        raise DataError(f"csv dataset {path} line {line}: image {full} does not exist ({len(absent)} missing in all; "
                        f"paths are relative to {base})")
    return DatasetSplits(path.stem, base, [prompt_name(c) for c in classes], parts["train"], parts["val"],
                         parts["test"], DEFAULT_TEMPLATE)


_READERS: dict[str, Callable[[str, Path], DatasetSplits]] = {
    "imagenet": read_imagenet,
    **dict.fromkeys(ZHOU, read_zhou),
    "fgvc_aircraft": read_fgvc,
    **dict.fromkeys(VARIANTS, read_variant),
    "folder": _read_folder,
    "csv": _read_csv,
}
