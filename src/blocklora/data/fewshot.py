"""K-shot sampling in either peer's order, and split files that pin the drawn images down by hash.

    sample_few_shot(splits, shots, seed, sampler="clip-lora", replace=True) -> FewShotSplit
    write_split_file(path, splits, fewshot) -> sha256        read_split_file(path, splits) -> (FewShotSplit, sha256)

The shared draw (Dassl's DatasetBase.generate_fewshot_dataset + split_dataset_by_label, which CLIP-LoRA copies into
its datasets/utils.py unchanged): group the items by label in first-appearance order (a defaultdict filled in file
order, so file order within a group), then for each group take random.sample(group, K), or random.choices(group, k=K)
when the group has fewer than K items (Dassl's repeat=True, what both peers run). The two orders:

- "clip-lora" (MaxZanella/CLIP-LoRA, main.py seeds Python's random via set_random_seed(args.seed) before building the
  dataset; datasets/<name>.py): val first, min(K, 4) shots per class from the val split, then K train shots. ImageNet
  (datasets/imagenet.py) has no val split: per class (torchvision ImageFolder order: sorted wnids, sorted files) it
  takes random.sample(items, K + min(K, 4)), the first K for train and the rest for val. We apply that rule to a
  dataset without a val split when every class has K + min(K, 4) images (so the K training shots are K distinct
  images, exactly CLIP-LoRA's). Where a class has fewer (CLIP-LoRA would crash there, so there is no peer draw to
  reproduce) no validation shots are set aside: the draw is K training shots per class, val empty, as CoOp's
  ImageNet. Nothing in a run selects on the validation shots (the last iterate is tested), so taking them from a
  short class's few images would only cost it training images (issue 25).
- "coop" (KaiyangZhou/CoOp datasets/<name>.py, seeded by Dassl's set_random_seed(cfg.SEED) in train.py before the
  trainer builds the dataset): train first (K shots), then val (min(K, 4) shots), cached to
  split_fewshot/shot_K-seed_S.pkl. CoOp's ImageNet draws train only and uses the test set as val; we leave val empty.

Both peers use the global `random` module; we use a private random.Random(seed), which yields the same sequence as
random.seed(seed) followed by the module functions (those are methods of one hidden Random instance) and leaves the
caller's random state alone.

Verified by reading the sources (code search over the public repositories): Dassl.pytorch
dassl/data/datasets/base_dataset.py (generate_fewshot_dataset, split_dataset_by_label); CLIP-LoRA main.py,
run_utils.py (set_random_seed = random.seed + numpy + torch), datasets/utils.py (the same two functions),
datasets/imagenet.py, datasets/{oxford_pets,caltech101,fgvc,...}.py (val drawn before train); CoOp train.py
(set_random_seed(cfg.SEED) before build_trainer), datasets/{oxford_pets,imagenet,...}.py (train before val; ImageNet
train only). tests/test_data_fewshot.py re-implements each order with `random` directly and compares.

With replace=False a class with too few training images raises a DataError naming it (Dassl's repeat=False would
silently keep fewer shots); a val class with fewer than min(K, 4) images gives all it has (Dassl's repeat=False: no
random draw), never an error, since nothing trains or selects on the validation shots.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ..choices import Sampler
from ..errors import ConfigError, DataError
from ..reading import loads, open_regular, read_bytes, reason
from .decode import reads_files
from .layout import real_path
from .types import DatasetSplits, Item

SAMPLERS = typing.get_args(Sampler)
SPLIT_FORMAT = "blocklora-fewshot-split/1"


@dataclass
class FewShotSplit:
    """The K-shot training (and validation) items drawn from a dataset, and how they were drawn."""

    dataset: str
    shots: int
    seed: int
    sampler: str  # the peer whose draw order it reproduces (SAMPLERS); the split file's key "order"
    train: list[Item]
    val: list[Item] = field(default_factory=list)
    replace: bool = True


def val_shots(shots: int) -> int:
    """Both peers draw min(K, 4) validation shots per class."""
    return min(shots, 4)


def group_by_label(items: Sequence[Item]) -> dict[int, list[Item]]:
    """Dassl's split_dataset_by_label: label -> items, labels in first-appearance order, file order inside."""
    groups: dict[int, list[Item]] = {}
    for item in items:
        groups.setdefault(item.label, []).append(item)
    return groups


