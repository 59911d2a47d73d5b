"""transformers CLIP (CLIPModel, CLIPVisionModel, CLIPTextModel, ...): where the attention lives.

vision: vision_model.encoder.layers.{i}.self_attn      text: text_model.encoder.layers.{i}.self_attn
Each self_attn (CLIPAttention) holds four Linears: q_proj, k_proj, v_proj, out_proj.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from ..errors import BackboneError
from .base import Backbone
from .network import hub_reachable
from .sites import AttentionSite

TOWER_PREFIXES = {"vision": "vision_model.encoder.layers", "text": "text_model.encoder.layers"}
LINEARS = (("q", "q_proj"), ("k", "k_proj"), ("v", "v_proj"), ("o", "out_proj"))


def attention_sites(model: nn.Module) -> dict[str, list[AttentionSite]] | None:
    out: dict[str, list[AttentionSite]] = {}
    for tower, prefix in TOWER_PREFIXES.items():
        try:
            layers = model.get_submodule(prefix)
        except AttributeError:
            continue
        if isinstance(layers, nn.ModuleList) and all(hasattr(layer, "self_attn") for layer in layers):
            out[tower] = [AttentionSite(tower, i, f"{prefix}.{i}.self_attn", "linears", LINEARS)
                          for i in range(len(layers))]
    return out or None


class HFClipBackbone(Backbone):
    """transformers CLIPModel from a local directory (config.json + weights, tokenizer, image processor) or hub id."""

    family = "transformers"

    def __init__(self, name: str, model: nn.Module, tokenizer, source: str) -> None:
        vc = model.config.vision_config
        mean, std = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
        processor = _image_processor(source)
        if processor is not None:
            mean, std = processor.image_mean, processor.image_std
        super().__init__(name, model, source, vc.image_size, mean, std)
        self.tokenizer = tokenizer
        self.model.eval()

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        return _tensor(self.model.get_image_features(pixel_values=images))

    def set_grad_checkpointing(self, enabled: bool = True) -> None:
        """transformers' per-layer checkpointing, non-reentrant: the frozen embeddings' output needs no gradient,
        and the reentrant variant would then pass none to the adapters inside the layers."""
        m = self.model
        if hasattr(m, "activation_checkpointing_enable"):  # transformers >= 5 (the old names warn)
            if enabled:
                m.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
            else:
                m.activation_checkpointing_disable()
        elif enabled:
            m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        else:
            m.gradient_checkpointing_disable()

    def tokenize(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        # padding=True pads to the longest prompt of the batch: with the causal mask and pooling at the EOS
        # token this is exact, and is the same cut as our open_clip path.
        out = self.tokenizer(list(texts), padding=True, truncation=True, return_tensors="pt")
        return {"input_ids": out["input_ids"], "attention_mask": out["attention_mask"]}

    def encode_texts(self, tokens: dict[str, torch.Tensor]) -> torch.Tensor:
        return _tensor(self.model.get_text_features(**tokens))

    def export(self, state_dict: dict[str, torch.Tensor], path: str | os.PathLike) -> list[str]:
        """A stock transformers directory: CLIPModel.from_pretrained(path) loads it (no blocklora needed)."""
        path = Path(path)
        self.model.save_pretrained(path, state_dict=state_dict)
        self.tokenizer.save_pretrained(path)
        processor = _image_processor(self.pretrained)
        if processor is not None:
            processor.save_pretrained(path)
        return sorted(str(p) for p in path.iterdir())


def _tensor(out) -> torch.Tensor:
    """transformers 5.x returns an output object (embedding in .pooler_output); 4.x a tensor."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def _image_processor(source: str | None):
    from transformers import CLIPImageProcessor

    if source is None:
        return None
    try:
        return CLIPImageProcessor.from_pretrained(source, local_files_only=os.path.isdir(source))
    except (OSError, ValueError):
        return None


def load(spec: str) -> HFClipBackbone:
    """`spec` is a local directory or a hub id (the part after 'hf:')."""
    from transformers import AutoTokenizer, CLIPModel

    local = os.path.isdir(spec)
    if not local and (spec.startswith((".", "/", "~")) or os.path.sep in spec and spec.count("/") > 1):
        raise BackboneError(f"transformers model directory {spec} does not exist: pass a directory holding "
                            "config.json and model.safetensors, or a hub id")
    if not local and not hub_reachable():
        raise BackboneError(f"cannot download {spec} from the hub (no network): download it elsewhere "
                            "(save_pretrained) and pass --model hf:/path/to/dir")
    try:
        model = CLIPModel.from_pretrained(spec, local_files_only=local)
        tokenizer = AutoTokenizer.from_pretrained(spec, local_files_only=local)
    except (OSError, ValueError) as e:
        raise BackboneError(f"cannot load a transformers CLIP model from {spec}: {str(e).splitlines()[0][:200]}") \
            from None
    return HFClipBackbone(f"hf:{spec}", model, tokenizer, spec)
