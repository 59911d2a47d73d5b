"""The benchmark readers: CoOp's datasets read through Kaiyang Zhou's split files, FGVC-Aircraft, ImageNet and its
four domain-shift test sets (data/datasets.py describes each layout and the peers' readers it follows).

Their images are read with decode.open_benchmark_image: the stored pixels, no EXIF transposition, as CoOp, CLIP-LoRA
and open_clip read them, so accuracies stay comparable with the published ones."""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import DataError
from .decode import open_benchmark_image
from .layout import (
    COOP_DATASETS_MD,
    TEMPLATES,
    dataset_dir,
    distinct_images,
    first_missing_image,
    is_image,
    load_json,
    prompt_name,
    read_lines,
    scan_classes,
    short,
    subfolders,
)
from .types import DatasetSplits, Item


@dataclass(frozen=True)
class ZhouSpec:
    """Where a dataset read through a Zhou split file lives, inside root."""

    folders: tuple[str, ...]  # the dataset folder's names: CoOp's first, then CLIP-LoRA's
    images: str  # the folder the split's paths are relative to, inside the dataset folder ("" = that folder)
    split_file: str


ZHOU = {
    "caltech101": ZhouSpec(("caltech-101", "Caltech101"), "101_ObjectCategories", "split_zhou_Caltech101.json"),
    "oxford_pets": ZhouSpec(("oxford_pets", "OxfordPets"), "images", "split_zhou_OxfordPets.json"),
    "stanford_cars": ZhouSpec(("stanford_cars", "StanfordCars"), "", "split_zhou_StanfordCars.json"),
    "oxford_flowers": ZhouSpec(("oxford_flowers", "Flower102"), "jpg", "split_zhou_OxfordFlowers.json"),
    "food101": ZhouSpec(("food-101", "Food101"), "images", "split_zhou_Food101.json"),
    "sun397": ZhouSpec(("sun397", "SUN397"), "SUN397", "split_zhou_SUN397.json"),
    "dtd": ZhouSpec(("dtd", "DTD"), "images", "split_zhou_DescribableTextures.json"),
    "eurosat": ZhouSpec(("eurosat",), "2750", "split_zhou_EuroSAT.json"),
    "ucf101": ZhouSpec(("ucf101", "UCF101"), "UCF-101-midframes", "split_zhou_UCF101.json"),
}


@dataclass(frozen=True)
class VariantSpec:
    """An ImageNet domain-shift test set: dataset folder names (CoOp's first) and, inside, the image folder."""

    folders: tuple[str, ...]
    images: tuple[str, ...]  # candidates inside the dataset folder ("" = the dataset folder itself)
    numbered: bool = False  # class folders are 0..999 (ImageNetV2) instead of wnids
    subset: bool = False  # only some of the 1000 classes: relabelled 0..n-1 (ImageNet-A, -R)


VARIANTS = {
    "imagenet_v2": VariantSpec(("imagenetv2", "imagenet_v2", "imagenet-v2"),
                               ("imagenetv2-matched-frequency-format-val",), numbered=True),
    "imagenet_sketch": VariantSpec(("imagenet-sketch", "imagenet_sketch"), ("images", "sketch", "")),
    "imagenet_a": VariantSpec(("imagenet-adversarial", "imagenet-a", "imagenet_a"), ("imagenet-a", ""), subset=True),
    "imagenet_r": VariantSpec(("imagenet-rendition", "imagenet-r", "imagenet_r"), ("imagenet-r", ""), subset=True),
}

@dataclass
class ImageNetVariantSplits(DatasetSplits):
    """An ImageNet test set whose label i is ImageNet class imagenet_indices[i] (of the 1000, sorted-wnid order)."""

    imagenet_indices: list[int] = field(default_factory=list)


def imagenet_indices(splits: DatasetSplits) -> list[int] | None:
    """For ImageNet and its variants: each label's index among the 1000 ImageNet classes; None for other datasets."""
    if isinstance(splits, ImageNetVariantSplits):
        return list(splits.imagenet_indices)
    if splits.name == "imagenet":
        return list(range(len(splits.classnames)))
    return None


# -- Zhou split files ------------------------------------------------------------------------------------------------
def _zhou_entry(entry: object) -> tuple[str, int, str] | None:
    if not isinstance(entry, (list, tuple)) or len(entry) != 3:
        return None
    path, label, classname = entry
    if not isinstance(path, str) or not path or not isinstance(classname, str) or isinstance(label, bool):
        return None
    try:
        label = int(label)  # CoOp: int(label)
    except (TypeError, ValueError):
        return None
    return (path, label, classname) if label >= 0 else None


