"""What the dataset readers share: finding a dataset's folder under the root, listing image files as torchvision's
ImageFolder does, reading class folders, list files and JSON, and CoOp's per-dataset prompt templates.
(data/datasets.py describes the layouts; data/benchmarks.py and datasets.py read them.)"""

from __future__ import annotations

import json
import logging
import os
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from ..errors import DataError
from ..reading import read_json, read_text, reason
from .types import Item

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


# -- helpers --------------------------------------------------------------------------------------------------
def prompt_name(name: str) -> str:
    """A class name as it goes into prompts: "_" -> space (what CoOp and CLIP-LoRA do before formatting)."""
    return name.replace("_", " ").strip()


def existing_root(key: str, root: str | os.PathLike | None) -> Path:
    what = {"csv": "the CSV file (columns path,label,split)",
            "folder": "the folder holding train/<class>/ and test/<class>/"}.get(
        key, f"the folder that holds the dataset folders (layouts: {COOP_DATASETS_MD})")
    if root is None or str(root) == "":
        raise DataError(f"no root given for dataset {key}: pass --root (data.root=...), {what}")
    path = Path(root).expanduser().absolute()
    if not path.exists():
        raise DataError(f"dataset root {path} does not exist: pass --root {what}")
    return path


def dataset_dir(root: Path, key: str, folders: Sequence[str], marker: str | None = None, layout: str = "") -> Path:
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


def is_image(name: str) -> bool:
    return not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)


def pil_extension(name: str) -> str | None:
    """The extension of a visible file PIL can read but IMAGE_EXTENSIONS leaves out (.gif, .jfif, .avif, ...)."""
    from PIL import Image

    Image.init()
    ext = os.path.splitext(name)[1].lower()
    return ext if not name.startswith(".") and ext in Image.registered_extensions() and not is_image(name) else None


def warn_skipped(skipped: Counter, where: str) -> None:
    """One warning for the image files a folder scan left out: the user put them there to be used."""
    if skipped:
        kinds = ", ".join(f"{n} {ext}" for ext, n in skipped.most_common())
        log.warning("%s: %d image file(s) left out (%s): blocklora lists the extensions torchvision's ImageFolder "
                    "lists (%s); convert them to one of those to use them", where, sum(skipped.values()), kinds,
                    " ".join(IMAGE_EXTENSIONS))


def list_image_files(folder: str | os.PathLike, real: dict[str, str] | None = None,
                     skipped: Counter | None = None) -> list[str]:
    """Image files under `folder`, recursively, in torchvision ImageFolder's order (sorted walk, sorted names).

    Symbolic links to folders are followed (datasets are often assembled from links), but each real folder is
    walked once: a link back to an ancestor (a -> .) would otherwise make the walk endless. Hidden folders are not
    walked. A file name that is not valid UTF-8 is an error naming it (it could not be written to split files, JSON
    results or logs). `real`, when given, receives each file's real path (links resolved: os.path.realpath, found
    at the cost of one call per link, not per file), by which readers tell one image reached by two names
    (distinct_images). `skipped` counts, by extension, the files left out that PIL could read (pil_extension;
    warn_skipped reports them).
    """
    folder = Path(folder)
    out: list[str] = []
    seen: set[tuple[int, int] | None] = set()

    def key(path: str) -> tuple[int, int] | None:
        try:
            st = os.stat(path)
        except OSError:
            return None  # a broken link: os.walk skips it too
        return st.st_dev, st.st_ino

    walk: list[tuple[str, str, list[str], set[str]]] = []  # (folder, its real path, file names, those that are links)

    def visit(dirpath: str, real_dir: str) -> None:  # os.walk(followlinks=True): top-down, sorted subfolders
        try:
            with os.scandir(dirpath) as it:
                entries = list(it)
        except OSError:
            return  # os.walk skips folders it cannot list
        files, links, subdirs = [], set(), []
        for e in entries:
            try:
                is_dir = e.is_dir()
            except OSError:
                is_dir = False
            if is_dir:
                subdirs.append(e)
            else:
                files.append(e.name)
                if e.is_symlink():  # from the directory entry's type: no system call
                    links.add(e.name)
        walk.append((dirpath, real_dir, files, links))
        for e in sorted(subdirs, key=lambda e: e.name):
            if e.name.startswith("."):
                continue
            k = key(e.path)
            if k is None or k in seen:
                continue
            seen.add(k)
            visit(e.path, os.path.realpath(e.path) if e.is_symlink() else os.path.join(real_dir, e.name))

    seen.add(key(str(folder)))
    visit(str(folder), os.path.realpath(folder))
    for dirpath, real_dir, filenames, links in sorted(walk, key=lambda w: w[0]):
        names = sorted(f for f in filenames if is_image(f))
        prefix = os.path.join(dirpath, "")  # os.path.join(dirpath, f), a string concatenation per file
        paths = [prefix + f for f in names]
        out += paths
        if real is not None:
            real_prefix = os.path.join(real_dir, "")
            real.update(zip(paths, [os.path.realpath(p) if f in links else real_prefix + f
                                    for p, f in zip(paths, names)]))
        if skipped is not None:
            skipped.update(e for e in map(pil_extension, filenames) if e)
    check_utf8(out, folder)
    return out


