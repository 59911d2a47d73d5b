"""What an adapter costs: trainable parameters and per-token arithmetic, per tower."""

from __future__ import annotations

from typing import Any

from torch import nn

from .inject import adapter_layers


def adapter_cost(model: nn.Module) -> dict[str, Any]:
    """Per tower: adapted modules, trainable adapter parameters, multiply-adds and additions per token.

    Per adapted matrix (d_in -> d_out, rank r, n blocks): the fold costs d_in - d_in/n additions, A costs
    r*d_in/n multiply-adds and B r*d_out. q, k and v share one fold (fused attention, or SharedFold on Linears)
    unless each draws its own dropout mask in training (dropout_mask per_projection).
    """
    towers: dict[str, dict[str, Any]] = {}
    folded: set[int] = set()  # SharedFold groups already counted: only their first layer folds
    for name, layer in adapter_layers(model):
        t = towers.setdefault(layer.tower or "other", {"modules": [], "params": 0, "macs_per_token": 0,
                                                          "adds_per_token": 0})
        t["modules"].append(name)
        t["params"] += sum(p.numel() for p in layer.parameters() if p.requires_grad)
        r, n = layer.r, layer.n_blocks
        group = layer.shared_fold if layer.folds_once else None
        counted = group is not None and id(group) in folded
        if group is not None:
            folded.add(id(group))
        for d_in, d_out, shared_fold in layer.matrices():
            t["macs_per_token"] += r * d_in // n + r * d_out
            if not (shared_fold or counted):
                t["adds_per_token"] += d_in - d_in // n
    total = {"params": sum(t["params"] for t in towers.values()),
             "macs_per_token": sum(t["macs_per_token"] for t in towers.values()),
             "adds_per_token": sum(t["adds_per_token"] for t in towers.values())}
    return {"towers": towers, "total": total}
