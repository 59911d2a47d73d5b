"""Features and accuracy: text features per class (template ensembles), image features, top-1 and per-class.

Counts (correct and total per class) are what ranks reduce under torchrun, so accuracy is exact across shards.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from ..backbones.base import Backbone, move
from ..data.decode import reads_files
from ..data.images import ImageDataset, collate_reported
from ..data.layout import prompt_name
from ..data.types import DatasetSplits, Item
from ..errors import BlockLoRAError, ConfigError, DataError
from .logits import Logits
from .progress import progress
from .runtime import Runtime, eval_mode

log = logging.getLogger("blocklora")

TEXT_CHUNK = 1000  # prompts per text-tower pass (bounds memory for large class sets)


def prompts(classnames: Sequence[str], template: str) -> list[str]:
    """The texts the text tower encodes for `classnames` under `template` (one '{}'), in class order.

    The one place a class name becomes prompt text (data.layout.prompt_name: "_" -> space, stripped, as CoOp and
    CLIP-LoRA do): training, eval, predict, the demo, the zero-shot cache key and an export's classifier
    (trained.classifier) all go through it, so an export's "prompts" are the texts blocklora scores with."""
    return [template.format(prompt_name(c)) for c in classnames]


def encode_classes(backbone: Backbone, classnames: Sequence[str], templates: Sequence[str],
                   runtime: Runtime) -> torch.Tensor:
    """(C, D) L2-normalised class embeddings; several templates are averaged (CLIP's prompt ensembling).

    Runs with whatever grad mode the caller has: training calls it with grad when the text tower is adapted.
    """
    per_template = []
    for template in templates:
        texts = prompts(classnames, template)
        warn_if_prompts_collide(backbone, texts)
        chunks = []
        for i in range(0, len(texts), TEXT_CHUNK):
            tokens = move(backbone.tokenize(texts[i:i + TEXT_CHUNK]), runtime.device)
            with runtime.autocast():
                chunks.append(backbone.encode_texts(tokens).float())
        per_template.append(F.normalize(torch.cat(chunks), dim=-1))
    if len(per_template) == 1:
        return per_template[0]
    return F.normalize(torch.stack(per_template).mean(0), dim=-1)


def warn_if_prompts_collide(backbone: Backbone, texts: Sequence[str]) -> None:
    """Warn (once per backbone and prompt list) when distinct prompts tokenize identically.

    Every family cuts a prompt to its text context (77 tokens for CLIP); two class names that differ only past
    that point give the same tokens, the same text embedding, and classes the model cannot tell apart.
    """
    seen = backbone.__dict__.setdefault("_checked_prompts", set())
    key = hash(tuple(texts))
    if key in seen:
        return
    seen.add(key)
    tokens = backbone.tokenize(texts)
    ids = tokens["input_ids"] if isinstance(tokens, dict) else tokens
    first: dict[tuple[int, ...], str] = {}
    same: list[tuple[str, str]] = []
    for text, row in zip(texts, ids.tolist()):
        other = first.setdefault(tuple(row), text)
        if other != text:
            same.append((other, text))
    if same:
        a, b = same[0]
        log.warning("%d class prompt(s) become identical to another once cut to %s's text context (e.g. %r and %r): "
                    "the model cannot tell those classes apart; shorten the class names", len(same), backbone.name,
                    a[:80], b[:80])


class Features(NamedTuple):
    """Image features of an evaluation pass: (N, D) L2-normalised fp32, (N,) labels, and the images left out."""

    feats: torch.Tensor
    labels: torch.Tensor
    bad: list[tuple[str, str]]


@torch.no_grad()
def image_features(backbone: Backbone, items: Sequence[Item], reader: Callable, runtime: Runtime,
                   batch_size: int = 128, workers: int = 0, desc: str = "eval") -> Features:
    """L2-normalised (N_local, D) fp32 features and labels of this rank's shard of `items` (all of them on 1 rank).

    Each image is decoded once. One that cannot be read is left out and listed in `bad` (gathered from every rank,
    so all ranks see the same list); the caller decides whether that is an error."""
    shard = list(items)[runtime.rank::runtime.world_size]
    loader = DataLoader(ImageDataset(shard, backbone.eval_transform(), reader, report=True), batch_size=batch_size,
                        num_workers=workers, pin_memory=runtime.device.type == "cuda", collate_fn=collate_reported)
    feats, labels, bad = [], [], []
    with eval_mode(backbone.model):
        for images, y, unreadable in progress(loader, desc=desc, disable=not runtime.is_main, leave=False,
                                              unit="batch"):
            bad += unreadable
            if images is None:
                continue
            with runtime.autocast():
                f = backbone.encode_images(images.to(runtime.device, non_blocking=True))
            feats.append(F.normalize(f.float(), dim=-1).cpu())
            labels.append(y)
    if runtime.world_size > 1:
        import torch.distributed as dist

        shards: list[list[tuple[str, str]]] = [[] for _ in range(runtime.world_size)]
        dist.all_gather_object(shards, bad)
        bad = [b for s in shards for b in s]
    if not feats:
        return Features(torch.empty(0, 0), torch.empty(0, dtype=torch.long), bad)
    return Features(torch.cat(feats), torch.cat(labels), bad)