def _draw(rng: random.Random, group: list[Item], k: int, replace: bool, what: str) -> list[Item]:
    """Dassl's per-class draw: sample without replacement, or choices with replacement when the class is short."""
    if len(group) >= k:
        return rng.sample(group, k)
    if not replace:
        raise DataError(f"{what} has {len(group)} images, fewer than the {k} to draw: use fewer shots, add images, "
                        "or allow drawing with replacement (data.replace=true)")
    return rng.choices(group, k=k)


def _class(splits: DatasetSplits, label: int, part: str) -> str:
    name = splits.classnames[label] if 0 <= label < len(splits.classnames) else "?"
    return f"{splits.name}: class {label} ({name!r}) in {part}"


def _few_shot(rng: random.Random, splits: DatasetSplits, items: Sequence[Item], k: int, replace: bool,
              part: str) -> list[Item]:
    out: list[Item] = []
    for label, group in group_by_label(items).items():
        if part == "val" and not replace and len(group) < k:
            out += group  # Dassl's repeat=False keeps the short group as it is (no draw): val is never refused
            continue
        out += _draw(rng, group, k, replace, _class(splits, label, part))
    return out


def sets_aside_val(splits: DatasetSplits, shots: int, sampler: str) -> bool:
    """Whether the draw takes validation shots out of the training images: CLIP-LoRA's ImageNet rule, applied only
    when the dataset has no val split and every class has K + min(K, 4) training images (module docstring)."""
    if sampler != "clip-lora" or splits.val:
        return False
    need = shots + val_shots(shots)
    return all(len(group) >= need for group in group_by_label(splits.train).values())


def sample_few_shot(splits: DatasetSplits, shots: int, seed: int, sampler: str = "clip-lora",
                    replace: bool = True) -> FewShotSplit:
    """Draw `shots` training images per class (and min(shots, 4) validation images) as the chosen peer does.

    The validation shots never take training images a class needs: without a val split they are set aside only when
    every class has K + min(K, 4) images (sets_aside_val), else val is empty. Raises ConfigError for bad shots or
    sampler, DataError for a dataset without training images, a class without any, or (replace=False) a class with
    fewer than K training images."""
    if isinstance(shots, bool) or not isinstance(shots, int) or shots < 1:
        raise ConfigError(f"shots must be an integer >= 1, got {shots!r}")
    if sampler not in SAMPLERS:
        raise ConfigError(f"unknown sampler {sampler!r}: use one of {', '.join(SAMPLERS)}")
    if not splits.train:
        raise DataError(f"dataset {splits.name} at {splits.root} has no training images to draw shots from "
                        "(a test-only set?): train on another dataset and evaluate on this one")
    present = set(group_by_label(splits.train))
    absent = [y for y in range(len(splits.classnames)) if y not in present]
    if absent:
        raise DataError(f"{_class(splits, absent[0], 'train')} has no training images ({len(absent)} classes "
                        "without any): every class needs at least one")
    rng = random.Random(seed)
    k, v = shots, val_shots(shots)
    if sampler == "coop":
        train = _few_shot(rng, splits, splits.train, k, replace, "train")
        val = _few_shot(rng, splits, splits.val, v, replace, "val") if splits.val else []
    elif splits.val:  # clip-lora, a dataset with a val split: val first, then train
        val = _few_shot(rng, splits, splits.val, v, replace, "val")
        train = _few_shot(rng, splits, splits.train, k, replace, "train")
    elif sets_aside_val(splits, k, sampler):  # clip-lora, no val split (its ImageNet): K + min(K, 4) per class
        train, val = [], []
        for group in group_by_label(splits.train).values():
            drawn = rng.sample(group, k + v)  # every class has them (sets_aside_val)
            train += drawn[:k]
            val += drawn[k:]
    else:  # no val split and a class too short for K + min(K, 4): training shots only, never fewer distinct ones
        train, val = _few_shot(rng, splits, splits.train, k, replace, "train"), []
    return FewShotSplit(splits.name, shots, seed, sampler, train, val, replace)


