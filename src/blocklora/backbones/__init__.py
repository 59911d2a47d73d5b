"""Backbones: build a dual-encoder model by name, and tell inject where adapters go in each family.

The one place that maps a --model string to a family. Importing this package registers every family's targeting
finder with the method library (adapters.targeting), so blocklora.inject(model) works on their models.
"""

from __future__ import annotations

import os

from ..adapters.targeting import register_targeting
from ..errors import BackboneError
from . import effnet_minilm, hf, openclip
from .base import Backbone

register_targeting("effnet-minilm", effnet_minilm.placement)
register_targeting("open_clip", openclip.placement)  # CLIP, CustomTextCLIP (timm towers), CoCa, OpenAI clip
register_targeting("transformers", hf.placement)  # CLIP, MetaCLIP 2, SigLIP, Chinese-CLIP, AltCLIP


AUTO = "auto"  # --pretrained not given: the model's own default (default_pretrained)


def default_pretrained(name: str) -> str | None:
    """What --pretrained means when it is not given, by model: the one place that decides it (RunConfig.resolved
    records the answer; load_backbone applies it).

    effnet-minilm: "packaged" (its weights ship with the package); tiny-clip: None (random init, it has no other);
    open_clip names: "openai" where open_clip has OpenAI's weights for the name, else a BackboneError listing the
    name's tags; hf:DIR_OR_ID: the model folder itself, as an absolute path (a hub id as it is), so a run records
    where its weights are whatever the working directory.
    """
    if name.startswith("hf:"):
        spec = name[3:]
        return os.path.abspath(spec) if os.path.isdir(spec) else spec
    if name == "effnet-minilm":
        return "packaged"
    return openclip.default_pretrained(name)


def load_backbone(name: str, pretrained: str | None = AUTO, quick_gelu: str = "auto",
                  recorded_quick_gelu: bool | None = None, tokenizer: str | None = None,
                  text: bool = False) -> Backbone:
    """'ViT-B-16' (+ pretrained tag, file, export folder or None), 'tiny-clip', 'effnet-minilm', or 'hf:DIR_OR_ID'.

    `pretrained` "auto": the model's default (default_pretrained). For hf: models it is the folder (or hub id) the
    model is loaded from, by default the one --model names: an adapter whose model folder moved is reloaded from
    its new place. `quick_gelu` is the user's request (auto, yes, no; backbones/activation.py says how auto
    decides); `recorded_quick_gelu` the activation an adapter was trained with, which a reload must reproduce;
    `tokenizer` a local folder with the model's tokenizer, for models whose tokenizer comes from a hub (SigLIP's);
    text=True: the caller will encode prompts, so a tokenizer out of reach fails before any weights are read or
    built.
    Raises BackboneError (one line, with the fix) for anything that cannot be built or loaded.
    """
    if quick_gelu not in ("auto", "yes", "no"):
        raise BackboneError(f"quick_gelu must be auto, yes or no, got {quick_gelu!r}")
    if pretrained == AUTO:
        pretrained = default_pretrained(name)
    if name.startswith("hf:"):
        spec = name[3:] if pretrained in (None, "none") else pretrained
        if spec != name[3:] and not os.path.isdir(spec) and (os.path.sep in spec or os.path.splitext(spec)[1]):
            raise BackboneError(f"--pretrained {spec}: no such folder; for hf: models --pretrained names the "
                                "transformers model folder (or hub id) to load, by default the --model folder")
        backbone = hf.load(spec, quick_gelu, recorded_quick_gelu, tokenizer)
        if text:
            backbone.tokenizer  # noqa: B018 - loaded now: one out of reach fails before any image is read
        return backbone
    if name == "effnet-minilm":
        if quick_gelu != "auto":
            raise BackboneError("--quick-gelu does not apply to effnet-minilm (EfficientNet + MiniLM have no CLIP "
                                "MLP to switch): leave it at auto")
        if tokenizer is not None:
            raise BackboneError("effnet-minilm's tokenizer ships with its packaged weights: drop --tokenizer")
        return effnet_minilm.load(pretrained)
    return openclip.load(name, pretrained, quick_gelu, recorded_quick_gelu, tokenizer, text)


__all__ = ["AUTO", "Backbone", "default_pretrained", "load_backbone"]
