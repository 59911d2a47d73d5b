"""Adapters on a fused q/k/v input projection: timm's `qkv` nn.Linear and nn.MultiheadAttention's in_proj_weight.

Both hold q, k and v as the three row blocks of one (3H, E) weight (rows [0, H) are q, [H, 2H) k, [2H, 3H) v). The
three read the same input, so it is dropped out and folded once (one shared dropout mask) and the down-projections
of the adapted projections are one (E/n -> m*r) product; the up-projections write their own row blocks; a merge adds
each dense update to its row block (exact). QKVAdapters holds that math once; BlockLoRAFusedQKV wraps timm's Linear
(its attention module calls it as a module, so nothing else changes) and BlockLoRAMultiheadAttention replaces a
whole nn.MultiheadAttention (whose out_proj is never called as a module, so `o` lives here too).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .config import AdapterConfig
from .core import add_up_projection, delta_weight
from .layers import AdapterLayer, check_width, new_factors

QKV = ("q", "k", "v")


class QKVAdapters(AdapterLayer):
    """Factors `lora_A[p]` (r, E / n) and `lora_B[p]` (H, r) per adapted projection p, and the fused-q/k/v math.

    Subclasses call `_add_factors` and use `_add_qkv` on the fused projection's output (..., 3H).
    """

    def _add_factors(self, in_width: int, rows: int, like: torch.Tensor) -> None:
        self.in_width, self.rows = in_width, rows  # E and H
        self.qkv_projections = tuple(p for p in self.projections if p in QKV)
        self.lora_A, self.lora_B = nn.ParameterDict(), nn.ParameterDict()
        for p in self.projections:
            self.lora_A[p], self.lora_B[p] = new_factors(self.config, in_width, rows, like)

    @staticmethod
    def qkv_factor_shapes(projections: Sequence[str], in_width: int, rows: int, r: int, n_blocks: int
                          ) -> dict[str, tuple[int, int]]:
        out: dict[str, tuple[int, int]] = {}
        for p in projections:
            out[f"lora_A.{p}"], out[f"lora_B.{p}"] = (r, in_width // n_blocks), (rows, r)
        return out

    def delta_weight(self, projection: str) -> torch.Tensor:
        """Dense (H, E) update s * B @ [A, ..., A] of one projection."""
        return delta_weight(self.lora_A[projection], self.lora_B[projection], self.n_blocks, self._scale)

    def _qkv_deltas(self, name: str) -> Iterator[tuple[str, slice, torch.Tensor]]:
        h = self.rows
        for p in self.qkv_projections:
            i = QKV.index(p)
            yield name, slice(i * h, (i + 1) * h), self.delta_weight(p)

    def _qkv_matrices(self) -> Iterator[tuple[int, int, bool]]:
        for j in range(len(self.qkv_projections)):  # one fold serves q, k and v (unless each draws its own mask)
            yield self.in_width, self.rows, j > 0 and self.folds_once

    def _add_qkv(self, qkv: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """qkv (..., 3H), the frozen projection of x (..., E), plus the q/k/v updates: one fold, one product."""
        if not self.qkv_projections or not self._adapter_on():
            return qkv
        if self._own_masks():  # one mask (one fold) per projection, as CLIP-LoRA's separate LinearLoRA layers
            z = torch.cat([F.linear(self._fold(x, self.lora_A[p]), self.lora_A[p]) for p in self.qkv_projections], -1)
        else:
            a = torch.cat([self.lora_A[p] for p in self.qkv_projections])  # (m*r, E/n): one product for all
            z = F.linear(self._folded_input(x, a), a)  # (..., m*r)
        h, r = self.rows, self.r
        if len(self.qkv_projections) == 3:
            up_t = torch.block_diag(*(self.lora_B[p].T for p in QKV))  # (3r, 3H)
        else:  # zero columns for the projections without an adapter
            up_t = z.new_zeros(len(self.qkv_projections) * r, 3 * h)
            for j, p in enumerate(self.qkv_projections):
                i = QKV.index(p)
                up_t[j * r:(j + 1) * r, i * h:(i + 1) * h] = self.lora_B[p].T
        return add_up_projection(qkv, z, up_t * self._scale)

    def _with_adapter(self, out: torch.Tensor, x: torch.Tensor, projection: str) -> torch.Tensor:
        """out (..., H) of one projection of x (..., E), plus that projection's update (if adapted)."""
        if projection not in self.projections or not self._adapter_on():
            return out
        a, b = self.lora_A[projection], self.lora_B[projection]
        z = F.linear(self._folded_input(x, a), a)
        return add_up_projection(out, z, (b * self._scale).T.contiguous())