def read_zhou(key: str, root: Path) -> DatasetSplits:
    spec = ZHOU[key]
    ddir = dataset_dir(root, key, spec.folders, marker=spec.split_file)
    split_path = ddir / spec.split_file
    if not split_path.is_file():
        raise DataError(f"split file {split_path} is missing: download {spec.split_file} from the links in CoOp's "
                        f"DATASETS.md ({COOP_DATASETS_MD}) and put it there")
    image_dir = ddir / spec.images if spec.images else ddir
    if not image_dir.is_dir():
        raise DataError(f"{key}: image folder {image_dir} is missing: the paths in {spec.split_file} are relative "
                        f"to it; extract the images there as CoOp's DATASETS.md shows ({COOP_DATASETS_MD})")
    data = load_json(split_path, "split file")
    if not isinstance(data, dict):
        raise DataError(f"split file {split_path} is not a Zhou split (a JSON object with train, val and test "
                        f"lists): download it again ({COOP_DATASETS_MD})")
    names: dict[int, str] = {}
    parts: dict[str, list[Item]] = {}
    for part in ("train", "val", "test"):
        entries = data.get(part)
        if not isinstance(entries, list):
            raise DataError(f'split file {split_path} has no "{part}" list: download it again ({COOP_DATASETS_MD})')
        items = []
        for i, entry in enumerate(entries):
            parsed = _zhou_entry(entry)
            if parsed is None:
                raise DataError(f"split file {split_path}: entry {part}[{i}] = {short(entry)} is not "
                                "[relative path, label >= 0, class name]: the file is damaged, download it again")
            rel, label, classname = parsed
            names.setdefault(label, classname)  # train first: CoOp names the classes from its training set
            items.append(Item(os.path.join(str(image_dir), rel), label))
        parts[part] = items
    if not names:
        raise DataError(f"split file {split_path} has no entries: download it again ({COOP_DATASETS_MD})")
    missing = [y for y in range(max(names) + 1) if y not in names]
    if missing:
        raise DataError(f"split file {split_path}: no entry has label {missing[0]} ({len(missing)} labels of "
                        f"0..{max(names)} unused): the file is damaged, download it again")
    bad = first_missing_image(parts)
    if bad:
        raise DataError(f"{key}: image {bad[1]} (first {bad[0]} entry of {spec.split_file}) does not exist: the "
                        f"split's paths are relative to {image_dir}; extract the images there")
    classnames = [prompt_name(names[y]) for y in range(len(names))]
    return DatasetSplits(key, ddir, classnames, parts["train"], parts["val"], parts["test"], TEMPLATES[key],
                         open_benchmark_image)


# -- FGVC-Aircraft ---------------------------------------------------------------------------------------------------
def read_fgvc(key: str, root: Path) -> DatasetSplits:
    ddir = dataset_dir(root, key, ("fgvc_aircraft",), marker="variants.txt",
                        layout=" (the data/ folder of fgvc-aircraft-2013b.tar.gz, renamed)")
    files = [ddir / "variants.txt"] + [ddir / f"images_variant_{p}.txt" for p in ("train", "val", "test")]
    missing = [f for f in files if not f.is_file()]
    if missing:
        more = f" (and {len(missing) - 1} more of its 4 list files)" if len(missing) > 1 else ""
        raise DataError(f"{key}: {missing[0]} is missing{more}: these files come in the data/ folder of "
                        f"fgvc-aircraft-2013b.tar.gz; move that folder to {root / 'fgvc_aircraft'} "
                        f"({COOP_DATASETS_MD})")
    image_dir = ddir / "images"
    if not image_dir.is_dir():
        raise DataError(f"{key}: image folder {image_dir} is missing: it comes in the data/ folder of "
                        f"fgvc-aircraft-2013b.tar.gz ({COOP_DATASETS_MD})")
    classnames = [line.strip() for line in read_lines(files[0], key) if line.strip()]
    if not classnames:
        raise DataError(f"{key}: {files[0]} lists no variants: the file is damaged, extract it again")
    label_of = {c: i for i, c in enumerate(classnames)}
    parts: dict[str, list[Item]] = {}
    for part, path in zip(("train", "val", "test"), files[1:]):
        items = []
        for lineno, line in enumerate(read_lines(path, key), 1):
            fields = line.strip().split(" ")  # "<image id> <variant name with spaces>", split as CoOp does
            if not fields[0]:
                continue
            variant = " ".join(fields[1:])
            if variant not in label_of:
                what = "has no variant" if len(fields) < 2 else f"names variant {variant!r}, not in variants.txt"
                raise DataError(f"{key}: {path} line {lineno} {what}: expected '<image id> <variant>' lines")
            items.append(Item(os.path.join(str(image_dir), fields[0] + ".jpg"), label_of[variant]))
        parts[part] = items
    bad = first_missing_image(parts)
    if bad:
        raise DataError(f"{key}: image {bad[1]} (first line of images_variant_{bad[0]}.txt) does not exist: "
                        f"extract the images to {image_dir}")
    return DatasetSplits(key, ddir, [prompt_name(c) for c in classnames], parts["train"], parts["val"],
                         parts["test"], TEMPLATES[key], open_benchmark_image)