def finite_scores(scores: torch.Tensor) -> torch.Tensor:
    """`scores` (N, C), refused when any is NaN or infinite: an argmax over them is no prediction (torch takes a NaN
    as the largest), so an accuracy or a top-k of them would be a number that means nothing. Raises BlockLoRAError."""
    bad = ~torch.isfinite(scores).all(dim=-1)
    if bool(bad.any()):
        raise BlockLoRAError(f"the model produced non-finite scores (NaN or infinite) for {int(bad.sum())} of "
                             f"{len(scores)} images: the adapter or the weights are damaged, or its training diverged; "
                             "retrain it (a lower learning rate) or use an intact one")
    return scores


def predicted_counts(pred: torch.Tensor, labels: torch.Tensor, n_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(correct per class, total per class) of predicted class indices."""
    correct = torch.zeros(n_classes, dtype=torch.long)
    total = torch.zeros(n_classes, dtype=torch.long)
    if len(labels):
        total.index_add_(0, labels, torch.ones_like(labels))
        correct.index_add_(0, labels, (pred == labels).long())
    return correct, total


def reduce_counts(correct: torch.Tensor, total: torch.Tensor, runtime: Runtime) -> tuple[torch.Tensor, torch.Tensor]:
    if runtime.world_size > 1:
        import torch.distributed as dist

        both = torch.stack([correct, total]).to(runtime.device)
        dist.all_reduce(both)
        correct, total = both.cpu()
    return correct, total


def summarize(correct: torch.Tensor, total: torch.Tensor, classnames: Sequence[str]) -> dict[str, Any]:
    """top1, n, mean_per_class and per_class: one entry per class index (two classes may share a name), with its
    name, top-1 (None without test images) and number of test images."""
    n = int(total.sum())
    per_class = [{"index": i, "class": c, "top1": round(100.0 * int(k) / int(t), 4) if int(t) else None, "n": int(t)}
                 for i, (c, k, t) in enumerate(zip(classnames, correct, total))]
    valid = [r["top1"] for r in per_class if r["top1"] is not None]
    return {"top1": round(100.0 * int(correct.sum()) / max(n, 1), 4), "n": n,
            "mean_per_class": round(sum(valid) / max(len(valid), 1), 4), "per_class": per_class}


def accuracy(backbone: Backbone, items: Sequence[Item], reader: Callable, classnames: Sequence[str],
             templates: Sequence[str], runtime: Runtime, batch_size: int = 128, workers: int = 0,
             desc: str = "eval", features: Features | None = None, frozen: bool = False,
             keep: bool = False) -> dict[str, Any]:
    """Top-1 and per-class accuracy of `backbone` as it is (adapted or not). Pass `features` to reuse images.

    "unreadable" lists the (path, reason) of images the pass could not decode; they are not counted. A backbone
    carrying a baseline's head (methods/: `backbone.head`) is scored by the head, unless `frozen` (zero-shot).
    keep=True (one process): also "predictions", (the evaluated items in order, their (N, C) scores: image-class
    cosines, or the head's logits when a head scores), for engine/predictions.py; the caller pops it before writing
    the result anywhere."""
    head = None if frozen else getattr(backbone, "head", None)
    if head is not None:
        head = head.for_classes(list(classnames))  # a head that cannot score these classes fails before any work
    else:
        with torch.no_grad(), eval_mode(backbone.model):
            txt = encode_classes(backbone, classnames, templates, runtime).cpu()
    if features is None:
        features = image_features(backbone, items, reader, runtime, batch_size, workers, desc)
    # (N, C) scores, computed once: the counts, and the predictions with keep, are read from them
    feats = features.feats
    if not len(feats):
        scores = torch.empty(0, len(classnames))
    elif head is not None:
        with torch.no_grad():
            scores = torch.cat([head.logits(feats[i:i + 4096].to(runtime.device)).float().cpu()
                                for i in range(0, len(feats), 4096)])
    else:
        scores = feats @ txt.T  # image-class cosines (both L2-normalised)
    counts = predicted_counts(finite_scores(scores).argmax(-1), features.labels, len(classnames))
    correct, total = reduce_counts(*counts, runtime)
    out = {**summarize(correct, total, classnames), "unreadable": list(features.bad)}
    if keep and runtime.world_size == 1:
        bad = {p for p, _ in features.bad}
        kept = [i for i in items if i.path not in bad]
        if len(kept) == len(feats):  # features given by the caller for the same items
            out["predictions"] = (kept, scores if kept else None)
    return out


def score_logits(backbone: Backbone, logits: Logits) -> Logits:
    """How the scores of accuracy(keep=True) become probabilities: a baseline head's logits as they are (softmax over
    them, as the head was trained), image-class cosines through the run's `logits` (scale, bias, loss)."""
    return Logits(1.0) if getattr(backbone, "head", None) is not None else logits


def prompt_collisions(classnames: Sequence[str], template: str) -> list[str]:
    """One line per group of classes whose prompts are identical (the model cannot tell them apart): e.g. "red_apple"
    and "red apple", or ImageNet's two "missile" classes in CLIP's list."""
    by_prompt: dict[str, list[int]] = {}
    for i, text in enumerate(prompts(classnames, template)):
        by_prompt.setdefault(" ".join(text.split()).casefold(), []).append(i)  # as CLIP tokenizers see it
    return [f"classes {' and '.join(f'{i} ({classnames[i]!r})' for i in group)} have the same prompt "
            f"{prompts([classnames[group[0]]], template)[0]!r}: they are scored separately but the model cannot tell "
            "them apart; rename one" for group in by_prompt.values() if len(group) > 1]


# -- zero-shot: the frozen model, cached -------------------------------------------------------------------------------
def zero_shot(backbone: Backbone, data: DatasetSplits, items: Sequence[Item], templates: Sequence[str],
              runtime: Runtime, batch_size: int, workers: int, use_cache: bool = True,
              features: Features | None = None, need_features: bool = False,
              split: str = "test") -> tuple[dict[str, Any], Features | None]:
    """(accuracy, frozen image features) of the frozen model (adapters, if any, switched off) on `items` of `split`;
    the accuracy is cached by every input (zero_shot_key). No items is a DataError: an accuracy over nothing is not 0%.

    `features`: the frozen features of the same items from an earlier call (several prompt sets decode the images
    once). The features are returned when computed or given; with need_features they are computed even on a cache
    hit (a text-only adapter's evaluation reuses them). The accuracy's "unreadable" lists images the pass could not
    decode; "cached" says whether it was read from the cache."""
    from ..adapters.inject import adapters_disabled
    from .distributed import all_ranks

    if not items:
        raise DataError(f"dataset {data.name} at {data.root} has no {split} images: check --root and the "
                        f"dataset's layout, or choose another --split")
    key = zero_shot_key(backbone, runtime, data, split, items, templates)
    cached = read_cached(key, items, data.classnames) if use_cache else None
    if runtime.world_size > 1 and not all_ranks(cached is not None, runtime.device):
        cached = None  # a cache on some ranks only (node-local homes): all compute, as the evaluation is collective
    if cached is not None and not need_features:
        return {"unreadable": [], **cached, "cached": True}, features
    with adapters_disabled(backbone.model):
        if features is None:
            features = image_features(backbone, items, data.image_reader, runtime, batch_size, workers, "zero-shot")
        result = accuracy(backbone, items, data.image_reader, data.classnames, templates, runtime, features=features,
                          frozen=True)
    if runtime.is_main:
        write_cached(key, result)
    return {**result, "cached": False}, features


# -- zero-shot cache ------------------------------------------------------------------------------------------------
# Part of every key: bump it whenever the cached result's layout changes, so that a cache written by another
# version of blocklora (or another checkout sharing ~/.cache/blocklora) is a miss, never a misread. 4: images with
# transparency or an EXIF orientation decode differently (data/decode.py), transformers models use their processor.
CACHE_FORMAT = 4


def cache_dir() -> Path:
    return Path(os.environ.get("BLOCKLORA_CACHE", Path.home() / ".cache" / "blocklora"))


def zero_shot_key(backbone: Backbone, runtime: Runtime, data: DatasetSplits, split: str, items: Sequence[Item],
                  templates: Sequence[str]) -> str:
    """Every input of a zero-shot accuracy, hashed: a changed input is a cache miss, never an old number.

    The weights (fingerprint, MLP activation, dtype), the arithmetic (autocast dtype, device type), the
    preprocessing (size, mean, std, the transform itself), the data (dataset, root, split name, each item's path,
    label, size and modification time, or the source files' for datasets held in arrays) and the prompts.
    """
    from ..backbones.activation import mlp_activation

    h = hashlib.sha256()
    h.update(json.dumps({
        "format": CACHE_FORMAT, "fp": backbone.fingerprint, "model": backbone.name, "family": backbone.family,
        "activation": mlp_activation(backbone.model), "weights_dtype": backbone.weights_dtype,
        "autocast": runtime.precision, "device": runtime.device.type, "size": backbone.image_size,
        "mean": backbone.mean, "std": backbone.std, "transform": repr(backbone.eval_transform()),
        "preprocess": {k: v for k, v in backbone.preprocess.to_dict().items() if k != "source"},
        "reader": getattr(data.image_reader, "__qualname__", type(data.image_reader).__qualname__),
        "dataset": data.name, "root": str(data.root), "split": split, "classnames": list(data.classnames),
        "templates": list(templates), "prompts": [prompts(data.classnames, t) for t in templates],
    }, sort_keys=True).encode())
    file_based = reads_files(data.image_reader)
    for item in items:
        h.update(f"{item.path}\0{item.label}\0{_stamp(item.path) if file_based else ''}\n".encode())
    if not file_based:  # images decoded from files under the root (e.g. Fashion-MNIST's idx files)
        root = Path(data.root)
        for f in sorted(root.iterdir()) if root.is_dir() else [root]:
            h.update(f"{f.name}\0{_stamp(str(f))}\n".encode())
    return h.hexdigest()[:24]


def _stamp(path: str) -> str:
    """Size and modification time (ns): an image replaced in place changes it without a decode."""
    try:
        st = os.stat(path)
    except OSError:
        return "missing"
    return f"{st.st_size}:{st.st_mtime_ns}"


def read_cached(key: str, items: Sequence[Item], classnames: Sequence[str]) -> dict[str, Any] | None:
    """The cached zero-shot accuracy of `items` (labels index `classnames`), or None: no entry, or one that is
    unreadable or fails check_cached (a warning says so; the caller recomputes it and replaces the entry)."""
    from ..reading import loads, read_text, reason

    path = cache_dir() / "zeroshot" / f"{key}.json"
    if not os.path.lexists(path):
        return None
    try:
        return check_cached(loads(read_text(path)), items, classnames)
    except (OSError, ValueError) as e:  # unreadable, not JSON, too deep, or failing the check (ConfigError)
        log.warning("warning: ignoring the zero-shot cache entry %s (%s): computing the accuracy again", path,
                    e if isinstance(e, ConfigError) else reason(e))
        return None


def check_cached(entry: Any, items: Sequence[Item], classnames: Sequence[str]) -> dict[str, Any]:
    """A cache entry as `accuracy` returned it for these items, or ConfigError: the fields and their types, the
    unreadable images among the items, each class's count equal to its readable items, and top1, mean_per_class and
    each class's top1 what `summarize` gives for whole numbers of correct images (a number nobody measured, or one
    measured on other images, fails)."""
    from ..checks import maybe, num, text
    from ..reading import fields, listof, mapping

    n_classes = len(classnames)
    rules = {"top1": num(0, 100), "n": num(0, len(items), integer=True), "mean_per_class": num(0, 100),
             "per_class": listof(mapping, n_classes, n_classes), "unreadable": listof(listof(text(), 2, 2))}
    f = fields(entry, rules, "the entry")
    if set(entry) != set(rules):
        raise ConfigError(f"the entry has the fields {sorted(entry)}, not {sorted(rules)}")
    paths = {i.path for i in items}
    bad = [tuple(pair) for pair in f["unreadable"]]
    if not {p for p, _ in bad} <= paths or len({p for p, _ in bad}) != len(bad):
        raise ConfigError("the entry's unreadable images are not among the images evaluated")
    skipped = {p for p, _ in bad}
    total = [0] * n_classes
    for item in items:
        if item.path not in skipped:
            total[item.label] += 1
    correct = []
    for i, row in enumerate(f["per_class"]):
        share = fields(row, {"top1": maybe(num(0, 100))}, f"the entry's per_class[{i}]")["top1"]
        correct.append(round(share * total[i] / 100) if share is not None and total[i] else 0)
    expected = summarize(torch.tensor(correct), torch.tensor(total), classnames)
    wrong = next((k for k in expected if entry[k] != expected[k]), None)
    if wrong is not None:
        raise ConfigError(f"the entry's {wrong} does not follow from whole numbers of correct images of the "
                          f"{sum(total)} readable test images (a number nobody measured?)")
    return {**expected, "unreadable": bad}


def write_cached(key: str, result: dict[str, Any]) -> None:
    from .files import write_json

    path = cache_dir() / "zeroshot" / f"{key}.json"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json(path, result)
    except OSError:
        pass  # a cache that cannot be written is only a cache
