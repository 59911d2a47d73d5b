"""open_clip (and the OpenAI `clip` package): where the attention lives. Towers are ViTs of ResidualAttentionBlocks.

vision: visual.transformer.resblocks.{i}.attn      text: transformer.resblocks.{i}.attn (CLIP)
                                                    or text.transformer.resblocks.{i}.attn (CustomTextCLIP)
Each `attn` is an nn.MultiheadAttention (fused in_proj_weight; out_proj never called as a module).
"""

from __future__ import annotations

from torch import nn

from .sites import AttentionSite

TOWER_PREFIXES = {"vision": ("visual.transformer.resblocks",), "text": ("transformer.resblocks",
                                                                        "text.transformer.resblocks")}


def _blocks(model: nn.Module, prefix: str) -> nn.ModuleList | None:
    try:
        blocks = model.get_submodule(prefix)
    except AttributeError:
        return None
    if isinstance(blocks, nn.ModuleList) and all(hasattr(b, "attn") for b in blocks):
        return blocks
    return None


def attention_sites(model: nn.Module) -> dict[str, list[AttentionSite]] | None:
    if not (hasattr(model, "visual") and hasattr(model, "encode_text")):
        return None
    out: dict[str, list[AttentionSite]] = {}
    for tower, prefixes in TOWER_PREFIXES.items():
        for prefix in prefixes:
            blocks = _blocks(model, prefix)
            if blocks is not None:
                out[tower] = [AttentionSite(tower, i, f"{prefix}.{i}.attn", "fused") for i in range(len(blocks))]
                break
    return out or None