class BlockLoRAFusedQKV(QKVAdapters):
    """timm's fused `qkv` nn.Linear (weight (3H, E): rows q, k, v) with adapters on any of q, k, v.

    Shapes: x (..., E) -> (..., 3H), what the stock Linear returns, plus the updates of the adapted row blocks.
    Adopts `base`'s `weight` and `bias` (state dict keys as in nn.Linear) and adds `lora_A.{p}` (r, E / n) and
    `lora_B.{p}` (H, r). The attention module around it (timm's Attention, AttentionRope, fastvit's Attention)
    calls it as a module, so its own forward (q/k norms, rotary embeddings, attention kernel) is untouched; the
    output projection `proj` is a plain Linear (BlockLoRALinear). Raises ConfigError unless base is an nn.Linear
    whose out_features is a multiple of 3 and n_blocks divides in_features.
    """

    @classmethod
    def problem(cls, module: nn.Module, projections: Sequence[str], n_blocks: int) -> str | None:
        if not isinstance(module, nn.Linear):
            return f"it is a {type(module).__name__}, not an nn.Linear"
        if module.out_features % 3:
            return f"its out_features ({module.out_features}) is not 3 row blocks q, k, v"
        if not set(projections) <= set(QKV):
            return "only q, k and v are row blocks of a fused qkv Linear"
        return check_width(module.in_features, n_blocks, "in_features")

    @classmethod
    def factor_shapes(cls, module: nn.Module, projections: Sequence[str], r: int, n_blocks: int
                      ) -> dict[str, tuple[int, int]]:
        return cls.qkv_factor_shapes(projections, module.in_features, module.out_features // 3, r, n_blocks)

    def __init__(self, base: nn.Linear, cfg: AdapterConfig | None = None, projections: Sequence[str] = QKV) -> None:
        super().__init__(base, cfg, projections)
        self.in_features, self.out_features, self.weight, self.bias = (base.in_features, base.out_features,
                                                                       base.weight, base.bias)
        self._add_factors(base.in_features, base.out_features // 3, base.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._add_qkv(F.linear(x, self.weight, self.bias), x)

    def _deltas(self) -> Iterator[tuple[str, slice, torch.Tensor]]:
        return self._qkv_deltas("weight")

    def matrices(self) -> Iterator[tuple[int, int, bool]]:
        return self._qkv_matrices()

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, {super().extra_repr()}"


def fused_attention_problem(module: nn.Module) -> str | None:
    """Why `module` is not a self-attention with CLIP's fused q/k/v layout that we can replace exactly, or None."""
    weight = getattr(module, "in_proj_weight", None)
    if not isinstance(weight, torch.Tensor) or not isinstance(getattr(module, "out_proj", None), nn.Linear):
        return f"it is a {type(module).__name__} without a fused in_proj_weight and an out_proj Linear"
    if weight.shape[0] != 3 * weight.shape[1] or not isinstance(getattr(module, "num_heads", None), int):
        return "in_proj_weight is not (3E, E) (separate k/v widths are not supported)"
    if getattr(module, "bias_k", None) is not None or getattr(module, "add_zero_attn", False):
        return "bias_k / add_zero_attn are not supported"
    for name in ("logit_scale", "head_scale"):  # open_clip Attention options that change the math
        if getattr(module, name, None) is not None:
            return f"its {name} option (scaled cosine / head scaling) is not supported"
    for name in ("ln_q", "ln_k", "ln_inner"):
        if not isinstance(getattr(module, name, nn.Identity()), nn.Identity):
            return f"its {name} normalisation is not supported"
    out_drop = getattr(module, "out_drop", None)
    if isinstance(out_drop, nn.Dropout) and out_drop.p > 0:
        return "output dropout is not supported"
    return None


class BlockLoRAMultiheadAttention(QKVAdapters):
    """Drop-in for nn.MultiheadAttention (self-attention as in OpenAI CLIP / open_clip) with adapters on q, k, v, o.

    Keyed on the parameter layout (in_proj_weight (3E, E), in_proj_bias, out_proj), not on the class, so it also
    replaces modules with the same layout (open_clip's own Attention). Computes what the stock module computes in
    every forward option: batch_first either way ((N, L, E) or (L, N, E) in and out) or unbatched (L, E),
    additive or boolean attn_mask (the text tower's causal mask), key_padding_mask, is_causal, and with
    need_weights the attention weights (averaged over heads or per head). Adds `lora_A.{p}` (r, E / n) and
    `lora_B.{p}` (E, r) per projection p. Raises ConfigError for layouts it cannot reproduce exactly
    (fused_attention_problem) or an n_blocks that does not divide E.
    """

    @classmethod
    def problem(cls, module: nn.Module, projections: Sequence[str], n_blocks: int) -> str | None:
        return fused_attention_problem(module) or check_width(module.in_proj_weight.shape[1], n_blocks,
                                                              "the attention width")

    @classmethod
    def factor_shapes(cls, module: nn.Module, projections: Sequence[str], r: int, n_blocks: int
                      ) -> dict[str, tuple[int, int]]:
        e = module.in_proj_weight.shape[1]
        return cls.qkv_factor_shapes(projections, e, e, r, n_blocks)

    def __init__(self, mha: nn.Module, cfg: AdapterConfig | None = None, projections: Sequence[str] = QKV) -> None:
        super().__init__(mha, cfg, projections)
        self.embed_dim = mha.in_proj_weight.shape[1]
        self.num_heads = mha.num_heads
        # nn.MultiheadAttention returns (output, weights) and may be sequence-first; open_clip's own Attention
        # class (same parameter layout) is batch-first, is called as attn(x, attn_mask=...) and returns a tensor.
        self.returns_tuple = isinstance(mha, nn.MultiheadAttention)
        self.batch_first = bool(getattr(mha, "batch_first", True)) if self.returns_tuple else True
        drop = getattr(mha, "dropout", None) if self.returns_tuple else getattr(mha, "attn_drop", None)
        self.attn_dropout = float(drop.p if isinstance(drop, nn.Dropout) else (drop or 0.0))
        self.in_proj_weight = mha.in_proj_weight
        self.in_proj_bias = mha.in_proj_bias
        self.out_proj = mha.out_proj  # a Linear that, as in the stock module, is read but never called
        # nn.TransformerEncoderLayer reads this before calling its self_attn: True would let its eval fast path
        # (torch._transformer_encoder_layer_fwd on in_proj_weight) bypass the adapters; False keeps the path that
        # calls this module (the value is only ever read by such callers: this class never uses separate q/k/v)
        self._qkv_same_embed_dim = False
        self._add_factors(self.embed_dim, self.embed_dim, mha.in_proj_weight)

    # -- updates --------------------------------------------------------------------------------------------------
    def _deltas(self) -> Iterator[tuple[str, slice, torch.Tensor]]:
        yield from self._qkv_deltas("in_proj_weight")
        if "o" in self.projections:
            yield "out_proj.weight", slice(None), self.delta_weight("o")

    def matrices(self) -> Iterator[tuple[int, int, bool]]:
        yield from self._qkv_matrices()
        if "o" in self.projections:
            yield self.embed_dim, self.embed_dim, False

    # -- forward --------------------------------------------------------------------------------------------------
    def _qkv(self, x: torch.Tensor) -> torch.Tensor:
        """Self-attention input projection with the q/k/v adapters: (N, L, E) -> (N, L, 3E)."""
        return self._add_qkv(F.linear(x, self.in_proj_weight, self.in_proj_bias), x)

    def _project(self, x: torch.Tensor, projection: str) -> torch.Tensor:
        """One of q, k, v separately (cross-attention inputs): (N, L, E) -> (N, L, E)."""
        i, e = QKV.index(projection), self.embed_dim
        bias = self.in_proj_bias[i * e:(i + 1) * e] if self.in_proj_bias is not None else None
        out = F.linear(x, self.in_proj_weight[i * e:(i + 1) * e], bias)
        return self._with_adapter(out, x, projection)

    def _attn_bias(self, attn_mask, key_padding_mask, n, l, s, dtype):
        """Canonical additive mask (broadcastable to (N, H, L, S)) from MHA's mask conventions, or None.

        attn_mask (L, S) or (N*H, L, S) ((H, L, S) for unbatched input), key_padding_mask (N, S); boolean masks
        mark with True what may NOT be attended (-inf), float masks are added.
        """
        bias = None
        if attn_mask is not None:
            if attn_mask.dtype == torch.bool:  # MHA: True = may NOT attend
                attn_mask = torch.zeros_like(attn_mask, dtype=dtype).masked_fill_(attn_mask, float("-inf"))
            bias = attn_mask.to(dtype)
            if bias.dim() == 3:  # (N*H, L, S)
                bias = bias.view(n, self.num_heads, l, s)
        if key_padding_mask is not None:
            kpm = key_padding_mask
            if kpm.dtype == torch.bool:
                kpm = torch.zeros_like(kpm, dtype=dtype).masked_fill_(kpm, float("-inf"))
            kpm = kpm.to(dtype).view(n, 1, 1, s)
            bias = kpm if bias is None else bias + kpm
        return bias

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor | None = None,
        value: torch.Tensor | None = None,
        key_padding_mask: torch.Tensor | None = None,
        need_weights: bool = True,
        attn_mask: torch.Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None] | torch.Tensor:
        """nn.MultiheadAttention.forward's arguments and results (open_clip's Attention: x, attn_mask -> tensor).

        Shapes: query (N, L, E) if batch_first else (L, N, E), or unbatched (L, E); key/value likewise with S.
        Returns (output, weights): output shaped as query; weights None unless need_weights, then (N, L, S)
        averaged over heads (average_attn_weights) or (N, H, L, S), without N for unbatched input. Weights are
        softmax(q k^T / sqrt(E/H) + masks) with attention dropout applied in training, as the stock module
        returns them (torch.nn.functional.multi_head_attention_forward); without them the fused
        scaled_dot_product_attention kernel computes the same output. is_causal with an attn_mask trusts the
        mask (the stock module's hint); without one it applies the causal mask itself (the stock module
        raises). Raises ValueError for a query that is neither 2-D nor 3-D.
        """
        key = query if key is None else key
        value = key if value is None else value
        self_attn = query is key and key is value
        if query.dim() not in (2, 3):
            raise ValueError(f"query must be (L, E) or 3-D batched, got shape {tuple(query.shape)}")
        batched = query.dim() == 3
        if not batched:  # (L, E): one sequence, as a batch of one (the stock module does the same)
            query, key, value = (t.unsqueeze(0) for t in (query, key, value))
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        elif not self.batch_first:  # (L, N, E) -> (N, L, E); views, no copies
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        n, l, e = query.shape
        s, h = key.shape[1], self.num_heads
        if self_attn:
            qkv = self._qkv(query)
            q, k, v = qkv.view(n, l, 3, h, e // h).permute(2, 0, 3, 1, 4)  # each (N, H, L, E/H)
        else:
            q = self._project(query, "q").view(n, l, h, e // h).transpose(1, 2)
            k = self._project(key, "k").view(n, s, h, e // h).transpose(1, 2)
            v = self._project(value, "v").view(n, s, h, e // h).transpose(1, 2)
        weighted = need_weights and self.returns_tuple  # open_clip's Attention has no way to return them
        dropout_p = self.attn_dropout if self.training else 0.0
        if is_causal and attn_mask is None and (weighted or key_padding_mask is not None):
            # the kernel's is_causal cannot be combined with another mask: spell out its (top-left) causal mask
            attn_mask = torch.ones(l, s, dtype=torch.bool, device=q.device).triu(1)
        bias = self._attn_bias(attn_mask, key_padding_mask, n, l, s, q.dtype)
        weights = None
        if weighted:  # explicit softmax, in the stock module's order (q scaled first, mask added, softmax)
            scores = torch.matmul(q * math.sqrt(1.0 / (e // h)), k.transpose(-2, -1))  # (N, H, L, S)
            if bias is not None:
                scores = scores + bias
            weights = torch.softmax(scores, dim=-1)
            if dropout_p > 0.0:
                weights = F.dropout(weights, p=dropout_p)
            out = torch.matmul(weights, v)
            if average_attn_weights:
                weights = weights.mean(dim=1)  # (N, L, S)
            if not batched:
                weights = weights.squeeze(0)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=dropout_p,
                                                 is_causal=bool(is_causal and bias is None))
        attn = out.transpose(1, 2).reshape(n, l, e)  # (N, L, E)
        out = F.linear(attn, self.out_proj.weight, self.out_proj.bias)
        out = self._with_adapter(out, attn, "o")
        if not batched:
            out = out.squeeze(0)
        elif not self.batch_first:
            out = out.transpose(0, 1)
        return (out, weights) if self.returns_tuple else out

    def extra_repr(self) -> str:
        return (f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, batch_first={self.batch_first}, "
                f"{super().extra_repr()}")
