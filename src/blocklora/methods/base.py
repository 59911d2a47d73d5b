"""What every baseline is: a Head scoring frozen L2-normalised image features, and what it is fitted on.

    FitData   the shots' frozen features (plain, and augmented views), the validation shots' features, the zero-shot
              text classifier, the logit scale, the backbone (CoOp's text tower) and the run's options
    Head      logits(feats) -> (N, C); fit(data) -> per-epoch history; tensors() / meta() to save; from_saved();
              record_shapes / record_fields: what a saved record must hold (checked by methods/io.py on load)

The image encoder never changes, so a run computes each feature once (features.py) and every epoch of every method
reads them: a step costs the head's own work (CoOp: one text-tower pass over the C prompts).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from .. import checks
from ..config.run_config import BaselineConfig


@dataclass
class FitData:
    """Frozen features of one run. feats are L2-normalised fp32 on the run's device, labels index classnames."""

    train: torch.Tensor  # (N, D) the shots, evaluation preprocessing
    labels: torch.Tensor  # (N,)
    views: torch.Tensor | None  # (V, N, D) the shots under V augmentations, NOT normalised (Tip-Adapter's cache)
    val: torch.Tensor  # (M, D) the validation shots (M may be 0: no val images)
    val_labels: torch.Tensor  # (M,)
    text: torch.Tensor  # (C, D) the zero-shot classifier: normalised text features of the run's template
    scale: float  # the logit scale (CLIP's 100)
    classnames: list[str]
    template: str
    cfg: BaselineConfig
    shots: int
    seed: int
    backbone: Any = None  # CoOp encodes prompts through it


class Head(nn.Module):
    """A baseline's trained part. Subclasses set `method`, implement logits / fit / tensors / meta / from_saved."""

    method: str = ""
    # The saved record, as methods/io.py checks it before from_saved: each tensor's shape in named dimensions
    # (classes: the run record's class count; feature_dim: the image features' width; token_width: the text tower's
    # token embedding width; a head field such as n_ctx; any other name: the same size wherever it appears), and
    # the "head" JSON fields (rules of checks.py; absent ones take record_defaults, and without one are an error).
    record_shapes: ClassVar[dict[str, tuple[str, ...]]] = {}
    record_fields: ClassVar[dict[str, checks.Rule]] = {}
    record_defaults: ClassVar[dict[str, Any]] = {}

    @classmethod
    def record_problem(cls, tensors: dict[str, torch.Tensor]) -> str | None:
        """What is wrong with a saved record's values that its declared shapes cannot say (e.g. a cache's labels that
        are not one-hot), or None; methods/io.check_record calls it after the shapes."""
        return None

    def logits(self, feats: torch.Tensor) -> torch.Tensor:
        """(N, D) L2-normalised image features -> (N, C) logits (softmax over the classes gives probabilities)."""
        raise NotImplementedError

    def fit(self, data: FitData) -> list[dict[str, Any]]:
        """Train (or build) the head; returns one record per epoch (or search) for metrics.jsonl."""
        raise NotImplementedError

    def tensors(self) -> dict[str, torch.Tensor]:
        """What the adapter folder stores (methods/io.py), CPU fp32."""
        raise NotImplementedError

    def meta(self) -> dict[str, Any]:
        """JSON hyper-parameters the head needs back (alpha, beta, n_ctx, the chosen penalty, ...)."""
        return {}

    @classmethod
    def from_saved(cls, tensors: dict[str, torch.Tensor], meta: dict[str, Any], backbone: Any,
                   classnames: list[str], template: str, scale: float) -> Head:
        """The head of a saved record: `tensors` and `meta` (the "head" fields) already checked against
        record_shapes and record_fields (methods/io.py)."""
        raise NotImplementedError

    def for_classes(self, classnames: list[str]) -> Head:
        """The head scoring `classnames` (only CoOp can score classes it was not trained on)."""
        if list(classnames) != list(self.classnames):
            from ..errors import ConfigError

            raise ConfigError(f"a {self.method} head has one row per trained class ({len(self.classnames)}); it "
                              f"cannot score other classes ({len(classnames)} given): evaluate it on the dataset "
                              "and classes it was trained on, or train coop / lora / block_lora for that")
        return self

    @property
    def trainable_params(self) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad)


def accuracy_on(head: Head, feats: torch.Tensor, labels: torch.Tensor) -> float:
    """Top-1 (%) of the head on features; 0 images: nan."""
    if not len(labels):
        return float("nan")
    with torch.no_grad():
        return 100.0 * float((head.logits(feats).argmax(-1) == labels).float().mean())


def cosine_lr(step: int, total: int, base: float, warmup: int = 0, warmup_lr: float | None = None) -> float:
    """torch's CosineAnnealingLR(T_max=total, eta_min=0) at `step`, after `warmup` steps held at `warmup_lr`
    (Dassl's ConstantWarmupScheduler, CoOp's WARMUP_TYPE constant)."""
    import math

    if step < warmup and warmup_lr is not None:
        return warmup_lr
    return base * 0.5 * (1.0 + math.cos(math.pi * min(step, total) / max(1, total)))


def set_lr(opt: torch.optim.Optimizer, lr: float) -> None:
    for group in opt.param_groups:
        group["lr"] = lr


def train_epoch(feats: torch.Tensor, labels: torch.Tensor, order: torch.Tensor, batch: int, batches: int,
                logits_fn: Any, opt: torch.optim.Optimizer, step: int, set_lr: Any = None) -> tuple[float, float, int]:
    """One epoch of cross-entropy steps over the mini-batches `order[i * batch:(i + 1) * batch]`, i < `batches`, of
    the (N, D) features: logits_fn(feats[idx]) -> (B, C) logits; `set_lr(step)` before each step when given (a
    per-step schedule). Returns (the mean loss, top-1 % over the images seen, the step count after the epoch).
    Raises TrainingDiverged at the first step whose loss, or whose update of the trained tensors, is not finite
    (methods/fit.py names the method)."""
    import torch.nn.functional as F

    from ..engine.fit import TrainingDiverged

    losses, correct, seen = [], 0, 0
    for i in range(batches):
        idx = order[i * batch:(i + 1) * batch]
        if set_lr is not None:
            set_lr(step)
        logits = logits_fn(feats[idx])
        loss = F.cross_entropy(logits, labels[idx])
        if not bool(torch.isfinite(loss.detach())):
            raise TrainingDiverged(f"the loss became {loss.item()} at step {step + 1}")
        opt.zero_grad()
        loss.backward()
        opt.step()
        step += 1
        if not all(bool(torch.isfinite(p.detach()).all()) for g in opt.param_groups for p in g["params"]):
            raise TrainingDiverged(f"the trained tensors became non-finite at step {step}")
        losses.append(loss.item())
        correct += int((logits.argmax(-1) == labels[idx]).sum())
        seen += len(idx)
    return sum(losses) / len(losses), round(100 * correct / seen, 2), step
