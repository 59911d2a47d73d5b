"""`blocklora params --method probe|tip_adapter|tip_adapter_f|coop`: trainable parameters and the cost of a step,
from the shapes alone (C classes, K shots, N = C K training features of width D).

    probe          C D + C parameters; a step (one L-BFGS function evaluation, full batch) ~ 3 N D C MACs
    tip_adapter    0 parameters, no step; scoring an image: D C + D N + N C MACs
    tip_adapter_f  N D parameters (the keys); a step of B = min(256, N) features ~ 3 B (D N + N C + D C) MACs
    coop           n_ctx x width parameters; a step ~ 3 C L M MACs: the text tower forward and backward over the
                   C prompts of L tokens, M = the text tower's linear-layer weights (one MAC per weight per token)

"3 x" counts a backward pass as twice the forward (the usual estimate); image features are computed once per run,
not per step, and are left out.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .coop import context, context_start, token_embedding
from .tip_adapter import BATCH as TIP_BATCH


def feature_dim(backbone: Any) -> int:
    """D: the image embedding width (one forward of a black image)."""
    with torch.no_grad():
        size = backbone.image_size
        return int(backbone.encode_images(torch.zeros(1, 3, size, size, device=backbone.device)).shape[-1])


def text_linear_weights(backbone: Any) -> int:
    """M: weights of the text tower's Linear layers (including a projection matrix held as a parameter)."""
    prefixes = backbone.tower_prefixes.get("text", ())
    total = 0
    for name, module in backbone.model.named_modules():
        if isinstance(module, nn.Linear) and name.startswith(prefixes):
            total += module.weight.numel()
    proj = getattr(backbone.model, "text_projection", None)
    if isinstance(proj, nn.Parameter):
        total += proj.numel()
    return total


def baseline_cost(backbone: Any, method: str, n_classes: int, shots: int, n_ctx: int = 16,
                  ctx_init: str = "") -> dict[str, Any]:
    """{"trainable_params", "step_macs", "step", "dims"}: see the module docstring. CoOp's n_ctx is ctx_init's token
    count when it is given, as training takes it (coop.context, which raises ConfigError for a context that cannot
    be)."""
    c, k = n_classes, shots
    n = c * k
    d = feature_dim(backbone)
    dims: dict[str, int] = {"classes": c, "shots": k, "features": n, "feature_dim": d}
    if method == "probe":
        params, macs, step = c * d + c, 3 * n * d * c, "one L-BFGS function evaluation over all N features"
    elif method == "tip_adapter":
        params, macs, step = 0, 0, "none (training-free); scoring an image costs D C + D N + N C MACs"
        dims["score_macs_per_image"] = d * c + d * n + n * c
    elif method == "tip_adapter_f":
        b = min(TIP_BATCH, n)
        params, macs, step = n * d, 3 * b * (d * n + n * c + d * c), f"a batch of {b} features"
        dims["batch"] = b
    elif method == "coop":
        width = token_embedding(backbone).weight.shape[1]
        _, n_ctx = context(backbone, n_ctx, ctx_init)
        tokens = context_start(backbone) + n_ctx + 4  # before the text, the context, ~2 name tokens, ".", EOT
        m = text_linear_weights(backbone)
        params, macs = n_ctx * width, 3 * c * tokens * m
        step = f"the text tower forward and backward over {c} prompts of about {tokens} tokens"
        dims.update({"n_ctx": n_ctx, "width": width, "prompt_tokens": tokens, "text_linear_weights": m})
    else:
        raise ValueError(method)
    return {"trainable_params": params, "step_macs": macs, "step": step, "dims": dims}
