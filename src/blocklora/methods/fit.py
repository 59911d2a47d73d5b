"""A baseline's training inside `blocklora train` (pipeline/run.py calls fit_head in place of the adapter loop).

    features   the shots and validation shots, frozen, computed once (features.py): plain, and `views` augmented views
               for the methods that train on augmentations (registry: tip_adapter, tip_adapter_f, coop)
    text       the zero-shot classifier T (C, D) with the run's template
    head       built and fitted (probe / tip_adapter / tip_adapter_f / coop), its history written to metrics.jsonl

The run's seed seeds the head's initialisation, its batch order and the augmented views. Nothing is checkpointed:
a baseline trains in seconds to minutes on frozen features; an interrupted run is started again (--resume reruns it).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

import torch

from ..engine import evaluate as ev
from ..engine.fit import FitState, TrainingDiverged
from ..engine.runtime import seed_everything
from . import features
from .base import FitData, Head
from .registry import record

log = logging.getLogger("blocklora")


@dataclass
class HeadFit:
    head: Head
    state: FitState  # what results.json records of training, as for the adapters


def fit_data(p: Any, workers: int) -> FitData:
    """The frozen features and zero-shot classifier of a prepared run (pipeline/prepare.Prepared)."""
    cfg, rt, backbone, data = p.cfg, p.runtime, p.backbone, p.data
    rec = record(cfg.adapter.method)
    batch = cfg.eval.batch_size
    train = features.plain(backbone, p.train_items, data.image_reader, rt, batch, workers).to(rt.device)
    labels = torch.tensor([i.label for i in p.train_items], dtype=torch.long, device=rt.device)
    val_items = list(p.fewshot.val)
    val = features.plain(backbone, val_items, data.image_reader, rt, batch, workers).to(rt.device)
    val_labels = torch.tensor([i.label for i in val_items], dtype=torch.long, device=rt.device)
    if not len(val_items) and rec.searches and cfg.baseline.search:  # coop searches nothing: it needs no val shots
        log.warning("warning: no validation shots (the dataset has no val split and sampler %s draws none): %s "
                    "keeps its published default hyper-parameters instead of searching them (docs/recipe.md)",
                    cfg.data.sampler, cfg.adapter.method)
    views = features.views(backbone, p.train_items, data.image_reader, rt, cfg.baseline.views, cfg.data.seed, batch,
                           workers).to(rt.device) if rec.views else None
    with torch.no_grad():
        text = ev.encode_classes(backbone, data.classnames, [cfg.train.template], rt).float()
    return FitData(train, labels, views, val if len(val_items) else train[:0], val_labels, text, p.logits.scale,
                   list(data.classnames), cfg.train.template, cfg.baseline, cfg.data.shots, cfg.data.seed, backbone)


def build(method: str, data: FitData) -> Head:
    """The untrained head of `method` on `data` (the zero-shot classifier, the cache, the initial context)."""
    cls = record(method).head_class()
    if method == "probe":
        return cls(data.text, data.scale, data.classnames)
    if method.startswith("tip_adapter"):
        return cls.build(data)
    return cls(data.backbone, data.classnames, data.scale, data.cfg.n_ctx, data.cfg.ctx_init)


def fit_head(p: Any, workers: int, on_record=None) -> tuple[HeadFit, float]:
    """Compute the features, build and fit the run's head, attach it to the backbone (its evaluation then scores
    with it). `on_record` gets each history record (metrics.jsonl). Returns (the fit, training seconds)."""
    t0 = time.perf_counter()
    seed_everything(p.cfg.data.seed)
    data = fit_data(p, workers)
    method = p.cfg.adapter.method
    head = build(method, data).to(p.runtime.device)
    given = p.cfg.baseline.method_lr
    lr = ("lower baseline.method_lr " + (f"(now {given:g})" if given else "below the paper's")
          if record(method).reads("baseline.method_lr") else "check the data and the frozen weights")
    try:
        history = head.fit(data)
    except TrainingDiverged as e:  # the step, from the epoch loop (base.train_epoch)
        raise TrainingDiverged(f"{method} diverged: {e}: {lr}") from None
    bad = [k for k, v in head.tensors().items() if not bool(torch.isfinite(v).all())]
    if bad:  # the probe's fits, a cache of non-finite features: no step to name
        raise TrainingDiverged(f"{method} diverged: its {bad[0]} became non-finite after {len(history)} fits / "
                               f"searches: {lr}")
    head.eval()
    # results.json's "iters": optimizer steps (tip_adapter_f, coop), the probe's fits, 0 for the training-free cache
    state = FitState(step=max((r.get("step", 0) for r in history), default=0), history=history)
    losses = [r["loss"] for r in history if r.get("loss") is not None]
    if losses:
        state.last_loss = float(losses[-1])
    for r in history:
        if on_record is not None:
            on_record(r)
    p.backbone.head = head
    log.info("%s: %s", p.cfg.adapter.method, ", ".join(f"{k} {v:g}" for k, v in head.meta().items()
                                                       if isinstance(v, (int, float)) and not isinstance(v, bool)))
    return HeadFit(head, state), time.perf_counter() - t0
