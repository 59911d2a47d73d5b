"""From image-text cosines to logits, the training loss and the probabilities predict reports.

softmax (CLIP-LoRA): logits = scale * cos, cross-entropy over the classes, softmax probabilities (they sum to 1).
sigmoid (SigLIP, Zhai et al. 2023, eq. 1): logits = scale * cos + bias, one binary cross-entropy per (image, class)
with the true class positive, and per-class probabilities sigma(logit) that need not sum to 1.
The scale is a number (CLIP-LoRA uses 100) or "auto", the checkpoint's own learned exp(logit_scale).
"""

from __future__ import annotations

import typing
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from ..choices import Loss
from ..errors import ConfigError

KINDS = typing.get_args(Loss)


@dataclass(frozen=True)
class Logits:
    """How (B, C) cosines become logits (`scale` * cos, + `bias` for sigmoid) and what they feed (`kind`)."""

    scale: float = 100.0
    bias: float | None = None
    kind: str = "softmax"

    def __call__(self, cosines: torch.Tensor) -> torch.Tensor:
        """(B, C) cosines -> (B, C) logits, the bias included for sigmoid."""
        logits = self.scale * cosines
        return logits + self.bias if self.kind == "sigmoid" and self.bias is not None else logits

    def loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The loss of (B, C) logits (from __call__) against (B,) labels, SUMMED over the B samples (the caller
        divides by the global batch). softmax: cross-entropy; sigmoid: -sum_j log sigma(z_j logit_j), z_j = +1
        for the true class and -1 for the others."""
        if self.kind == "sigmoid":
            targets = F.one_hot(labels, logits.shape[-1]).to(logits.dtype)
            return F.binary_cross_entropy_with_logits(logits, targets, reduction="sum")
        return F.cross_entropy(logits, labels, reduction="sum")

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        """(B, C) probabilities: softmax over the classes, or each class's own sigmoid."""
        return logits.sigmoid() if self.kind == "sigmoid" else logits.softmax(-1)

    def to_dict(self) -> dict[str, Any]:
        return {"scale": self.scale, "bias": self.bias, "kind": self.kind}


def resolve(scale: float | str, kind: str, learned_scale: float | None, learned_bias: float | None,
            model: str) -> Logits:
    """train.logit_scale and train.loss against what the checkpoint learned (Backbone.learned_logit_scale/_bias).

    Raises ConfigError for "auto" on a model without a learned scale, or sigmoid on one without a learned bias.
    """
    if kind not in KINDS:
        raise ConfigError(f"unknown loss {kind!r}: use one of {', '.join(KINDS)}")
    if scale == "auto":
        if learned_scale is None:
            raise ConfigError(f"train.logit_scale=auto: {model} has no learned logit scale; give a number "
                              "(CLIP-LoRA uses 100)")
        scale = learned_scale
    if kind == "sigmoid" and learned_bias is None:
        raise ConfigError(f"train.loss=sigmoid is SigLIP's loss and needs its learned logit bias: {model} has none; "
                          "use train.loss=softmax")
    return Logits(float(scale), learned_bias if kind == "sigmoid" else None, kind)
