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


def list_image_files(folder: str | os.PathLike, skipped: Counter | None = None) -> list[str]:
    """Image files under `folder`, recursively, in torchvision ImageFolder's order (sorted walk, sorted names).

    Symbolic links to folders are followed (datasets are often assembled from links), but each real folder is
    walked once: a link back to an ancestor (a -> .) would otherwise make the walk endless. A file name that is not
    valid UTF-8 is an error naming it (it could not be written to split files, JSON results or logs). `skipped`
    counts, by extension, the files left out that PIL could read (pil_extension; warn_skipped reports them).
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
        out += [os.path.join(dirpath, f) for f in sorted(filenames) if is_image(f)]
        if skipped is not None:
            skipped.update(e for e in map(pil_extension, filenames) if e)
    check_utf8(out, folder)
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


def scan_classes(folder: Path, labels: dict[str, int], key: str) -> list[Item]:
    """Items of folder/<class>/... for the class folders named in `labels`; an empty class folder is an error."""
    items: list[Item] = []
    skipped: Counter = Counter()
    for name in subfolders(folder):
        if name not in labels:
            continue
        files = list_image_files(folder / name, skipped)
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
        return read_text(path).splitlines()
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