def repeated_shots(fewshot: FewShotSplit, splits: DatasetSplits) -> list[dict[str, object]]:
    """Classes whose training shots repeat an image (drawn with replacement: the class has fewer images than the
    draw asked for), as {"class", "images" (the class's training images), "shots", "distinct" (distinct shots)} in
    label order. Read from the items themselves, so it holds for a split file as for a fresh draw."""
    available = {label: len(group) for label, group in group_by_label(splits.train).items()}
    out = []
    for label, group in sorted(group_by_label(fewshot.train).items()):
        distinct = len({i.path for i in group})
        if distinct < len(group):
            name = splits.classnames[label] if 0 <= label < len(splits.classnames) else str(label)
            out.append({"class": name, "images": available.get(label, distinct), "shots": len(group),
                        "distinct": distinct})
    return out


# -- split files -----------------------------------------------------------------------------------------------------
def file_sha256(path: str | os.PathLike) -> str:
    """Hex sha256 of a regular file's bytes (reading.open_regular: NotRegularFile for a FIFO, device or folder)."""
    h = hashlib.sha256()
    with open_regular(path) as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _relative(path: str, root: Path) -> str:
    """`path` relative to root (posix separators) when it lies under it; other paths and keys unchanged."""
    if not os.path.isabs(path):
        return path
    try:
        return Path(path).relative_to(root).as_posix()
    except ValueError:
        return path


def split_file_bytes(splits: DatasetSplits, fewshot: FewShotSplit) -> bytes:
    """The canonical text of a split file: fixed key order, one [path, label] entry a line, UTF-8, final newline."""
    dump = lambda value: json.dumps(value, ensure_ascii=False)  # noqa: E731
    root = Path(splits.root)

    def entries(items: Sequence[Item]) -> str:
        if not items:
            return "[]"
        return "[\n" + ",\n".join(f"    {dump([_relative(i.path, root), i.label])}" for i in items) + "\n  ]"

    header = {"format": SPLIT_FORMAT, "dataset": splits.name, "classnames": list(splits.classnames),
              "shots": fewshot.shots, "seed": fewshot.seed, "order": fewshot.sampler, "replace": fewshot.replace}
    if splits.held_out:  # a folder whose test set was held out (--test-fraction): the same fraction gives the same
        header["test_fraction"] = splits.held_out["test_fraction"]  # train images; only then written (old hashes)
    lines = [f"  {dump(k)}: {dump(v)}," for k, v in header.items()]
    text = "{\n" + "\n".join(lines) + f'\n  "train": {entries(fewshot.train)},\n  "val": {entries(fewshot.val)}\n}}\n'
    return text.encode("utf-8")


def write_split_file(path: str | os.PathLike, splits: DatasetSplits, fewshot: FewShotSplit) -> str:
    """Write the drawn split as canonical JSON, atomically; returns the sha256 of the bytes written.

    Paths are stored relative to splits.root when they lie under it, so the file moves with the dataset. The same
    dataset, shots, seed and order give a byte-identical file and hash."""
    from ..engine.files import atomic_write

    data = split_file_bytes(splits, fewshot)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    atomic_write(Path(path), lambda fh: fh.write(data))
    return hashlib.sha256(data).hexdigest()


def _bad_file(path: Path, why: str) -> DataError:
    return DataError(f"split file {path} {why}")


def _read_raw(path: Path) -> bytes:
    """The split file's bytes, read once (what is parsed is what is hashed): a regular file only."""
    if not os.path.lexists(path):
        raise _bad_file(path, "does not exist: give the split.json of an earlier run, or leave data.split_file unset "
                              "to draw a new split")
    try:
        return read_bytes(path)
    except OSError as e:
        raise _bad_file(path, f"cannot be read ({reason(e)})") from None


def _load_split_json(path: Path, raw: bytes) -> dict:
    try:
        data = loads(raw.decode("utf-8"))
    except ValueError as e:  # UnicodeDecodeError, JSONDecodeError, TooDeep
        raise _bad_file(path, f"is {reason(e)}: the file is damaged or truncated, get it again") from None
    if not isinstance(data, dict) or data.get("format") != SPLIT_FORMAT:
        raise _bad_file(path, f'is not a blocklora split file (no "format": "{SPLIT_FORMAT}")')
    return data