# -- ImageNet and its variants ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _ImageNetTable:
    wnids: list[str]  # ImageNet index order (sorted wnids)
    names: dict[str, str]
    source: str


def _read_classnames_txt(path: Path) -> dict[str, str]:
    names: dict[str, str] = {}
    for lineno, line in enumerate(read_lines(path, "imagenet"), 1):
        fields = line.strip().split(" ")  # "<wnid> <class name with spaces>", split as CoOp's read_classnames does
        if not fields[0]:
            continue
        if len(fields) < 2:
            raise DataError(f"{path} line {lineno} is {line.strip()!r}: expected '<wnid> <class name>' lines such "
                            "as 'n01440764 tench'")
        names[fields[0]] = " ".join(fields[1:])
    if not names:
        raise DataError(f"{path} is empty: expected '<wnid> <class name>' lines ({COOP_DATASETS_MD})")
    return names


def _packaged_wnids() -> list[str] | None:
    """The 1000 ImageNet wnids in index (sorted) order, from timm's package data (read without importing timm)."""
    try:
        spec = importlib.util.find_spec("timm")
    except (ImportError, ValueError):
        return None
    for location in (spec.submodule_search_locations or []) if spec else []:
        path = Path(location) / "data" / "_info" / "imagenet_synsets.txt"
        if path.is_file():
            wnids = path.read_text().split()
            return wnids if len(wnids) == 1000 else None
    return None


def _imagenet_table(candidates: Sequence[Path]) -> _ImageNetTable:
    """wnid -> class name from the first classnames.txt among `candidates`, else CLIP's names from open_clip."""
    for path in candidates:
        if path.is_file():
            names = _read_classnames_txt(path)
            return _ImageNetTable(sorted(names), names, str(path))
    wnids = _packaged_wnids()
    if wnids is None:
        raise DataError(f"ImageNet class names not found: put classnames.txt at {candidates[0]} (link in CoOp's "
                        f"DATASETS.md, {COOP_DATASETS_MD})")
    from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES  # CLIP's names, in sorted-wnid order

    return _ImageNetTable(wnids, dict(zip(wnids, IMAGENET_CLASSNAMES)), "open_clip's IMAGENET_CLASSNAMES")


def _unknown_wnid(folder: Path, table: _ImageNetTable) -> DataError:
    return DataError(f"class folder {folder} is not an ImageNet class of {table.source}: remove it, or add a line "
                     f"'{folder.name} <class name>' to classnames.txt")


def read_imagenet(key: str, root: Path) -> DatasetSplits:
    ddir = dataset_dir(root, key, ("imagenet",), layout=(
        f" (expected {root}/imagenet/images/{{train,val}}/<wnid>/ as CoOp or {root}/imagenet/{{train,val}}/<wnid>/ "
        "as CLIP-LoRA)"))
    base = next((b for b in (ddir / "images", ddir) if (b / "train").is_dir() or (b / "val").is_dir()), None)
    if base is None:
        raise DataError(f"imagenet: {ddir / 'images' / 'train'} (CoOp's layout) or {ddir / 'train'} (CLIP-LoRA's) "
                        f"is missing: extract the ImageNet train and val sets there, one folder per wnid "
                        f"({COOP_DATASETS_MD})")
    for part in ("train", "val"):
        if not (base / part).is_dir():
            raise DataError(f"imagenet: {base / part} is missing: extract the ImageNet {part} set there, one folder "
                            f"per wnid ({COOP_DATASETS_MD})")
    wnids = subfolders(base / "train")
    if not wnids:
        with os.scandir(base / "train") as it:
            tars = sum(1 for e in it if e.is_file() and e.name.endswith(".tar"))
        unpack = (f" ({tars} .tar files there: the official training archive holds one tar per class; extract "
                  "each n*.tar into train/<wnid>/)" if tars else "")
        raise DataError(f"imagenet: {base / 'train'} has no class folders: expected one folder per wnid "
                        f"(n01440764/, ...){unpack}")
    table = _imagenet_table([ddir / "classnames.txt"])
    for w in wnids:
        if w not in table.names:
            raise _unknown_wnid(base / "train" / w, table)
    labels = {w: i for i, w in enumerate(wnids)}  # CoOp: enumerate(sorted train folders)
    _check_val_sorted(base / "val")
    for w in subfolders(base / "val"):
        if w not in labels:
            raise DataError(f"imagenet: class folder {base / 'val' / w} has no train folder {base / 'train' / w}: "
                            "the train and val sets must have the same classes")
    real: dict[str, str] = {}
    names = [prompt_name(table.names[w]) for w in wnids]
    parts = distinct_images({"train": scan_classes(base / "train", labels, key, real),
                             "test": scan_classes(base / "val", labels, key, real)}, real, names, key)
    return DatasetSplits(key, ddir, names, parts["train"], [], parts["test"], TEMPLATES[key],
                         open_benchmark_image)


