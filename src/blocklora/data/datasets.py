"""Dataset readers: CoOp's 11 few-shot benchmark datasets, ImageNet's four domain-shift test sets, and custom data.

    load_dataset(key, root) -> DatasetSplits          DATASETS: the known keys

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
  recursively, in sorted order); classes = the sorted train folder names.
- "csv": root is a CSV file with header columns path,label,split (label = a class name, split = train|val|test, paths
  relative to the CSV's folder); classes = the sorted distinct labels. A row repeated exactly is read once (counted in
  a warning); an image listed with two labels or in two splits is an error.
- "fashion-mnist": data/fashion_mnist.py.
"""

from __future__ import annotations

import csv
import difflib
import importlib.util
import json
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import DataError
from .types import DatasetSplits, Item

log = logging.getLogger("blocklora")
COOP_DATASETS_MD = "https://github.com/KaiyangZhou/CoOp/blob/main/DATASETS.md"
# torchvision ImageFolder's extensions (matched case-insensitively), so folder scans list the files it lists
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
DEFAULT_TEMPLATE = "a photo of a {}."

# CoOp's per-dataset hand-made zero-shot templates (CLIP-LoRA trains and tests with "a photo of a {}." everywhere)
TEMPLATES = {
    "imagenet": "a photo of a {}.",
    "caltech101": "a photo of a {}.",
    "oxford_pets": "a photo of a {}, a type of pet.",
    "stanford_cars": "a photo of a {}.",
    "oxford_flowers": "a photo of a {}, a type of flower.",
    "food101": "a photo of {}, a type of food.",
    "fgvc_aircraft": "a photo of a {}, a type of aircraft.",
    "sun397": "a photo of a {}.",
    "dtd": "{} texture.",
    "eurosat": "a centered satellite photo of {}.",
    "ucf101": "a photo of a person doing {}.",
    "imagenet_v2": "a photo of a {}.",
    "imagenet_sketch": "a photo of a {}.",
    "imagenet_a": "a photo of a {}.",
    "imagenet_r": "a photo of a {}.",
}


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

DATASETS = ["imagenet", *ZHOU, "fgvc_aircraft", *VARIANTS, "folder", "csv", "fashion-mnist"]
ALIASES = {"fgvc": "fgvc_aircraft", "fashion_mnist": "fashion-mnist", "imagenetv2": "imagenet_v2",
           "imagenet-sketch": "imagenet_sketch", "imagenet-a": "imagenet_a", "imagenet-r": "imagenet_r"}


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


def load_dataset(key: str, root: str | os.PathLike | None) -> DatasetSplits:
    """Read dataset `key` (one of DATASETS) under `root`; every user-fixable problem raises a one-line DataError."""
    name = ALIASES.get(key, key)
    if name == "fashion-mnist":
        from .fashion_mnist import load as load_fashion_mnist

        return load_fashion_mnist(root if root not in (None, "") else None)
    reader = _READERS.get(name)
    if reader is None:
        close = difflib.get_close_matches(key, DATASETS, n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        raise DataError(f"unknown dataset {key!r}{hint}: use one of {', '.join(DATASETS)}")
    return reader(name, _existing_root(name, root))


# -- shared helpers --------------------------------------------------------------------------------------------------
def prompt_name(name: str) -> str:
    """A class name as it goes into prompts: "_" -> space (what CoOp and CLIP-LoRA do before formatting)."""
    return name.replace("_", " ").strip()


def _existing_root(key: str, root: str | os.PathLike | None) -> Path:
    what = {"csv": "the CSV file (columns path,label,split)",
            "folder": "the folder holding train/<class>/ and test/<class>/"}.get(
        key, f"the folder that holds the dataset folders (layouts: {COOP_DATASETS_MD})")
    if root is None or str(root) == "":
        raise DataError(f"no root given for dataset {key}: pass --root (data.root=...), {what}")
    path = Path(root).expanduser().absolute()
    if not path.exists():
        raise DataError(f"dataset root {path} does not exist: pass --root {what}")
    return path


def _dataset_dir(root: Path, key: str, folders: Sequence[str], marker: str | None = None, layout: str = "") -> Path:
    """root/<one of folders>; or root itself when it holds `marker` (the user pointed at the dataset's folder)."""
    for name in folders:
        if (root / name).is_dir():
            return root / name
    if marker and (root / marker).exists():
        return root
    if not root.is_dir():
        raise DataError(f"dataset root {root} is not a folder: pass the folder that holds the {key} folder")
    expected = " or ".join(str(root / n) for n in folders)
    raise DataError(f"{key}: dataset folder {expected} is missing{layout}: download it as CoOp's DATASETS.md says "
                    f"({COOP_DATASETS_MD}) and put it there")


def _is_image(name: str) -> bool:
    return not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)


