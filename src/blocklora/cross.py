"""Cross-dataset and domain-generalization evaluation: one trained adapter tested on other datasets.

The adapter is used as trained; only the text side changes: each target's own class names are encoded with the
training template (CoOp's protocol: ImageNet -> the other 10 datasets; ImageNet -> ImageNet-V2/-Sketch/-A/-R, where
A and R are scored over their 200 classes). Targets are read under the run's data root (CoOp's $DATA holds them all).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .backbones import Backbone
from .config import RunConfig
from .data import DatasetSplits, load_dataset
from .engine import evaluate as ev
from .engine.runtime import Runtime
from .errors import DataError

PREFIX = "cross:"  # key prefix of the targets among api.Prepared.eval_sets


def load_targets(cfg: RunConfig) -> dict[str, DatasetSplits]:
    """eval.datasets read under data.root, keyed PREFIX + name; every problem raises here, before any work."""
    out: dict[str, DatasetSplits] = {}
    for name in cfg.eval.datasets:
        try:
            data = load_dataset(name, cfg.data.root)
        except DataError as e:
            raise DataError(f"eval dataset {name} (--eval-datasets): {e}") from None
        if not getattr(data, cfg.eval.split):
            raise DataError(f"eval dataset {name} at {data.root} has no {cfg.eval.split} images: drop it from "
                            "--eval-datasets")
        out[PREFIX + name] = data
    return out


def evaluate_targets(backbone: Backbone, eval_sets: dict[str, DatasetSplits], cfg: RunConfig, runtime: Runtime,
                     workers: int, on_unreadable: Callable[[list[tuple[str, str]]], None] = lambda found: None,
                     ) -> tuple[dict[str, float], dict[str, dict[str, Any]]]:
    """({target name: top-1}, {target name: n, classes, mean_per_class}) for the PREFIX entries of eval_sets.
    `on_unreadable` gets the (path, reason) of the images each pass could not decode (it may raise)."""
    top1: dict[str, float] = {}
    detail: dict[str, dict[str, Any]] = {}
    for key, data in eval_sets.items():
        if not key.startswith(PREFIX):
            continue
        result = ev.accuracy(backbone, getattr(data, cfg.eval.split), data.image_reader, data.classnames,
                             [cfg.train.template], runtime, cfg.eval.batch_size, workers, f"eval {data.name}")
        on_unreadable(result["unreadable"])
        top1[data.name] = result["top1"]
        detail[data.name] = {"n": result["n"], "classes": len(data.classnames),
                             "mean_per_class": result["mean_per_class"]}
    return top1, detail