def _draw_params(data: dict, path: Path) -> dict:
    params = {}
    for key, kind in (("dataset", str), ("shots", int), ("seed", int), ("order", str), ("replace", bool)):
        value = data.get(key)
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise _bad_file(path, f'has no valid "{key}" ({kind.__name__})')
        params[key] = value
    if params["order"] not in SAMPLERS or params["shots"] < 1:
        raise _bad_file(path, f"has an invalid draw (shots {params['shots']}, order {params['order']!r})")
    if not isinstance(data.get("classnames"), list):
        raise _bad_file(path, 'has no "classnames" list')
    return params


def read_split_header(path: str | os.PathLike) -> dict:
    """How a split file's images were drawn, checked: {dataset, classnames, shots, seed, sampler, replace}.

    A split file is the truth about its run (RunConfig.resolved takes these values from it)."""
    from .published_splits import header

    path = Path(path).expanduser()
    raw = _read_raw(path)
    published = header(path, raw)
    if published is not None:  # another project's split: it names no dataset, classes or sampler
        return {**published, "dataset": None, "classnames": None}
    data = _load_split_json(path, raw)
    params = _draw_params(data, path)
    params["sampler"] = params.pop("order")
    held = data.get("test_fraction")
    if held is not None and not (isinstance(held, float) and 0 < held < 1):
        raise _bad_file(path, f'has an invalid "test_fraction" ({held!r}): a number between 0 and 1')
    return {**params, "classnames": list(data["classnames"]), "test_fraction": held}


def read_split_file(path: str | os.PathLike, splits: DatasetSplits) -> tuple[FewShotSplit, str]:
    """Read and validate a split file written by write_split_file (or a published one: published_splits.py)
    against the dataset; returns it and the sha256 of the bytes read.

    Every entry must be an image of the dataset with the dataset's label (or, for a hand-made file, an existing
    image outside the dataset's lists), and the file must agree with the dataset's own splits and with its header:
    training entries from the dataset's train split, no entry a test image (compared by real path: a link to one is
    one), every class with exactly `shots` training entries (the draw's K), no repeated image without "replace".
    Raises DataError naming the file and the first problem."""
    from .published_splits import header, read_published

    path = Path(path).expanduser()
    raw = _read_raw(path)
    if header(path, raw) is not None:
        info, parts, sha = read_published(path, splits, raw)
        seed = info["seed"] if info["seed"] is not None else 1  # the run's default seed when the file names none
        return FewShotSplit(splits.name, info["shots"], seed, "clip-lora", parts["train"], parts["val"]), sha
    data = _load_split_json(path, raw)
    params = _draw_params(data, path)
    if data.get("dataset") != splits.name:
        raise _bad_file(path, f"was drawn from dataset {data.get('dataset')!r}, not {splits.name!r}: use the split "
                              "file of this dataset")
    names = data.get("classnames")
    if names != list(splits.classnames):
        if not isinstance(names, list):
            raise _bad_file(path, 'has no "classnames" list')
        diff = next((i for i, (a, b) in enumerate(zip(names, splits.classnames)) if a != b), None)
        detail = (f"class {diff} is {names[diff]!r} there but {splits.classnames[diff]!r} here" if diff is not None
                  else f"it has {len(names)} classes, the dataset {len(splits.classnames)}")
        raise _bad_file(path, f"does not match the classes of {splits.name} ({detail}): was it drawn for another "
                              "class subset (data.classes) or another copy of the dataset?")
    parts = {}
    for part in ("train", "val"):
        if not isinstance(data.get(part), list):
            raise _bad_file(path, f'has no "{part}" list')
    known = _parts_of(splits)
    root = Path(splits.root)
    file_based = reads_files(splits.image_reader)
    same_file = _same_file(splits) if file_based else lambda path: None
    bad: list[str] = []
    for part in ("train", "val"):
        items = []
        for i, entry in enumerate(data[part]):
            item, why = _resolve(entry, known, root, len(splits.classnames), file_based, part, same_file)
            if item is None:
                bad.append(f"{part}[{i}] = {json.dumps(entry, ensure_ascii=False)[:100]}: {why}")
            else:
                items.append(item)
        parts[part] = items
    if bad:
        raise _bad_file(path, f"has {len(bad)} bad entries, the first {bad[0]}: the file was edited or the dataset "
                              "changed; draw a new split")
    if not parts["train"]:
        raise _bad_file(path, "has no training entries")
    _check_counts(path, splits, parts["train"], params["shots"], params["replace"])
    return FewShotSplit(splits.name, params["shots"], params["seed"], params["order"], parts["train"], parts["val"],
                        params["replace"]), hashlib.sha256(raw).hexdigest()