def real_path(path: str, real_dirs: dict[str, str]) -> str:
    """os.path.realpath(path) at the cost of one realpath per folder (cached in `real_dirs`) and one lstat per file."""
    folder, name = os.path.split(path)
    if folder not in real_dirs:
        real_dirs[folder] = os.path.realpath(folder)
    return os.path.realpath(path) if os.path.islink(path) else os.path.join(real_dirs[folder], name)


def distinct_images(parts: dict[str, list[Item]], real: dict[str, str], classnames: Sequence[str],
                    where: str) -> dict[str, list[Item]]:
    """`parts` (split -> items) with each image file counted once, compared by real path (`real`: path -> its
    real path; paths not in it are compared as they are).

    One file reached by two names (a symbolic link to a class folder or to an image) in two splits is an error (the
    test set would hold training images), and so it is under two labels; twice in one split under one label it is
    read once, with a warning counting such names."""
    first: dict[str, tuple[str, Item]] = {}
    again: list[tuple[str, str]] = []
    out: dict[str, list[Item]] = {}
    for part, items in parts.items():
        kept = []
        for item in items:
            key = real.get(item.path, item.path)
            if key in first:
                part0, item0 = first[key]
                if (part0, item0.label) == (part, item.label):
                    again.append((item.path, item0.path))
                    continue
                what = (f"in {part0} and in {part} (an image in two splits leaks test data)" if part0 != part else
                        f"labelled {classnames[item0.label]!r} and {classnames[item.label]!r}")
                raise DataError(f"{where}: {item0.path} and {item.path} are the same file ({key}) reached by two "
                                f"names, {what}: remove the link so that each image has one name")
            first[key] = (part, item)
            kept.append(item)
        out[part] = kept
    if again:
        log.warning("warning: %s: %d image(s) reached by a second name (a symbolic link) are read once, e.g. %s "
                    "(the same file as %s)", where, len(again), *again[0])
    return out


def check_utf8(paths: Sequence[str], folder: Path) -> None:
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


def subfolders(folder: Path) -> list[str]:
    with os.scandir(folder) as it:
        names = sorted(e.name for e in it if e.is_dir() and not e.name.startswith("."))
    check_utf8([str(folder / n) for n in names], folder)
    return names


def scan_classes(folder: Path, labels: dict[str, int], key: str, real: dict[str, str] | None = None) -> list[Item]:
    """Items of folder/<class>/... for the class folders named in `labels`; an empty class folder is an error.
    `real` receives each file's real path (list_image_files)."""
    items: list[Item] = []
    skipped: Counter = Counter()
    for name in subfolders(folder):
        if name not in labels:
            continue
        files = list_image_files(folder / name, real, skipped)
        if not files:
            raise DataError(f"{key}: class folder {folder / name} has no images ({', '.join(IMAGE_EXTENSIONS)}): "
                            "add images or remove the folder")
        items += [Item(p, labels[name]) for p in files]
    warn_skipped(skipped, f"{key} {folder}")
    return items


def short(value: object, limit: int = 80) -> str:
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def read_lines(path: Path, key: str) -> list[str]:
    """The lines of a dataset's list file (a regular file, UTF-8), or a DataError naming it."""
    try:
        return read_text(path, "utf-8-sig").splitlines()  # a byte order mark (Windows editors) is no name
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{key}: cannot read {path}: {reason(e)}") from None


def first_missing_image(parts: dict[str, list[Item]]) -> tuple[str, str] | None:
    """A cheap layout check: the first image of each split must exist (verify_images checks every file later)."""
    for part, items in parts.items():
        if items and not os.path.exists(items[0].path):
            return part, items[0].path
    return None


# -- JSON files -------------------------------------------------------------------------------------------------------
def load_json(path: Path, what: str) -> object:
    """A JSON file (reading.read_json: a regular file, UTF-8, nesting bounded), or a DataError naming the file and
    why (for a syntax error, its line and column)."""
    return read_json(path, what, DataError, "the file is damaged or truncated, get it again")