def list_image_files(folder: str | os.PathLike) -> list[str]:
    """Image files under `folder`, recursively, in torchvision ImageFolder's order (sorted walk, sorted names).

    Symbolic links to folders are followed (datasets are often assembled from links), but each real folder is
    walked once: a link back to an ancestor (a -> .) would otherwise make the walk endless. A file name that is not
    valid UTF-8 is an error naming it (it could not be written to split files, JSON results or logs).
    """
    folder = Path(folder)
    out, seen = [], set()

    def real(path: str) -> tuple[int, int] | None:
        try:
            st = os.stat(path)
        except OSError:
            return None  # a broken link: os.walk skips it too
        return st.st_dev, st.st_ino

    seen.add(real(str(folder)))
    walk = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        keep = []
        for d in sorted(dirnames):
            key = real(os.path.join(dirpath, d))
            if key is not None and key not in seen:
                seen.add(key)
                keep.append(d)
        dirnames[:] = keep
        walk.append((dirpath, filenames))
    for dirpath, filenames in sorted(walk):
        if any(part.startswith(".") for part in Path(dirpath).relative_to(folder).parts):
            continue
        out += [os.path.join(dirpath, f) for f in sorted(filenames) if _is_image(f)]
    _check_utf8(out, folder)
    return out


def _check_utf8(paths: Sequence[str], folder: Path) -> None:
    """Names that are not valid UTF-8 (os.fsdecode turns their bytes into lone surrogates) are refused."""
    bad = []
    for p in paths:
        try:
            p.encode("utf-8")
        except UnicodeEncodeError:
            bad.append(p)
    if bad:
        shown = os.fsencode(bad[0]).decode("utf-8", "backslashreplace")
        raise DataError(f"file name {shown} is not valid UTF-8 ({len(bad)} such in {folder}): rename it (e.g. "
                        "convmv -f latin1 -t utf8 -r --notest FOLDER)")


def _subfolders(folder: Path) -> list[str]:
    with os.scandir(folder) as it:
        names = sorted(e.name for e in it if e.is_dir() and not e.name.startswith("."))
    _check_utf8([str(folder / n) for n in names], folder)
    return names


def _scan_classes(folder: Path, labels: dict[str, int], key: str) -> list[Item]:
    """Items of folder/<class>/... for the class folders named in `labels`; an empty class folder is an error."""
    items: list[Item] = []
    for name in _subfolders(folder):
        if name not in labels:
            continue
        files = list_image_files(folder / name)
        if not files:
            raise DataError(f"{key}: class folder {folder / name} has no images ({', '.join(IMAGE_EXTENSIONS)}): "
                            "add images or remove the folder")
        items += [Item(p, labels[name]) for p in files]
    return items


def _short(value: object, limit: int = 80) -> str:
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _read_lines(path: Path, key: str) -> list[str]:
    try:
        return path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{key}: cannot read {path}: {e}") from None


def _first_missing_image(parts: dict[str, list[Item]]) -> tuple[str, str] | None:
    """A cheap layout check: the first image of each split must exist (verify_images checks every file later)."""
    for part, items in parts.items():
        if items and not os.path.exists(items[0].path):
            return part, items[0].path
    return None


