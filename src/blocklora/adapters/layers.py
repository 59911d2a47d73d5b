"""Adapter layers: a wrapped Linear, a wrapped 1x1 convolution, and a drop-in replacement for
nn.MultiheadAttention's fused q/k/v.

All keep the wrapped module's own Parameters under their own names (weight, bias; in_proj_weight, out_proj.*), so
a model's state dict keys stay the stock ones plus `lora_A` / `lora_B` entries, and a merged export is a plain
stock state dict.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from .config import AdapterConfig
from .core import add_up_projection, delta_weight, fold_dropout, fold_factor, init_factors, scaling_factor


def adapter_dtype(weight: torch.Tensor) -> torch.dtype:
    """The adapters' dtype: float32 at least, whatever the frozen weights' (a float16 or bfloat16 checkpoint).

    AdamW on half-precision parameters loses small updates and divides by an epsilon (1e-8) that float16 rounds to
    zero: NaN within steps. The adapter branch casts its input to this dtype and its output back (see forward)."""
    return torch.promote_types(weight.dtype, torch.float32)


class SharedFold:
    """The folded input of Linears that read the same tensor (self-attention's q, k and v), computed once.

    The first layer called on a tensor folds it (one dropout mask, one fold, one node in the graph); the others
    called on the very same tensor object (same version, same train/eval mode) reuse that result, so the three
    down-projections cost one fold, as in the fused attention layer, and backward regenerates one mask instead of
    three. A different tensor (the next step, a recomputation under gradient checkpointing, a cross-attention
    input) is simply folded again: the cache can change only cost, never results. It keeps a weak reference to x
    and the small folded tensor (width d/n) until the next call.
    """

    __slots__ = ("_x", "_version", "_training", "_h")

    def __init__(self) -> None:
        self._x: weakref.ref | None = None
        self._version, self._training, self._h = -1, False, None

    def __reduce__(self):
        """Copies and pickles (copy.deepcopy(model), torch.save(model)) get an empty cache: the cached tensor may
        be a non-leaf, which deepcopy refuses, and a weak reference cannot be pickled. The memo keeps the three
        layers sharing one new object."""
        return SharedFold, ()

    def get(self, x: torch.Tensor, training: bool, compute: Callable[[], torch.Tensor]) -> torch.Tensor:
        if self._x is not None and self._x() is x and self._version == x._version and self._training == training:
            return self._h
        h = compute()
        self._x, self._version, self._training, self._h = weakref.ref(x), x._version, training, h
        return h


class AdapterLayer(nn.Module):
    """Shared state and merge logic. Subclasses list their updates in `_deltas()`."""

    def _setup(self, cfg: AdapterConfig) -> None:
        self.r, self.n_blocks, self.dropout_p = cfg.r, cfg.n_blocks, cfg.dropout
        # The fold's 1/n (mean) is folded into the scalar, so the hot path is a plain sum.
        self.scaling = scaling_factor(cfg.alpha, cfg.r, cfg.scaling)
        self._scale = self.scaling * fold_factor(cfg.n_blocks, cfg.fold)
        self.merged = False
        self.adapter_enabled = True
        self.shared_fold: SharedFold | None = None  # set by inject on q, k, v Linears of one attention
        # q, k and v share one dropout mask (one fold) in training, or draw one each (CLIP-LoRA's per-projection
        # nn.Dropout); out of training, or without dropout, the fold is the same either way and is shared.
        self.shared_mask = cfg.shared_dropout_mask

    @property
    def folds_once(self) -> bool:
        """True when the projections reading one input can share its fold while training (cost reports)."""
        return self.shared_mask or self.dropout_p == 0

    def _own_masks(self) -> bool:
        """This step draws a dropout mask per projection (training with dropout, masks not shared)."""
        return self.training and self.dropout_p > 0 and not self.shared_mask

    def _adapter_on(self) -> bool:
        return self.adapter_enabled and not self.merged

    def _folded_input(self, x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """fold(drop(x)) in the adapter's dtype: (..., d_in) -> (..., d_in / n). Dropout touches this branch only.

        One autograd node (core.fold_dropout) that keeps nothing of x's size for backward: the mask is drawn again
        from a seed, and the product with A keeps only the folded input (width d_in / n).
        """
        if self.shared_fold is not None and not self._own_masks():
            return self.shared_fold.get(x, self.training, lambda: self._fold(x, like))
        return self._fold(x, like)

    def _fold(self, x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return fold_dropout(x, self.dropout_p, self.n_blocks, self.training).to(like.dtype)

    def _deltas(self) -> Iterator[tuple[str, slice, torch.Tensor]]:
        """(parameter name, output rows, dense update) for each adapted matrix."""
        raise NotImplementedError

    def matrices(self) -> Iterator[tuple[int, int, bool]]:
        """(d_in, d_out, fold shared with the previous matrix) per adapted matrix: for cost reports."""
        raise NotImplementedError

    @torch.no_grad()
    def merge(self) -> None:
        """W += dW for every adapted matrix; the forward then costs what the stock module costs."""
        if not self.merged:
            for name, rows, delta in self._deltas():
                param = self.get_parameter(name)
                param[rows] += delta.to(param.dtype)
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """W -= dW: back to the frozen weights (up to float rounding)."""
        if self.merged:
            for name, rows, delta in self._deltas():
                param = self.get_parameter(name)
                param[rows] -= delta.to(param.dtype)
            self.merged = False

    @torch.no_grad()
    def merged_tensors(self) -> dict[str, torch.Tensor]:
        """Merged copies of the adapted parameters (name relative to this module); the module is not changed."""
        if self.merged:
            return {name: self.get_parameter(name).detach().clone() for name, _, _ in self._deltas()}
        out: dict[str, torch.Tensor] = {}
        for name, rows, delta in self._deltas():
            if name not in out:
                out[name] = self.get_parameter(name).detach().clone()
            out[name][rows] += delta.to(out[name].dtype)
        return out


class BlockLoRALinear(AdapterLayer):
    """y = W x + b + s * B @ A @ fold_n(drop(x)). n_blocks = 1 is plain LoRA.

    Adopts `base`'s weight and bias Parameters (state dict keys `weight`, `bias` as in nn.Linear) and adds
    trainable `lora_A` (r, in_features / n_blocks) and `lora_B` (out_features, r).
    """

    def __init__(
        self,
        base: nn.Linear,
        r: int = 2,
        n_blocks: int = 8,
        alpha: float = 1.0,
        dropout: float = 0.25,
        scaling: str = "rslora",
        fold: str = "sum",
        a_init: str = "kaiming",
    ) -> None:
        super().__init__()
        cfg = AdapterConfig(r=r, n_blocks=n_blocks, alpha=alpha, dropout=dropout, scaling=scaling, fold=fold,
                            a_init=a_init)
        check_width(base.in_features, n_blocks, "in_features of this Linear")
        self._setup(cfg)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight
        self.bias = base.bias
        w, dt = base.weight, adapter_dtype(base.weight)
        self.lora_A = nn.Parameter(torch.empty(r, base.in_features // n_blocks, device=w.device, dtype=dt))
        self.lora_B = nn.Parameter(torch.empty(base.out_features, r, device=w.device, dtype=dt))
        init_factors(self.lora_A, self.lora_B, n_blocks, a_init)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.linear(x, self.weight, self.bias)
        if not self._adapter_on():
            return out
        z = F.linear(self._folded_input(x, self.lora_A), self.lora_A)  # (..., r)
        return add_up_projection(out, z, (self.lora_B * self._scale).T.contiguous())

    def delta_weight(self) -> torch.Tensor:
        """The dense (out_features, in_features) update s * B @ [A, ..., A]."""
        return delta_weight(self.lora_A, self.lora_B, self.n_blocks, self._scale)

    def _deltas(self) -> Iterator[tuple[str, slice, torch.Tensor]]:
        yield "weight", slice(None), self.delta_weight()

    def matrices(self) -> Iterator[tuple[int, int, bool]]:
        yield self.in_features, self.out_features, False

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}, "
                f"n_blocks={self.n_blocks}, scaling={self.scaling:.4g}, dropout={self.dropout_p}")


def conv1x1_problem(module: nn.Module) -> str | None:
    """Why `module` is not a 1x1 convolution that is exactly a linear map over channels at every pixel, or None.

    Accepts nn.Conv2d and its subclasses with "same"-padding helpers (e.g. efficientnet_lite_pytorch's
    Conv2dStaticSamePadding / Conv2dDynamicSamePadding): with a 1x1 kernel and stride 1 their padding is zero.
    """
    if not isinstance(module, nn.Conv2d):
        return f"it is a {type(module).__name__}, not an nn.Linear or nn.Conv2d"
    if tuple(module.kernel_size) != (1, 1) or tuple(module.stride) != (1, 1) or module.groups != 1:
        return (f"only 1x1, stride 1, groups 1 convolutions can be adapted (it has kernel {tuple(module.kernel_size)},"
                f" stride {tuple(module.stride)}, groups {module.groups})")
    if module.padding not in ("valid", "same") and any(module.padding):
        return f"it pads its input ({module.padding}): not a pure channel map"
    pad = getattr(module, "static_padding", None)  # efficientnet's "same" padding module: zero for 1x1, stride 1
    if isinstance(pad, nn.Module) and (any(getattr(pad, "padding", ()) or ()) or list(pad.parameters())):
        return "its static_padding is not a no-op"
    return None


class BlockLoRAConv1x1(AdapterLayer):
    """A 1x1 convolution (a linear map over channels at every pixel) with a Block-LoRA update; n_blocks = 1 is LoRA.

    The same math as BlockLoRALinear with the channel dimension (dim 1 of (N, C, H, W)) in the role of the feature
    dimension: y = conv(x, W) + b + s * B @ A @ fold_n(drop(x)), the fold summing the n channel chunks. Adopts
    `base`'s `weight` (out, in, 1, 1) and `bias` (state dict keys as in nn.Conv2d) and adds trainable `lora_A`
    (r, in_channels / n_blocks) and `lora_B` (out_channels, r), 2-D as in BlockLoRALinear. Merge is exact.
    """

    def __init__(self, base: nn.Conv2d, cfg: AdapterConfig) -> None:
        super().__init__()
        problem = conv1x1_problem(base)
        if problem:
            raise ConfigError(f"cannot adapt {type(base).__name__}: {problem}")
        check_width(base.in_channels, cfg.n_blocks, "in_channels of this 1x1 convolution")
        self._setup(cfg)
        self.in_channels, self.out_channels = base.in_channels, base.out_channels
        self.weight = base.weight
        self.bias = base.bias
        w, dt = base.weight, adapter_dtype(base.weight)
        self.lora_A = nn.Parameter(torch.empty(cfg.r, base.in_channels // cfg.n_blocks, device=w.device, dtype=dt))
        self.lora_B = nn.Parameter(torch.empty(base.out_channels, cfg.r, device=w.device, dtype=dt))
        init_factors(self.lora_A, self.lora_B, cfg.n_blocks, cfg.a_init)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.conv2d(x, self.weight, self.bias)  # (N, C_out, H, W)
        if not self._adapter_on():
            return out
        # (N, C, H, W) -> (N, n, C/n, H, W) -> (N, C/n, H, W): additions only; the same node as the Linear's
        h = fold_dropout(x, self.dropout_p, self.n_blocks, self.training, dim=1)
        z = F.conv2d(h.to(self.lora_A.dtype), self.lora_A[:, :, None, None])  # (N, r, H, W)
        return out + (F.conv2d(z, self.lora_B[:, :, None, None]) * self._scale).to(out.dtype)

    def delta_weight(self) -> torch.Tensor:
        """The dense (out_channels, in_channels) update s * B @ [A, ..., A] (the 1x1 kernel without its 1x1)."""
        return delta_weight(self.lora_A, self.lora_B, self.n_blocks, self._scale)

    def _deltas(self) -> Iterator[tuple[str, slice, torch.Tensor]]:
        yield "weight", slice(None), self.delta_weight()[:, :, None, None]

    def matrices(self) -> Iterator[tuple[int, int, bool]]:
        yield self.in_channels, self.out_channels, False  # per pixel: a pixel is a token here

    def extra_repr(self) -> str:
        return (f"in_channels={self.in_channels}, out_channels={self.out_channels}, r={self.r}, "
                f"n_blocks={self.n_blocks}, scaling={self.scaling:.4g}, dropout={self.dropout_p}")


def check_width(width: int, n_blocks: int, what: str) -> None:
    if width % n_blocks:
        divisors = [d for d in range(1, min(width, 64) + 1) if width % d == 0]
        raise ConfigError(f"n_blocks={n_blocks} does not divide {what} ({width}): choose one of "
                          f"{', '.join(map(str, divisors))}")


def fused_attention_problem(module: nn.Module) -> str | None:
    """Why `module` is not a self-attention with CLIP's fused q/k/v layout that we can replace exactly, or None."""
    weight = getattr(module, "in_proj_weight", None)
    if not isinstance(weight, torch.Tensor) or not isinstance(getattr(module, "out_proj", None), nn.Linear):
        return "it has no fused in_proj_weight and out_proj Linear"
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


class BlockLoRAMultiheadAttention(AdapterLayer):
    """Drop-in for nn.MultiheadAttention (self-attention as in OpenAI CLIP / open_clip) with adapters on q, k, v, o.

    Keyed on the parameter layout (in_proj_weight (3E, E), in_proj_bias, out_proj), not on the class, so it also
    replaces modules with the same layout. Computes what the stock module computes with need_weights=False:
    batch_first either way, additive or boolean attn_mask (the text tower's causal mask), key_padding_mask,
    is_causal. Attention weights are never returned (the second output is None).

    In self-attention q, k and v read the same input: it is dropped out and folded once (one shared dropout mask)
    and the down-projections of all adapted letters are one (d/n -> m*r) product.
    """

    def __init__(self, mha: nn.Module, letters: Sequence[str], cfg: AdapterConfig) -> None:
        super().__init__()
        weight = getattr(mha, "in_proj_weight", None)
        problem = fused_attention_problem(mha)
        if problem:
            raise ConfigError(f"cannot adapt {type(mha).__name__}: {problem}")
        self.embed_dim = weight.shape[1]
        self.num_heads = mha.num_heads
        # nn.MultiheadAttention returns (output, weights) and may be sequence-first; open_clip's own Attention
        # class (same parameter layout) is batch-first, is called as attn(x, attn_mask=...) and returns a tensor.
        self.returns_tuple = isinstance(mha, nn.MultiheadAttention)
        self.batch_first = bool(getattr(mha, "batch_first", True)) if self.returns_tuple else True
        drop = getattr(mha, "dropout", None) if self.returns_tuple else getattr(mha, "attn_drop", None)
        self.attn_dropout = float(drop.p if isinstance(drop, nn.Dropout) else (drop or 0.0))
        check_width(self.embed_dim, cfg.n_blocks, "the attention width")
        self._setup(cfg)
        self.in_proj_weight = mha.in_proj_weight
        self.in_proj_bias = mha.in_proj_bias
        self.out_proj = mha.out_proj  # a Linear that, as in the stock module, is read but never called
        self.letters = tuple(letter for letter in "qkvo" if letter in letters)
        if not self.letters:
            raise ConfigError("no projection selected for this attention module")
        e, dev, dt = self.embed_dim, weight.device, adapter_dtype(weight)
        self.lora_A = nn.ParameterDict(
            {p: nn.Parameter(torch.empty(cfg.r, e // cfg.n_blocks, device=dev, dtype=dt)) for p in self.letters})
        self.lora_B = nn.ParameterDict(
            {p: nn.Parameter(torch.empty(e, cfg.r, device=dev, dtype=dt)) for p in self.letters})
        for p in self.letters:
            init_factors(self.lora_A[p], self.lora_B[p], cfg.n_blocks, cfg.a_init)
        self.qkv_letters = tuple(p for p in self.letters if p != "o")

    # -- updates --------------------------------------------------------------------------------------------------
    def delta_weight(self, letter: str) -> torch.Tensor:
        """Dense (E, E) update of one projection."""
        return delta_weight(self.lora_A[letter], self.lora_B[letter], self.n_blocks, self._scale)

    def _deltas(self) -> Iterator[tuple[str, slice, torch.Tensor]]:
        e = self.embed_dim
        for p in self.letters:
            if p == "o":
                yield "out_proj.weight", slice(None), self.delta_weight(p)
            else:
                i = "qkv".index(p)
                yield "in_proj_weight", slice(i * e, (i + 1) * e), self.delta_weight(p)

    def matrices(self) -> Iterator[tuple[int, int, bool]]:
        for j in range(len(self.qkv_letters)):  # one fold serves q, k and v (unless each draws its own mask)
            yield self.embed_dim, self.embed_dim, j > 0 and self.folds_once
        if "o" in self.letters:
            yield self.embed_dim, self.embed_dim, False

    # -- forward --------------------------------------------------------------------------------------------------
    def _qkv(self, x: torch.Tensor) -> torch.Tensor:
        """Self-attention input projection with the q/k/v adapters: (N, L, E) -> (N, L, 3E)."""
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias)
        if not self.qkv_letters or not self._adapter_on():
            return qkv
        if self._own_masks():  # one mask (one fold) per projection, as CLIP-LoRA's separate LinearLoRA layers
            z = torch.cat([F.linear(self._fold(x, self.lora_A[p]), self.lora_A[p]) for p in self.qkv_letters], -1)
        else:
            a = torch.cat([self.lora_A[p] for p in self.qkv_letters])  # (m*r, E/n): all letters in one product
            z = F.linear(self._folded_input(x, a), a)  # (N, L, m*r)
        e, r = self.embed_dim, self.r
        if len(self.qkv_letters) == 3:
            up_t = torch.block_diag(*(self.lora_B[p].T for p in "qkv"))  # (3r, 3E)
        else:  # zero columns for the projections without an adapter
            up_t = z.new_zeros(len(self.qkv_letters) * r, 3 * e)
            for j, p in enumerate(self.qkv_letters):
                i = "qkv".index(p)
                up_t[j * r:(j + 1) * r, i * e:(i + 1) * e] = self.lora_B[p].T
        return add_up_projection(qkv, z, up_t * self._scale)

    def _project(self, x: torch.Tensor, letter: str) -> torch.Tensor:
        """One of q, k, v separately (cross-attention inputs): (N, L, E) -> (N, L, E)."""
        i, e = "qkv".index(letter), self.embed_dim
        bias = self.in_proj_bias[i * e:(i + 1) * e] if self.in_proj_bias is not None else None
        out = F.linear(x, self.in_proj_weight[i * e:(i + 1) * e], bias)
        return self._with_adapter(out, x, letter)

    def _with_adapter(self, out: torch.Tensor, x: torch.Tensor, letter: str) -> torch.Tensor:
        if letter not in self.letters or not self._adapter_on():
            return out
        a, b = self.lora_A[letter], self.lora_B[letter]
        z = F.linear(self._folded_input(x, a), a)
        return add_up_projection(out, z, (b * self._scale).T.contiguous())

    def _attn_bias(self, attn_mask, key_padding_mask, n, l, s, dtype):
        """Canonical additive mask (broadcastable to (N, H, L, S)) from MHA's mask conventions, or None."""
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
    ) -> tuple[torch.Tensor, None] | torch.Tensor:
        key = query if key is None else key
        value = key if value is None else value
        self_attn = query is key and key is value
        if not self.batch_first:  # (L, N, E) -> (N, L, E); views, no copies
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
        bias = self._attn_bias(attn_mask, key_padding_mask, n, l, s, q.dtype)
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=bias, dropout_p=self.attn_dropout if self.training else 0.0,
            is_causal=bool(is_causal and bias is None))
        out = out.transpose(1, 2).reshape(n, l, e)  # (N, L, E)
        attn = out
        out = F.linear(attn, self.out_proj.weight, self.out_proj.bias)
        out = self._with_adapter(out, attn, "o")
        if not self.batch_first:
            out = out.transpose(0, 1)
        return (out, None) if self.returns_tuple else out

    def extra_repr(self) -> str:
        return (f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, batch_first={self.batch_first}, "
                f"letters={''.join(self.letters)}, r={self.r}, n_blocks={self.n_blocks}, "
                f"scaling={self.scaling:.4g}, dropout={self.dropout_p}")