def _check_counts(path: Path, splits: DatasetSplits, train: list[Item], shots: int, replace: bool) -> None:
    """The training entries against the header: every class drawn, each with exactly `shots` entries (sample_few_shot
    draws K per class, with replacement when a class is short), repeats only where "replace" allowed them."""
    groups = group_by_label(train)
    for label in range(len(splits.classnames)):
        group = groups.get(label, [])
        if not group:
            raise _bad_file(path, f"has no training entry for {_class(splits, label, 'train')} (a draw gives every "
                                  "class its shots; training without it would leave the class unlearned): draw a new "
                                  "split")
        if len(group) != shots:
            raise _bad_file(path, f"lists {len(group)} training entries for {_class(splits, label, 'train')}, but its "
                                  f'"shots" is {shots}: the file was edited; draw a new split')
        if not replace and len({i.path for i in group}) < len(group):
            raise _bad_file(path, f'repeats a training image of {_class(splits, label, "train")} but its "replace" is '
                                  "false: the file was edited; draw a new split")


def _parts_of(splits: DatasetSplits) -> dict[str, tuple[Item, frozenset[str]]]:
    """Every item of the dataset by normalised path, with the dataset splits that list it."""
    out: dict[str, tuple[Item, frozenset[str]]] = {}
    for part in ("train", "val", "test"):
        for item in getattr(splits, part):
            key = os.path.normpath(item.path)
            held = out.get(key)
            out[key] = (held[0] if held else item, (held[1] if held else frozenset()) | {part})
    return out


def _same_file(splits: DatasetSplits) -> Callable[[str], Item | None]:
    """path -> the dataset's item that is the same file (compared by real path: a link to one of its images is that
    image), or None. The real paths are found once, on the first call (split files name the dataset's own paths)."""
    by_real: dict[str, Item] = {}
    dirs: dict[str, str] = {}

    def find(path: str) -> Item | None:
        if not by_real:
            for items in (splits.train, splits.val, splits.test):  # each file is in one split (distinct_images)
                by_real.update((real_path(i.path, dirs), i) for i in items)
        return by_real.get(real_path(path, dirs))

    return find


# where a split file's part may take its images from: blocklora draws train shots from the train split and val
# shots from the val split (or, without one, from train: CLIP-LoRA's ImageNet rule); never from test
_ALLOWED = {"train": {"train"}, "val": {"train", "val"}}


def _resolve(entry: object, known: dict[str, tuple[Item, frozenset[str]]], root: Path, n_classes: int,
             file_based: bool, part: str = "train", same_file: Callable[[str], Item | None] = lambda path: None
             ) -> tuple[Item | None, str]:
    if (not isinstance(entry, list) or len(entry) != 2 or not isinstance(entry[0], str) or not entry[0]
            or not isinstance(entry[1], int) or isinstance(entry[1], bool)):
        return None, "not a [path, label] pair"
    rel, label = entry
    if not 0 <= label < n_classes:
        return None, f"label {label} outside 0..{n_classes - 1}"
    full = os.path.normpath(rel if os.path.isabs(rel) else os.path.join(str(root), rel))
    found = known.get(full) or known.get(os.path.normpath(rel))
    if found is None and os.path.exists(full):  # another name of one of the dataset's images (a link to it)
        same = same_file(full)
        found = known.get(os.path.normpath(same.path)) if same is not None else None
    if found is not None:
        item, held = found
        if not held & _ALLOWED[part]:
            leak = " (training or validating on test images leaks them into the result)" if "test" in held else ""
            return None, f"an image of the dataset's {'/'.join(sorted(held))} split, not of its " \
                         f"{' or '.join(sorted(_ALLOWED[part]))}{leak}"
        if item.label != label:
            return None, f"labelled {label}, but the dataset labels it {item.label}"
        return item, ""
    if file_based and os.path.isfile(full):  # an image outside the dataset's lists (a hand-made split)
        return Item(full, label), ""
    return None, f"no such image ({full})" if file_based else "not an image of the dataset"