def _check_val_sorted(val: Path) -> None:
    """The official ILSVRC2012 validation archive unpacks flat (val/ILSVRC2012_val_00000001.JPEG, ...); both peers
    read val/<wnid>/ folders. Flat, it would read as zero test images: say how to sort it instead."""
    with os.scandir(val) as it:
        flat = sum(1 for e in it if e.is_file() and is_image(e.name))
    if flat and not subfolders(val):
        raise DataError(
            f"imagenet: {val} holds {flat} images directly instead of one folder per wnid (the official validation "
            "archive's flat layout): sort them into val/<wnid>/ class folders first, using each image's label from "
            "the devkit's ILSVRC2012_validation_ground_truth.txt (ILSVRC2012_devkit_t12.tar.gz); torchvision does "
            "it: put ILSVRC2012_img_val.tar and ILSVRC2012_devkit_t12.tar.gz in a folder and run "
            "torchvision.datasets.ImageNet(folder, split='val'), then use its val/ folder")


def _find_variant(root: Path, spec: VariantSpec) -> tuple[Path, Path] | None:
    """(dataset folder, image folder): the first candidate that holds class folders."""
    for name in spec.folders:
        for sub in spec.images:
            cand = root / name / sub if sub else root / name
            if cand.is_dir() and subfolders(cand):
                return root / name, cand
    return None


def read_variant(key: str, root: Path) -> DatasetSplits:
    spec = VARIANTS[key]
    found = _find_variant(root, spec)
    if found is None:
        coop = root / spec.folders[0] / spec.images[0] if spec.images[0] else root / spec.folders[0]
        inner = "" if "" in spec.images else spec.images[0]
        plain = " or ".join(str(root / n / inner) if inner else str(root / n) for n in spec.folders[1:])
        raise DataError(f"{key}: no class folders in {coop} (CoOp's layout) or {plain}: download it as CoOp's "
                        f"DATASETS.md says ({COOP_DATASETS_MD}) and put it there")
    ddir, image_dir = found
    table = _imagenet_table([ddir / "classnames.txt", root / "imagenet" / "classnames.txt"])
    index = {w: i for i, w in enumerate(table.wnids)}
    folders = subfolders(image_dir)
    if spec.numbered:  # ImageNetV2: folder i holds ImageNet class i
        for f in folders:
            if not f.isdigit() or int(f) >= len(table.wnids):
                raise DataError(f"{key}: folder {image_dir / f} is not a class index 0..{len(table.wnids) - 1}: "
                                "remove it")
        labels = {f: int(f) for f in folders}
        kept = table.wnids
    else:
        for f in folders:
            if f not in index:
                raise _unknown_wnid(image_dir / f, table)
        if spec.subset:  # A, R: the classes present, relabelled 0..n-1 in ImageNet order (CoOp: sorted folders)
            kept = folders
            labels = {w: i for i, w in enumerate(folders)}
        else:  # Sketch: all 1000 ImageNet labels
            kept = table.wnids
            labels = {w: index[w] for w in folders}
    real: dict[str, str] = {}
    test = scan_classes(image_dir, labels, key, real)
    names = [prompt_name(table.names[w]) for w in kept]
    test = distinct_images({"test": test}, real, names, key)["test"]
    return ImageNetVariantSplits(key, ddir, names, [], [], test,
                                 TEMPLATES[key], open_benchmark_image, imagenet_indices=[index[w] for w in kept])


