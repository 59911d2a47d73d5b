"""timm image towers: the one place that knows timm's attention module names.

open_clip builds SigLIP / SigLIP 2 (VisionTransformer), PE-Core (Eva with AttentionRope), EVA-02 (Eva with
EvaAttention), MobileCLIP (FastViT, attention in its last stage), BiomedCLIP and others around a timm trunk
(open_clip.timm_model.TimmModel.trunk). timm's attention modules hold, as children:
  - one fused `qkv` nn.Linear of shape (3H, E) (rows q, k, v) and an output `proj` nn.Linear, the qkv Linear
    called as a module: timm.layers.Attention, AttentionRope(qkv_fused=True), fastvit's Attention, Swin's
    WindowAttention; its q, k, v adapters are row blocks of that Linear (adapters.fused.BlockLoRAFusedQKV);
  - or separate `q_proj`, `k_proj`, `v_proj` and `proj` nn.Linears (EvaAttention(qkv_fused=False): EVA-02 CLIP),
    each wrapped as one matrix.
Some attention code passes the weight to F.linear instead of calling the Linear (EvaAttention with a fused qkv
and q/v biases: EVA-01, EVA-02 non-CLIP variants); its site is listed like the others and inject's probe forward
refuses it by name. Attention pooling heads (AttentionPoolLatent: `q`, `kv`) are not blocks and are not adapted.
"""

from __future__ import annotations

from torch import nn

from ..adapters.targeting import LINEARS, Site

FUSED = (("q", "qkv"), ("k", "qkv"), ("v", "qkv"), ("o", "proj"))
SEPARATE = (("q", "q_proj"), ("k", "k_proj"), ("v", "v_proj"), ("o", "proj"))


def attention_children(module: nn.Module) -> tuple[tuple[str, str], ...] | None:
    """The (projection, child) table of a timm attention module, or None when `module` is not one."""
    children = dict(module.named_children())

    def linear(name: str) -> bool:
        return isinstance(children.get(name), nn.Linear)

    if not linear("proj"):
        return None
    if linear("qkv"):
        return FUSED
    if all(linear(name) for name in ("q_proj", "k_proj", "v_proj")):
        return SEPARATE
    return None


def trunk_sites(trunk: nn.Module, prefix: str, tower: str) -> tuple[Site, ...]:
    """One site per attention module of a timm model, in module order (bottom to top); () when it has none."""
    sites = []
    for name, module in trunk.named_modules():
        children = attention_children(module)
        if children is not None:
            sites.append(Site(tower, len(sites), f"{prefix}.{name}" if name else prefix, LINEARS, children))
    return tuple(sites)
