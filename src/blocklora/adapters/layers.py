"""Adapter layers on one matrix: a wrapped nn.Linear and a wrapped 1x1 convolution (fused q/k/v: fused.py).

One convention for every layer class (the dispatch table is inject.LAYER_CLASSES, site kind -> class):
  Layer.problem(module, projections, n_blocks)  why `module` cannot be adapted (None when it can): checked by
                                                 plan() before anything changes
  Layer.factor_shapes(module, projections, r, n_blocks)  {name relative to the module: shape} of the adapter
                                                 tensors the layer will create (load_adapter checks files with it)
  Layer(base, cfg, projections)                  the layer, adopting base's Parameters under their own names
A layer keeps the wrapped module's Parameters under their stock names (weight, bias; in_proj_weight, out_proj.*), so
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


class SharedFold:
    """The folded input of Linears that read the same tensor (self-attention's q, k and v), computed once.

    The first layer called on a tensor folds it (one dropout mask, one fold, one node in the graph); the others
    called on the very same tensor object (same version, same train/eval mode) reuse that result, so the three
    down-projections cost one fold, as in the fused attention layers, and backward regenerates one mask instead of
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


def check_width(width: int, n_blocks: int, what: str) -> str | None:
    """Why n_blocks cannot split an input of `width` (it must divide it), or None."""
    if width % n_blocks:
        divisors = [d for d in range(1, min(width, 64) + 1) if width % d == 0]
        return (f"n_blocks={n_blocks} does not divide {what} ({width}): choose one of "
                f"{', '.join(map(str, divisors))}")
    return None


def adapter_dtype(weight: torch.Tensor) -> torch.dtype:
    """The adapter factors' dtype: the frozen weight's, but fp32 under half-precision frozen weights (AdamW's
    moments and small updates underflow or overflow in fp16; autocast still runs the products in half)."""
    return torch.float32 if weight.dtype in (torch.float16, torch.bfloat16) else weight.dtype


def new_factors(cfg: AdapterConfig, d_in: int, d_out: int, like: torch.Tensor) -> tuple[nn.Parameter, nn.Parameter]:
    """A (r, d_in / n) and B (d_out, r), initialised (core.init_factors: B = 0), on `like`'s device, in
    adapter_dtype(like)."""
    dtype = adapter_dtype(like)
    a = nn.Parameter(torch.empty(cfg.r, d_in // cfg.n_blocks, device=like.device, dtype=dtype))
    b = nn.Parameter(torch.empty(d_out, cfg.r, device=like.device, dtype=dtype))
    init_factors(a, b, cfg.n_blocks, cfg.a_init)
    return a, b


class AdapterLayer(nn.Module):
    """What every adapter layer shares: the scaling, the folded input, merge / unmerge / merged copies.

    Subclasses list their updates in `_deltas()` and their matrices in `matrices()` (for cost reports).
    `tower` is set by inject (the tower the layer sits in, for reports).
    """

    def __init__(self, base: nn.Module, cfg: AdapterConfig | None, projections: Sequence[str]) -> None:
        """Check `base` with the class's own problem() (ConfigError naming the module), then the shared state."""
        cfg = cfg or AdapterConfig()
        problem = type(self).problem(base, projections, cfg.n_blocks)
        if problem:
            raise ConfigError(f"cannot adapt this {type(base).__name__} with {type(self).__name__}: {problem}")
        super().__init__()
        self.config = cfg
        self.r, self.n_blocks, self.dropout_p = cfg.r, cfg.n_blocks, cfg.dropout
        self.projections = tuple(p for p in "qkvo" if p in projections)
        # The fold's 1/n (mean) is folded into the scalar, so the hot path is a plain sum.
        self.scaling = scaling_factor(cfg.alpha, cfg.r, cfg.scaling)
        self._scale = self.scaling * fold_factor(cfg.n_blocks, cfg.fold)
        self.merged = False
        self.adapter_enabled = True
        self.shared_fold: SharedFold | None = None  # set by inject on q, k, v Linears of one attention
        # q, k and v share one dropout mask (one fold) in training, or draw one each (CLIP-LoRA's per-projection
        # nn.Dropout); out of training, or without dropout, the fold is the same either way and is shared.
        self.shared_mask = cfg.shared_dropout_mask
        self.tower = ""

    # -- the convention ------------------------------------------------------------------------------------------
    @classmethod
    def problem(cls, module: nn.Module, projections: Sequence[str], n_blocks: int) -> str | None:
        raise NotImplementedError

    @classmethod
    def factor_shapes(cls, module: nn.Module, projections: Sequence[str], r: int, n_blocks: int
                      ) -> dict[str, tuple[int, int]]:
        raise NotImplementedError

    # -- shared computation --------------------------------------------------------------------------------------
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

    def _fold(self, x: torch.Tensor, like: torch.Tensor, dim: int = -1) -> torch.Tensor:
        return fold_dropout(x, self.dropout_p, self.n_blocks, self.training, dim=dim).to(like.dtype)

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

    def extra_repr(self) -> str:
        return (f"projections={''.join(self.projections)}, r={self.r}, n_blocks={self.n_blocks}, "
                f"scaling={self.scaling:.4g}, dropout={self.dropout_p}")


class BlockLoRALinear(AdapterLayer):
    """y = W x + b + s * B @ A @ fold_n(drop(x)) on an nn.Linear; n_blocks = 1 is plain LoRA.

    Shapes: x (..., in_features) -> y (..., out_features). Adopts `base`'s weight (out_features, in_features) and
    bias (state dict keys `weight`, `bias` as in nn.Linear) and adds trainable `lora_A` (r, in_features / n) and
    `lora_B` (out_features, r). `projections` names the role the matrix plays (q, k, v or o), for reports.
    Raises ConfigError when n_blocks does not divide in_features. Formula: docs/method.md (Block-LoRA).
    """

    @classmethod
    def problem(cls, module: nn.Module, projections: Sequence[str], n_blocks: int) -> str | None:
        if not isinstance(module, nn.Linear):
            return f"it is a {type(module).__name__}, not an nn.Linear"
        return check_width(module.in_features, n_blocks, "in_features")

    @classmethod
    def factor_shapes(cls, module: nn.Module, projections: Sequence[str], r: int, n_blocks: int
                      ) -> dict[str, tuple[int, int]]:
        return {"lora_A": (r, module.in_features // n_blocks), "lora_B": (module.out_features, r)}

    def __init__(self, base: nn.Linear, cfg: AdapterConfig | None = None, projections: Sequence[str] = ()) -> None:
        super().__init__(base, cfg, projections)
        self.in_features, self.out_features, self.weight, self.bias = (base.in_features, base.out_features,
                                                                       base.weight, base.bias)
        self.lora_A, self.lora_B = new_factors(self.config, base.in_features, base.out_features, base.weight)

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
        return f"in_features={self.in_features}, out_features={self.out_features}, {super().extra_repr()}"


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
    Raises ConfigError for anything but a 1x1, stride 1, ungrouped, unpadded convolution (conv1x1_problem).
    """

    @classmethod
    def problem(cls, module: nn.Module, projections: Sequence[str], n_blocks: int) -> str | None:
        return conv1x1_problem(module) or check_width(module.in_channels, n_blocks, "in_channels")

    @classmethod
    def factor_shapes(cls, module: nn.Module, projections: Sequence[str], r: int, n_blocks: int
                      ) -> dict[str, tuple[int, int]]:
        return {"lora_A": (r, module.in_channels // n_blocks), "lora_B": (module.out_channels, r)}

    def __init__(self, base: nn.Conv2d, cfg: AdapterConfig | None = None, projections: Sequence[str] = ()) -> None:
        super().__init__(base, cfg, projections)
        self.in_channels, self.out_channels, self.weight, self.bias = (base.in_channels, base.out_channels,
                                                                       base.weight, base.bias)
        self.lora_A, self.lora_B = new_factors(self.config, base.in_channels, base.out_channels, base.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.conv2d(x, self.weight, self.bias)  # (N, C_out, H, W)
        if not self._adapter_on():
            return out
        # (N, C, H, W) -> (N, n, C/n, H, W) -> (N, C/n, H, W): additions only; the same node as the Linear's
        h = self._fold(x, self.lora_A, dim=1)
        z = F.conv2d(h, self.lora_A[:, :, None, None])  # (N, r, H, W)
        return out + (F.conv2d(z, self.lora_B[:, :, None, None]) * self._scale).to(out.dtype)

    def delta_weight(self) -> torch.Tensor:
        """The dense (out_channels, in_channels) update s * B @ [A, ..., A] (the 1x1 kernel without its 1x1)."""
        return delta_weight(self.lora_A, self.lora_B, self.n_blocks, self._scale)

    def _deltas(self) -> Iterator[tuple[str, slice, torch.Tensor]]:
        yield "weight", slice(None), self.delta_weight()[:, :, None, None]

    def matrices(self) -> Iterator[tuple[int, int, bool]]:
        yield self.in_channels, self.out_channels, False  # per pixel: a pixel is a token here

    def extra_repr(self) -> str:
        return f"in_channels={self.in_channels}, out_channels={self.out_channels}, {super().extra_repr()}"


def conv1d_problem(module: nn.Module) -> str | None:
    """Why `module` is not transformers' Conv1D (GPT-2's y = x @ W + b, W (d_in, d_out)), or None."""
    weight = getattr(module, "weight", None)
    if type(module).__name__ != "Conv1D" or not isinstance(weight, torch.Tensor) or weight.dim() != 2 \
            or getattr(module, "nf", None) != weight.shape[1]:
        return f"it is a {type(module).__name__}, not transformers' Conv1D (weight (d_in, d_out), nf = d_out)"
    return None


class BlockLoRAConv1D(AdapterLayer):
    """transformers' Conv1D (GPT-2's c_attn, c_proj, c_fc) with a Block-LoRA update; n_blocks = 1 is LoRA.

    Conv1D is a Linear whose weight is stored transposed, (d_in, d_out): y = x @ W + b. The update is the Linear's,
    y += s * B @ A @ fold_n(drop(x)) with A (r, d_in / n) and B (d_out, r) (the shapes PEFT's LoRA gives a Conv1D
    with fan_in_fan_out), and a merge adds its transpose to W. Shapes: x (..., d_in) -> (..., d_out). Adopts
    `base`'s `weight` and `bias` (state dict keys as in Conv1D). A fused c_attn (rows q, k, v in its columns) is
    adapted as one matrix, as PEFT does. Raises ConfigError for another module or an n_blocks not dividing d_in.
    """

    @classmethod
    def problem(cls, module: nn.Module, projections: Sequence[str], n_blocks: int) -> str | None:
        return conv1d_problem(module) or check_width(module.weight.shape[0], n_blocks, "d_in")

    @classmethod
    def factor_shapes(cls, module: nn.Module, projections: Sequence[str], r: int, n_blocks: int
                      ) -> dict[str, tuple[int, int]]:
        d_in, d_out = module.weight.shape
        return {"lora_A": (r, d_in // n_blocks), "lora_B": (d_out, r)}

    def __init__(self, base: nn.Module, cfg: AdapterConfig | None = None, projections: Sequence[str] = ()) -> None:
        super().__init__(base, cfg, projections)
        self.in_features, self.out_features = base.weight.shape
        self.nf, self.weight, self.bias = base.nf, base.weight, base.bias
        self.lora_A, self.lora_B = new_factors(self.config, self.in_features, self.out_features, base.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # transformers' Conv1D.forward, to the bit: one addmm over the flattened tokens
        out = torch.addmm(self.bias, x.reshape(-1, x.shape[-1]), self.weight).view(*x.shape[:-1], self.nf)
        if not self._adapter_on():
            return out
        z = F.linear(self._folded_input(x, self.lora_A), self.lora_A)  # (..., r)
        return add_up_projection(out, z, (self.lora_B * self._scale).T.contiguous())

    def delta_weight(self) -> torch.Tensor:
        """The dense update as a Linear's, (d_out, d_in): s * B @ [A, ..., A] (the Conv1D weight gets its .T)."""
        return delta_weight(self.lora_A, self.lora_B, self.n_blocks, self._scale)

    def _deltas(self) -> Iterator[tuple[str, slice, torch.Tensor]]:
        yield "weight", slice(None), self.delta_weight().T

    def matrices(self) -> Iterator[tuple[int, int, bool]]:
        yield self.in_features, self.out_features, False

    def extra_repr(self) -> str:
        return f"nx={self.in_features}, nf={self.nf}, {super().extra_repr()}"
