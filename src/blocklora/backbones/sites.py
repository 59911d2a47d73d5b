"""Where adapters can go: the attention sites of each model family, found by structure (no regexes).

Each family module (openclip.py, hf.py, ...) knows its own module names and exposes `attention_sites(model)`,
returning {tower: [AttentionSite per block, bottom to top]} or None when the model is not of that family.
`find_sites` asks each family in turn; it is the only entry point the adapter code uses.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ..errors import ConfigError


@dataclass(frozen=True)
class AttentionSite:
    """One block's attention in one tower.

    kind "fused": the module at `path` has CLIP's fused in_proj_weight layout and is replaced as a whole.
    kind "linears": the module at `path` holds one nn.Linear per projection letter (`linears`: letter -> child
    name); each selected Linear is wrapped in place.
    kind "layers": a block without attention (a CNN's); `linears` holds (letter, child) pairs naming nn.Linear or
    1x1 nn.Conv2d children, and a child may stand under several letters. Each child with a selected letter is
    wrapped once; letters a site lacks are skipped. The family module documents what the letters mean there.
    """

    tower: str
    block: int
    path: str
    kind: str
    linears: tuple[tuple[str, str], ...] = ()


def find_sites(model: nn.Module) -> dict[str, list[AttentionSite]]:
    """Attention sites per tower of a supported model; a clear error for anything else."""
    from . import effnet_minilm, hf, openclip  # each knows its own family's module names

    for family in (openclip, hf, effnet_minilm):
        sites = family.attention_sites(model)
        if sites is not None:
            return sites
    raise ConfigError(
        f"blocklora does not know where attention lives in a {type(model).__name__}: supported are open_clip / "
        "OpenAI CLIP ViT models, transformers CLIPModel (and its vision/text models) and effnet-minilm")
