"""The Block-LoRA arithmetic, shared by every layer type (docs/method.md).

Notation (PyTorch, y = W x): A is the shared down-projection block, shape (r, d_in / n); B the up-projection,
shape (d_out, r); s the scaling. The dense update is dW = s * B @ [A, A, ..., A] (A tiled n times along the
input dimension), and dW @ x = s * B @ A @ fold_n(x), where fold_n sums the n chunks of x. n = 1 is plain LoRA.
"""

from __future__ import annotations

import math
import typing

import torch

from ..choices import AInit, Fold, Scaling
from ..errors import ConfigError

SCALINGS, FOLDS, A_INITS = typing.get_args(Scaling), typing.get_args(Fold), typing.get_args(AInit)


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


def fold(x: torch.Tensor, n_blocks: int, dim: int = -1) -> torch.Tensor:
    """Sum the n equal chunks of dimension `dim`: (..., d, ...) -> (..., d / n, ...). Additions only."""
    if n_blocks == 1:
        return x
    dim = dim % x.dim()
    # (..., d, ...) -> (..., n, d/n, ...) -> (..., d/n, ...); a view plus one reduction, no copy of x.
    return x.unflatten(dim, (n_blocks, x.shape[dim] // n_blocks)).sum(dim)


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


# -- fold(dropout(x)) with nothing full-width kept for backward ---------------------------------------------------
# The adapter branch only needs, for backward, (a) the folded input h (width d/n, kept by the product h @ A.T for
# A's gradient) and (b) the dropout mask, for the gradient w.r.t. x (x's gradient reaches earlier adapters).
# F.dropout keeps its mask as a full-width tensor of x's dtype (4 bytes per element of x in float32, more than the
# folded input itself for n >= 2). Here the mask is drawn from a private generator seeded with one number taken from
# the global torch RNG, and drawn again in backward: nothing of x's size is kept (measured cheapest against keeping
# the mask as bools or packed bits: benchmarks/step_cost.py, BENCHMARKS.md "Step cost"). Runs stay reproducible and
# resume-exact (the global RNG state, which checkpoints keep, decides every mask).


def draw_seed() -> int:
    """One 62-bit seed from the global torch RNG (CPU generator: no device sync)."""
    return int(torch.randint(0, 2**62, (), dtype=torch.int64))


def dropout_mask(shape: torch.Size | tuple[int, ...], p: float, seed: int, device: torch.device | str) -> torch.Tensor:
    """The bool keep-mask (True = kept, probability exactly 1 - p) that fold_dropout draws for `seed`.

    When p is a multiple of 2**-16 (0.25, 0.5, 0.125, ...) each element reads 16 random bits (four per 64-bit draw:
    about 2.5x faster on a CPU than one float per element); otherwise a float per element.
    """
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    q = p * 65536
    if q == int(q):
        numel = math.prod(shape)
        words = torch.randint(-(2**63), 2**63 - 1, ((numel + 3) // 4,), dtype=torch.int64, generator=gen,
                              device=device)
        return (words.view(torch.int16)[:numel] >= int(q) - 32768).view(shape)  # P(kept) = (65536 - q) / 65536
    return torch.rand(shape, generator=gen, device=device) >= p


def unfold_grad(grad_h: torch.Tensor, mask: torch.Tensor, n_blocks: int, dim: int) -> torch.Tensor:
    """The gradient w.r.t. x of fold_n(x * mask) along `dim`: every chunk receives the folded gradient, masked.

    One broadcast product, no copy: grad_h (..., d/n, ...) and mask (..., d, ...) -> (..., d, ...).
    """
    if n_blocks == 1:
        return grad_h * mask
    d = dim % mask.dim()
    grad_x = mask.unflatten(d, (n_blocks, mask.shape[d] // n_blocks)) * grad_h.unsqueeze(d)
    return grad_x.flatten(d, d + 1)


class _FoldDropout(torch.autograd.Function):
    """h = fold_n(dropout_p(x)) along `dim`, keeping for backward only the seed of the mask."""

    @staticmethod
    def forward(ctx, x, p, n_blocks, dim, seed):  # noqa: D401 - autograd API
        mask = dropout_mask(x.shape, p, seed, x.device)
        ctx.p, ctx.n_blocks, ctx.dim, ctx.seed, ctx.shape = p, n_blocks, dim, seed, x.shape
        return fold(x * mask, n_blocks, dim) * (1.0 / (1.0 - p))

    @staticmethod
    def backward(ctx, grad_h):
        if not ctx.needs_input_grad[0]:
            return None, None, None, None, None
        mask = dropout_mask(ctx.shape, ctx.p, ctx.seed, grad_h.device)  # the forward's mask, drawn again
        g = grad_h * (1.0 / (1.0 - ctx.p))  # scaled at the folded width
        return unfold_grad(g, mask, ctx.n_blocks, ctx.dim), None, None, None, None


def fold_dropout(x: torch.Tensor, p: float, n_blocks: int, training: bool = True, dim: int = -1,
                 seed: int | None = None) -> torch.Tensor:
    """fold_n(dropout_p(x)) along `dim`: (..., d) -> (..., d / n), differentiable in x.

    Equal to fold(F.dropout(x, p), n) with the mask dropout_mask(x.shape, p, seed, x.device); p = 0 or eval mode is
    the plain fold. `seed` defaults to a draw from the global torch RNG. The backward keeps no tensor of x's size:
    it draws the mask again from the seed.
    """
    if p <= 0 or not training:
        return fold(x, n_blocks, dim)
    return _FoldDropout.apply(x, float(p), n_blocks, dim, draw_seed() if seed is None else int(seed))


def _autocast_on(device_type: str) -> bool:
    try:
        return torch.is_autocast_enabled(device_type)
    except TypeError:  # torch < 2.4: no device argument
        return torch.is_autocast_enabled() if device_type == "cuda" else torch.is_autocast_cpu_enabled()


def add_up_projection(out: torch.Tensor, z: torch.Tensor, up_t: torch.Tensor) -> torch.Tensor:
    """out + z @ up_t, with z (..., k) and up_t (k, d_out) the scaled up-projection, transposed and contiguous.

    One addmm: no separate full-width product, scaling or sum; and with up_t laid out (k, d_out) its gradient is
    z.T @ grad, a product that reads grad row by row (several times faster on a CPU than grad.T @ z).
    """
    if z.dtype != out.dtype or _autocast_on(out.device.type):
        return out + (z @ up_t).to(out.dtype)
    d_out = out.shape[-1]
    if out.is_contiguous() and out._base is None:  # a fresh product (what the layers pass): accumulate in place
        out.view(-1, d_out).addmm_(z.reshape(-1, z.shape[-1]), up_t)
        return out
    return torch.addmm(out.reshape(-1, d_out), z.reshape(-1, z.shape[-1]), up_t).view(out.shape)
