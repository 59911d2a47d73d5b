"""transformers CLIP (CLIPModel, CLIPVisionModel, CLIPTextModel, ...): where the attention lives.

vision: vision_model.encoder.layers.{i}.self_attn      text: text_model.encoder.layers.{i}.self_attn
Each self_attn (CLIPAttention) holds four Linears: q_proj, k_proj, v_proj, out_proj.
"""

from __future__ import annotations

from torch import nn

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
