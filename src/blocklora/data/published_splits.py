"""K-shot splits other projects publish, read as plain data (JSON only, never pickle) onto a dataset's items.

Formats (detected from the content):
- cross-modal adaptation (linzhiqiu/cross_modal_adaptation, indices/<dataset>/shot_K-seed_S.json): one JSON object
  {"train": {"data": [{"impath", "label", "classname"}, ...], "indices": [...]}, "val": {...}}; "indices" point
  into that project's own train list, so the images are matched by impath.
- JSON lines (2SFS-style and hand-made lists): one object per line with an image path ("impath", "image", "path",
  "file" or "filename"), an integer "label", optionally "classname" and "split" ("train" / "val"; default train).
Paths are matched to the dataset's items by their trailing components (a published "./data/dtd/images/x/y.jpg"
is the dataset's "images/x/y.jpg" under its root); labels, and class names where given, must be the dataset's.
K is the number of training images per class; the seed comes from a "seed" field or the file name (seed_S). The
file's sha256 names the split as for blocklora's own split files. CoOp's split_fewshot/*.pkl files are pickles:
refused, since reading a pickle runs code from the file.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections import Counter
from pathlib import Path
from typing import Any

from ..errors import DataError
from ..reading import loads, read_bytes, reason
from .types import DatasetSplits, Item

PATH_KEYS = ("impath", "image", "path", "file", "filename")
PICKLE_MAGIC = (b"\x80", b"(dp", b"(lp")  # protocol 2+ opcode PROTO, and protocol 0's dict / list


def published_format(raw: bytes) -> str | None:
    """"cross-modal-adaptation", "jsonl", "pickle", or None (blocklora's own format, or not a split file)."""
    if raw.startswith(PICKLE_MAGIC):
        return "pickle"
    try:
        data = loads(raw)
    except ValueError:
        lines = [ln for ln in raw.decode("utf-8", errors="replace").splitlines() if ln.strip()]
        try:
            return "jsonl" if lines and all(isinstance(loads(ln), dict) for ln in lines) else None
        except ValueError:
            return None
    if isinstance(data, dict) and isinstance(data.get("train"), dict) and isinstance(data["train"].get("data"), list):
        return "cross-modal-adaptation"
    if isinstance(data, dict) and "label" in data and any(k in data for k in PATH_KEYS):
        return "jsonl"  # JSON lines with a single line
    return None


def _bad(path: Path, why: str) -> DataError:
    return DataError(f"split file {path} {why}")


def _entries(path: Path, raw: bytes, kind: str) -> list[tuple[str, dict[str, Any], str]]:
    """(part, entry, where) for every listed image, where = how to find it in the file for messages."""
    out = []
    if kind == "cross-modal-adaptation":
        data = loads(raw)
        for part in ("train", "val"):
            held = data.get(part)
            listed = held.get("data") if isinstance(held, dict) else None
            if held is not None and not isinstance(listed, list):
                raise _bad(path, f'has a "{part}" without a "data" list of images')
            for i, entry in enumerate(listed or []):
                out.append((part, entry, f"{part}.data[{i}]"))
        return out
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise _bad(path, f"is {reason(e)}: the file is damaged") from None
    for n, line in enumerate(text.splitlines(), 1):
        if line.strip():
            entry = loads(line)
            part = entry.get("split", "train")
            if part not in ("train", "val"):
                raise _bad(path, f"line {n}: split {part!r} is not train or val")
            out.append((part, entry, f"line {n}"))
    return out


def header(path: str | os.PathLike, raw: bytes | None = None) -> dict[str, Any] | None:
    """What a published split file says about its draw: {shots, seed (or None), published: format}; None when the
    file is not a published format. `raw`: the file's bytes, when the caller read them. Raises DataError for a
    pickle and for a file that cannot be read (missing, not a regular file)."""
    path = Path(path).expanduser()
    raw = _read(path) if raw is None else raw
    kind = published_format(raw)
    if kind == "pickle":
        raise _bad(path, "is a pickle (e.g. CoOp's split_fewshot/*.pkl): blocklora never reads pickles, which can run "
                         "code; convert it to JSON lines ({\"impath\": ..., \"label\": ...} per line)")
    if kind is None:
        return None
    entries = _entries(path, raw, kind)
    counts = Counter(e.get("label") for part, e, _ in entries if part == "train" and isinstance(e, dict)
                     and isinstance(e.get("label"), int) and not isinstance(e.get("label"), bool))
    if not counts:
        raise _bad(path, "lists no training images")
    seed = next((e["seed"] for _, e, _ in entries if isinstance(e.get("seed"), int)), None)
    if seed is None:
        m = re.search(r"seed[_-]?(\d+)", path.name)
        seed = int(m.group(1)) if m else None
    return {"published": kind, "shots": max(counts.values()), "seed": seed}


def _read(path: Path) -> bytes:
    try:
        return read_bytes(path)
    except OSError as e:
        raise _bad(path, f"cannot be read ({reason(e)})") from None


def read_published(path: str | os.PathLike, splits: DatasetSplits, raw: bytes | None = None
                   ) -> tuple[dict[str, Any], dict[str, list[Item]], str]:
    """(header(), {"train": items, "val": items} of `splits`, the sha256 of the bytes read). Raises DataError
    naming the first entry that does not match the dataset (path, label or class name), a training entry that is
    not an image of the dataset's train split (a test image would leak into training), and a class without any
    training entry."""
    path = Path(path).expanduser()
    raw = _read(path) if raw is None else raw
    info = header(path, raw)
    if info is None:
        raise _bad(path, "is not a split file blocklora reads")
    root = Path(splits.root)
    by_tail: dict[tuple[str, ...], tuple[Item, set[str]]] = {}
    for part in ("train", "val", "test"):
        for item in getattr(splits, part):
            parts = Path(os.path.relpath(item.path, root)).parts if os.path.isabs(item.path) else Path(item.path).parts
            by_tail.setdefault(tuple(p for p in parts if p not in (".", "")), (item, set()))[1].add(part)
    lengths = sorted({len(k) for k in by_tail}, reverse=True)
    parts_out: dict[str, list[Item]] = {"train": [], "val": []}
    for part, entry, where in _entries(path, raw, info["published"]):
        item, why = _match(entry, by_tail, lengths, splits, part)
        if item is None:
            raise _bad(path, f"does not match dataset {splits.name} at {root}: {where} "
                             f"{json.dumps(entry, ensure_ascii=False)[:120]}: {why}")
        parts_out[part].append(item)
    drawn = {i.label for i in parts_out["train"]}
    absent = [y for y in range(len(splits.classnames)) if y not in drawn]
    if absent:
        raise _bad(path, f"lists no training image of class {absent[0]} ({splits.classnames[absent[0]]!r}; "
                         f"{len(absent)} classes without any): every class needs its shots")
    return info, parts_out, hashlib.sha256(raw).hexdigest()


def _match(entry: Any, by_tail: dict[tuple[str, ...], tuple[Item, set[str]]], lengths: list[int],
           splits: DatasetSplits, part: str) -> tuple[Item | None, str]:
    if not isinstance(entry, dict):
        return None, "not a JSON object"
    name = next((entry[k] for k in PATH_KEYS if isinstance(entry.get(k), str) and entry[k]), None)
    label = entry.get("label")
    if name is None or isinstance(label, bool) or not isinstance(label, int):
        return None, f"needs an image path ({' / '.join(PATH_KEYS)}) and an integer label"
    parts = tuple(p for p in Path(name.replace("\\", "/")).parts if p not in (".", "", "/"))
    found = next((by_tail[parts[-n:]] for n in lengths if n <= len(parts) and parts[-n:] in by_tail), None)
    if found is None:
        return None, "no image of the dataset has this path"
    item, held = found
    if part == "train" and "train" not in held:
        return None, (f"a training entry, but an image of the dataset's {'/'.join(sorted(held))} split (training on "
                      "it would leak it into the result)")
    if item.label != label:
        return None, f"labelled {label}, but the dataset labels it {item.label} ({splits.classnames[item.label]!r})"
    classname = entry.get("classname")
    if isinstance(classname, str) and _norm(classname) != _norm(splits.classnames[label]):
        return None, f"class {label} is {classname!r} there but {splits.classnames[label]!r} here"
    return item, ""


def _norm(name: str) -> str:
    return name.replace("_", " ").strip().lower()
