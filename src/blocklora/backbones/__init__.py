"""Backbones: build a dual-encoder model by name. The one place that maps a --model string to a family."""

from __future__ import annotations

from ..errors import BackboneError
from .base import Backbone


def load_backbone(name: str, pretrained: str | None = None, quick_gelu: str = "auto") -> Backbone:
    """'ViT-B-16' (+ pretrained tag, file or None), 'tiny-clip', 'effnet-minilm', or 'hf:DIR_OR_ID'."""
    if quick_gelu not in ("auto", "yes", "no"):
        raise BackboneError(f"quick_gelu must be auto, yes or no, got {quick_gelu!r}")
    if name.startswith("hf:"):
        from . import hf

        return hf.load(name[3:])
    if name == "effnet-minilm":
        from . import effnet_minilm

        return effnet_minilm.load(pretrained)
    from . import openclip

    return openclip.load(name, pretrained, quick_gelu)


__all__ = ["Backbone", "load_backbone"]
