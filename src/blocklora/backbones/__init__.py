"""Backbones: build a dual-encoder model by name. The one place that maps a --model string to a family."""

from __future__ import annotations

from ..errors import BackboneError
from .base import Backbone


def load_backbone(name: str, pretrained: str | None = None, quick_gelu: str = "auto",
                  recorded_quick_gelu: bool | None = None) -> Backbone:
    """'ViT-B-16' (+ pretrained tag, file, export folder or None), 'tiny-clip', 'effnet-minilm', or 'hf:DIR_OR_ID'.

    `quick_gelu` is the user's request (auto, yes, no; backbones/activation.py says how auto decides);
    `recorded_quick_gelu` the activation an adapter was trained with, which a reload must reproduce.
    """
    if quick_gelu not in ("auto", "yes", "no"):
        raise BackboneError(f"quick_gelu must be auto, yes or no, got {quick_gelu!r}")
    if name.startswith("hf:"):
        from . import hf

        return hf.load(name[3:], quick_gelu, recorded_quick_gelu)
    if name == "effnet-minilm":
        if quick_gelu != "auto":
            raise BackboneError("--quick-gelu does not apply to effnet-minilm (EfficientNet + MiniLM have no CLIP "
                                "MLP to switch): leave it at auto")
        from . import effnet_minilm

        return effnet_minilm.load(pretrained)
    from . import openclip

    return openclip.load(name, pretrained, quick_gelu, recorded_quick_gelu)


__all__ = ["Backbone", "load_backbone"]
