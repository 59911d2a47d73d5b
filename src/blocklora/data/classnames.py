"""Class names of a folder dataset from a file in its root, as CoOp's datasets give them.

    class_names(root, folders, where) -> the prompt names, one per class folder (sorted folder order)

Without a file the names are the folder names ("_" -> space, layout.prompt_name). With one, in the dataset root:
- classnames.json: {"<folder>": "name", ...}, one entry per class folder;
- classnames.txt, either CoOp's "<folder> <name>" lines (its ImageNet classnames.txt, "n01440764 tench": the first
  word of every line is a class folder, and every folder has a line) or one name a line in sorted folder order
  (exactly one line per folder). Blank lines are ignored; the file is UTF-8 (a leading byte order mark is
  dropped).
A file that matches neither, or names a folder twice, is a DataError naming it and the first problem.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from ..errors import DataError
from .layout import load_json, prompt_name, read_lines

FILES = ("classnames.json", "classnames.txt")


def class_names(root: Path, folders: Sequence[str], where: str) -> list[str]:
    """The prompt names of `folders` (sorted class folders under `root`): from classnames.json / classnames.txt in
    root when there is one (both: an error), else the folder names."""
    present = [root / f for f in FILES if (root / f).is_file()]
    if len(present) > 1:
        raise DataError(f"{where}: {root} holds both {FILES[0]} and {FILES[1]}: keep one")
    if not present:
        return [prompt_name(c) for c in folders]
    path = present[0]
    mapping = _from_json(path, folders) if path.suffix == ".json" else _from_text(path, folders)
    return [prompt_name(mapping[c]) for c in folders]


def _from_json(path: Path, folders: Sequence[str]) -> dict[str, str]:
    data = load_json(path, "class-name file")
    if not isinstance(data, dict) or not all(isinstance(v, str) and v.strip() for v in data.values()):
        raise DataError(f"class-name file {path} must be one JSON object of class folder -> name (non-empty strings)")
    _check_keys(path, set(data), folders)
    return data


def _from_text(path: Path, folders: Sequence[str]) -> dict[str, str]:
    lines = [line.strip() for line in read_lines(path, "class-name file") if line.strip()]
    pairs = [line.split(None, 1) for line in lines]
    if all(len(p) == 2 for p in pairs) and {p[0] for p in pairs} & set(folders):  # CoOp's "<folder> <name>"
        if len({p[0] for p in pairs}) != len(pairs):
            twice = next(p[0] for i, p in enumerate(pairs) if p[0] in {q[0] for q in pairs[:i]})
            raise DataError(f"class-name file {path} names folder {twice!r} twice: one line per class folder")
        _check_keys(path, {p[0] for p in pairs}, folders)
        return {p[0]: p[1] for p in pairs}
    if len(lines) != len(folders):
        raise DataError(f"class-name file {path} has {len(lines)} names for {len(folders)} class folders: give one "
                        "name a line in sorted folder order, or '<folder> <name>' lines")
    return dict(zip(folders, lines))


def _check_keys(path: Path, keys: set[str], folders: Sequence[str]) -> None:
    missing = [c for c in folders if c not in keys]
    extra = sorted(keys - set(folders))
    if missing or extra:
        what = f"has no name for class folder {missing[0]!r}" if missing else f"names {extra[0]!r}, not a class folder"
        raise DataError(f"class-name file {path} {what} ({len(missing)} missing, {len(extra)} unknown): one entry "
                        "per class folder")