# -- Zhou split files ------------------------------------------------------------------------------------------------
def load_json(path: Path, what: str) -> object:
    """A JSON file, or a DataError naming the file and the line/column of the syntax error."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"cannot read {what} {path}: {e}") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{what} {path} is not valid JSON (line {e.lineno}, column {e.colno}: {e.msg}): "
                        "the file is damaged or truncated, get it again") from None


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


def _read_zhou(key: str, root: Path) -> DatasetSplits:
    spec = ZHOU[key]
    ddir = _dataset_dir(root, key, spec.folders, marker=spec.split_file)
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
                raise DataError(f"split file {split_path}: entry {part}[{i}] = {_short(entry)} is not "
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
    bad = _first_missing_image(parts)
    if bad:
        raise DataError(f"{key}: image {bad[1]} (first {bad[0]} entry of {spec.split_file}) does not exist: the "
                        f"split's paths are relative to {image_dir}; extract the images there")
    classnames = [prompt_name(names[y]) for y in range(len(names))]
    return DatasetSplits(key, ddir, classnames, parts["train"], parts["val"], parts["test"], TEMPLATES[key])


# -- FGVC-Aircraft ---------------------------------------------------------------------------------------------------
def _read_fgvc(key: str, root: Path) -> DatasetSplits:
    ddir = _dataset_dir(root, key, ("fgvc_aircraft",), marker="variants.txt",
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
    classnames = [line.strip() for line in _read_lines(files[0], key) if line.strip()]
    if not classnames:
        raise DataError(f"{key}: {files[0]} lists no variants: the file is damaged, extract it again")
    label_of = {c: i for i, c in enumerate(classnames)}
    parts: dict[str, list[Item]] = {}
    for part, path in zip(("train", "val", "test"), files[1:]):
        items = []
        for lineno, line in enumerate(_read_lines(path, key), 1):
            fields = line.strip().split(" ")  # "<image id> <variant name with spaces>", split as CoOp does
            if not fields[0]:
                continue
            variant = " ".join(fields[1:])
            if variant not in label_of:
                what = "has no variant" if len(fields) < 2 else f"names variant {variant!r}, not in variants.txt"
                raise DataError(f"{key}: {path} line {lineno} {what}: expected '<image id> <variant>' lines")
            items.append(Item(os.path.join(str(image_dir), fields[0] + ".jpg"), label_of[variant]))
        parts[part] = items
    bad = _first_missing_image(parts)
    if bad:
        raise DataError(f"{key}: image {bad[1]} (first line of images_variant_{bad[0]}.txt) does not exist: "
                        f"extract the images to {image_dir}")
    return DatasetSplits(key, ddir, [prompt_name(c) for c in classnames], parts["train"], parts["val"],
                         parts["test"], TEMPLATES[key])


# -- ImageNet and its variants ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _ImageNetTable:
    wnids: list[str]  # ImageNet index order (sorted wnids)
    names: dict[str, str]
    source: str


def _read_classnames_txt(path: Path) -> dict[str, str]:
    names: dict[str, str] = {}
    for lineno, line in enumerate(_read_lines(path, "imagenet"), 1):
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


def _read_imagenet(key: str, root: Path) -> DatasetSplits:
    ddir = _dataset_dir(root, key, ("imagenet",), layout=(
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
    wnids = _subfolders(base / "train")
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
    for w in _subfolders(base / "val"):
        if w not in labels:
            raise DataError(f"imagenet: class folder {base / 'val' / w} has no train folder {base / 'train' / w}: "
                            "the train and val sets must have the same classes")
    train = _scan_classes(base / "train", labels, key)
    test = _scan_classes(base / "val", labels, key)
    return DatasetSplits(key, ddir, [prompt_name(table.names[w]) for w in wnids], train, [], test, TEMPLATES[key])


def _check_val_sorted(val: Path) -> None:
    """The official ILSVRC2012 validation archive unpacks flat (val/ILSVRC2012_val_00000001.JPEG, ...); both peers
    read val/<wnid>/ folders. Flat, it would read as zero test images: say how to sort it instead."""
    with os.scandir(val) as it:
        flat = sum(1 for e in it if e.is_file() and _is_image(e.name))
    if flat and not _subfolders(val):
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
            if cand.is_dir() and _subfolders(cand):
                return root / name, cand
    return None


def _read_variant(key: str, root: Path) -> DatasetSplits:
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
    folders = _subfolders(image_dir)
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
    test = _scan_classes(image_dir, labels, key)
    return ImageNetVariantSplits(key, ddir, [prompt_name(table.names[w]) for w in kept], [], [], test,
                                 TEMPLATES[key], imagenet_indices=[index[w] for w in kept])


# -- custom data -----------------------------------------------------------------------------------------------------
def _read_folder(key: str, root: Path) -> DatasetSplits:
    if not root.is_dir():
        raise DataError(f"folder dataset: root {root} is not a folder: pass the folder holding train/ and test/ "
                        "(or use --dataset csv for a CSV file)")
    layout = f"{root}/train/<class>/<images> and {root}/test/<class>/<images> (optional {root}/val/<class>/...)"
    for part in ("train", "test"):
        if not (root / part).is_dir():
            raise DataError(f"folder dataset: {root / part} is missing: expected {layout}")
    classes = _subfolders(root / "train")
    if not classes:
        raise DataError(f"folder dataset: {root / 'train'} has no class folders: expected {layout}")
    labels = {c: i for i, c in enumerate(classes)}
    parts: dict[str, list[Item]] = {}
    for part in ("train", "val", "test"):
        folder = root / part
        if not folder.is_dir():
            parts[part] = []
            continue
        for c in _subfolders(folder):
            if c not in labels:
                raise DataError(f"folder dataset: class folder {folder / c} has no train folder {root / 'train' / c}:"
                                " every class needs training images")
        parts[part] = _scan_classes(folder, labels, "folder dataset")
    return DatasetSplits(root.name, root, [prompt_name(c) for c in classes], parts["train"], parts["val"],
                         parts["test"], DEFAULT_TEMPLATE)


CSV_COLUMNS = ("path", "label", "split")


def _csv_rows(path: Path) -> list[tuple[int, str, str, str]]:
    """(line number, path, class name, split) of each data row; the header is line 1."""
    rows = []
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        header = [h.strip() for h in (reader.fieldnames or [])]
        missing = [c for c in CSV_COLUMNS if c not in header]
        if missing:
            raise DataError(f"csv dataset {path} line 1: header {','.join(header) or '(empty)'} lacks column "
                            f"{missing[0]!r}: the first line must name the columns {','.join(CSV_COLUMNS)}")
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
    first: dict[str, tuple[int, str, str]] = {}  # image -> (line, label, split) of its first row
    repeats = []
    for line, file, label, split in rows:
        full = os.path.normpath(os.path.join(str(base), file))
        if full in first:
            line0, label0, split0 = first[full]
            if (label0, split0) == (label, split):
                repeats.append((line, line0))
                continue  # the same row again: counted below, read once
            what = (f"labels it {label!r}, line {line0} {label0!r}" if label0 != label else
                    f"puts it in {split}, line {line0} in {split0} (an image in two splits leaks test data)")
            raise DataError(f"csv dataset {path} line {line}: image {full} is listed twice: this row {what}; keep "
                            "one row per image")
        first[full] = (line, label, split)
        if not os.path.exists(full):
            absent.append((line, full))
        parts[split].append(Item(full, labels[label]))
    if repeats:
        log.warning("csv dataset %s: %d repeated row(s) read once (line %d repeats line %d)", path, len(repeats),
                    *repeats[0])
    if absent:
        line, full = absent[0]
        raise DataError(f"csv dataset {path} line {line}: image {full} does not exist ({len(absent)} missing in all; "
                        f"paths are relative to {base})")
    return DatasetSplits(path.stem, base, [prompt_name(c) for c in classes], parts["train"], parts["val"],
                         parts["test"], DEFAULT_TEMPLATE)


_READERS: dict[str, Callable[[str, Path], DatasetSplits]] = {
    "imagenet": _read_imagenet,
    **dict.fromkeys(ZHOU, _read_zhou),
    "fgvc_aircraft": _read_fgvc,
    **dict.fromkeys(VARIANTS, _read_variant),
    "folder": _read_folder,
    "csv": _read_csv,
}
