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
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from ..backbones.base import Backbone, move
from ..data.images import ImageDataset
from ..data.types import DatasetSplits, Item, open_image_file
from .runtime import Runtime, eval_mode

log = logging.getLogger("blocklora")

TEXT_CHUNK = 1000  # prompts per text-tower pass (bounds memory for large class sets)


def prompts(classnames: Sequence[str], template: str) -> list[str]:
    return [template.format(c.replace("_", " ")) for c in classnames]


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


@torch.no_grad()
def image_features(backbone: Backbone, items: Sequence[Item], reader: Callable, runtime: Runtime,
                   batch_size: int = 128, workers: int = 0, desc: str = "eval") -> tuple[torch.Tensor, torch.Tensor]:
    """L2-normalised (N_local, D) fp32 features and labels of this rank's shard of `items` (all of them on 1 rank)."""
    shard = list(items)[runtime.rank::runtime.world_size]
    loader = DataLoader(ImageDataset(shard, backbone.eval_transform(), reader), batch_size=batch_size,
                        num_workers=workers, pin_memory=runtime.device.type == "cuda")
    feats, labels = [], []
    with eval_mode(backbone.model):
        for images, y in tqdm(loader, desc=desc, disable=not runtime.is_main, leave=False, unit="batch"):
            with runtime.autocast():
                f = backbone.encode_images(images.to(runtime.device, non_blocking=True))
            feats.append(F.normalize(f.float(), dim=-1).cpu())
            labels.append(y)
    if not feats:
        return torch.empty(0, 0), torch.empty(0, dtype=torch.long)
    return torch.cat(feats), torch.cat(labels)


def class_counts(img: torch.Tensor, labels: torch.Tensor, txt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(correct per class, total per class) of the nearest class embedding."""
    n_classes = txt.shape[0]
    correct = torch.zeros(n_classes, dtype=torch.long)
    total = torch.zeros(n_classes, dtype=torch.long)
    if img.numel():
        pred = (img @ txt.cpu().T).argmax(dim=-1)
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
    n = int(total.sum())
    per_class = {c: (round(100.0 * int(k) / int(t), 4) if int(t) else None)
                 for c, k, t in zip(classnames, correct, total)}
    valid = [v for v in per_class.values() if v is not None]
    return {"top1": round(100.0 * int(correct.sum()) / max(n, 1), 4), "n": n,
            "mean_per_class": round(sum(valid) / max(len(valid), 1), 4), "per_class": per_class}


def accuracy(backbone: Backbone, items: Sequence[Item], reader: Callable, classnames: Sequence[str],
             templates: Sequence[str], runtime: Runtime, batch_size: int = 128, workers: int = 0,
             desc: str = "eval", features: tuple[torch.Tensor, torch.Tensor] | None = None) -> dict[str, Any]:
    """Top-1 and per-class accuracy of `backbone` as it is (adapted or not). Pass `features` to reuse images."""
    with torch.no_grad(), eval_mode(backbone.model):
        txt = encode_classes(backbone, classnames, templates, runtime)
    img, labels = features if features is not None else image_features(
        backbone, items, reader, runtime, batch_size, workers, desc)
    correct, total = reduce_counts(*class_counts(img, labels, txt), runtime)
    return summarize(correct, total, classnames)


# -- zero-shot cache ------------------------------------------------------------------------------------------------
# Part of every key: bump it whenever the cached result's layout changes, so that a cache written by another
# version of blocklora (or another checkout sharing ~/.cache/blocklora) is a miss, never a misread.
CACHE_FORMAT = 2


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
        "dataset": data.name, "root": str(data.root), "split": split, "classnames": list(data.classnames),
        "templates": list(templates), "prompts": [prompts(data.classnames, t) for t in templates],
    }, sort_keys=True).encode())
    file_based = data.image_reader is open_image_file
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


def read_cached(key: str) -> dict[str, Any] | None:
    path = cache_dir() / "zeroshot" / f"{key}.json"
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def write_cached(key: str, result: dict[str, Any]) -> None:
    from .files import write_json

    path = cache_dir() / "zeroshot" / f"{key}.json"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json(path, result)
    except OSError:
        pass  # a cache that cannot be written is only a cache
