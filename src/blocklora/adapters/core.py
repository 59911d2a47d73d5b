"""The Block-LoRA arithmetic, shared by every layer type (docs: ../shared/docs/method.md).

Notation (PyTorch, y = W x): A is the shared down-projection block, shape (r, d_in / n); B the up-projection,
shape (d_out, r); s the scaling. The dense update is dW = s * B @ [A, A, ..., A] (A tiled n times along the
input dimension), and dW @ x = s * B @ A @ fold_n(x), where fold_n sums the n chunks of x. n = 1 is plain LoRA.
"""

from __future__ import annotations

import math

import torch

from ..errors import ConfigError

SCALINGS = ("rslora", "standard")
FOLDS = ("sum", "mean")
A_INITS = ("kaiming", "kaiming_full")


def scaling_factor(alpha: float, r: int, scaling: str) -> float:
    """s = alpha / sqrt(r) ("rslora", the CLIP-LoRA recipe) or alpha / r ("standard" LoRA)."""
    if scaling == "rslora":
        return alpha / math.sqrt(r)
    if scaling == "standard":
        return alpha / r
    raise ConfigError(f"unknown scaling {scaling!r}: use one of {', '.join(SCALINGS)}")


def fold_factor(n_blocks: int, fold: str) -> float:
    """The constant a fold multiplies by: 1 for a sum of the n chunks, 1/n for their mean."""
    if fold == "sum":
        return 1.0
    if fold == "mean":
        return 1.0 / n_blocks
    raise ConfigError(f"unknown fold {fold!r}: use one of {', '.join(FOLDS)}")


def fold(x: torch.Tensor, n_blocks: int) -> torch.Tensor:
    """Sum the n equal chunks of the last dimension: (..., d) -> (..., d / n). Additions only."""
    if n_blocks == 1:
        return x
    d = x.shape[-1]
    # (..., d) -> (..., n, d/n) -> (..., d/n); a view plus one reduction, no copy of x.
    return x.unflatten(-1, (n_blocks, d // n_blocks)).sum(-2)


def delta_weight(lora_a: torch.Tensor, lora_b: torch.Tensor, n_blocks: int, scale: float) -> torch.Tensor:
    """The dense update s * B @ [A, ..., A], shape (d_out, n * d_in / n). Used for merging, never in training."""
    return (lora_b @ lora_a.repeat(1, n_blocks)) * scale


@torch.no_grad()
def init_factors(lora_a: torch.Tensor, lora_b: torch.Tensor, n_blocks: int, a_init: str) -> None:
    """B = 0, so a fresh adapter is the identity; A Kaiming-uniform (a = sqrt(5), PyTorch's Linear default).

    "kaiming" takes the fan-in from A's own shape (d_in / n); "kaiming_full" from the full input width d_in,
    which keeps the variance of A @ fold(x) equal to LoRA's A @ x when the fold is a sum of n uncorrelated chunks.
    """
    if a_init not in A_INITS:
        raise ConfigError(f"unknown a_init {a_init!r}: use one of {', '.join(A_INITS)}")
    fan_in = lora_a.shape[1] * (n_blocks if a_init == "kaiming_full" else 1)
    bound = 1.0 / math.sqrt(fan_in)  # kaiming_uniform_(a=sqrt(5)) gives exactly this bound
    lora_a.uniform_(-bound, bound)
    lora_b.zero_()
