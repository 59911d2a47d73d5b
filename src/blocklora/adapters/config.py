"""AdapterConfig: which method, which hyper-parameters, and where adapters go. Validates itself, serialises to JSON."""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Mapping, Sequence
from dataclasses import InitVar, dataclass
from typing import Any

from .. import checks as c
from ..checks import option
from ..choices import AInit, DropoutMask, Fold, Method, Scaling
from ..errors import ConfigError

METHODS, SCALINGS, FOLDS, A_INITS = (typing.get_args(t) for t in (Method, Scaling, Fold, AInit))
ADAPTER_METHODS = ("block_lora", "lora")  # the methods that inject adapters; the rest are methods/'s baselines
TOWERS = ("vision", "text")
PROJECTIONS = ("q", "k", "v", "o")
# The scaling numerator's upper bound. s = alpha / sqrt(r) (or / r) multiplies B A x; with AdamW each entry of B
# moves by about lr in the first step (B starts at 0), so the adapter adds about s * lr * |A x| to an output that is
# O(1): past 10^4 (s in the thousands) one step swamps the frozen weights, and alpha near 1e308 overflows float32
# (3.4e38) at the first forward. The recipes use alpha = 1 (CLIP-LoRA) to 2 r (LoRA practice; 8192 at the largest
# rank allowed, 4096), all within it.
MAX_ALPHA = 1e4
DEFAULT_N_BLOCKS = 8  # "one head, eight arms"; see BENCHMARKS.md for the ablation over n
# CLIP-LoRA's named layer ranges, defined for any depth (its tables are the 12- and 24-layer cases).
LAYER_RANGES = ("all", "bottom", "mid", "up", "half-up", "half-bottom", "top", "top3")
ALIASES = {"blocks": "layers"}  # the names of earlier versions, still accepted in configs and adapter files
# Dropout masks of the projections that read one input (self-attention's q, k, v): one mask per projection
# (CLIP-LoRA: an nn.Dropout inside each LinearLoRA) or one shared mask (one fold of the input serves all three).
DROPOUT_MASKS = typing.get_args(DropoutMask)


def resolve_layers(spec: str | Sequence[int], depth: int) -> list[int]:
    """Layer (block) indices of a tower with `depth` layers for a range name (LAYER_RANGES) or explicit indices.

    Raises ConfigError for an unknown name or an index outside 0..depth-1 (negative indices count from the top).
    """
    if isinstance(spec, str):
        third, half = depth // 3, depth // 2
        named = {
            "all": range(depth),
            "bottom": range(0, third),
            "mid": range(third, 2 * third),
            "up": range(2 * third, depth),
            "half-up": range(half, depth),
            "half-bottom": range(0, half),
            "top": range(depth - 1, depth),
            "top3": range(max(0, depth - 3), depth),
        }
        if spec not in named:
            raise ConfigError(f"unknown layer range {spec!r}: use one of {', '.join(LAYER_RANGES)} or indices")
        return list(named[spec])
    out = sorted({int(i) + depth if int(i) < 0 else int(i) for i in spec})
    bad = [i for i in out if not 0 <= i < depth]
    if bad:
        raise ConfigError(f"layer index {bad[0]} out of range for a tower with {depth} layers (0..{depth - 1})")
    return out


def _parse_layers(value: Any) -> str | tuple[int, ...]:
    """'all' | 'up' | '0,1,5' | '8-11' | [0, 1] -> a name or a sorted tuple of indices (negative = from the top)."""
    if isinstance(value, str):
        text = value.strip()
        if text in LAYER_RANGES:
            return text
        if not text or text[0].isalpha():
            raise ConfigError(f"unknown layer range {value!r}: use one of {', '.join(LAYER_RANGES)} or indices")
        indices: list[int] = []
        try:
            for part in text.split(","):
                lo, sep, hi = part.strip().partition("-") if not part.strip().startswith("-") else (part, "", "")
                indices.extend(range(int(lo), int(hi) + 1) if sep else [int(lo)])
        except ValueError:
            raise ConfigError(f"cannot read layers {value!r}: write a name, '0,1,2' or '8-11'") from None
        value = indices
    try:
        out = tuple(sorted({int(i) for i in value}))
    except (TypeError, ValueError):
        raise ConfigError(f"cannot read layers {value!r}: write a name, '0,1,2' or '8-11'") from None
    if not out:
        raise ConfigError("layers is empty: name at least one layer")
    return out


def _parse_names(value: Any, allowed: Sequence[str], what: str) -> tuple[str, ...]:
    """"q,v" | "qkv" | ["q", "v"] -> the names in `allowed`'s order, checked; `what` names them in errors."""
    if not isinstance(value, (str, list, tuple)) or not all(isinstance(i, str) for i in value):
        raise ConfigError(f"{what}s must be names such as {','.join(allowed)}, got {value!r}")
    items = value.replace(" ", "").split(",") if isinstance(value, str) else list(value)
    if len(items) == 1 and what == "projection" and len(items[0]) > 1 and set(items[0]) <= set(allowed):
        items = list(items[0])  # "qkv" -> q, k, v
    items = [str(i).strip() for i in items if str(i).strip()]
    for item in items:
        if item not in allowed:
            raise ConfigError(f"unknown {what} {item!r}: use any of {', '.join(allowed)}")
    if not items:
        raise ConfigError(f"no {what} selected: name at least one of {', '.join(allowed)}")
    return tuple(i for i in allowed if i in items)  # canonical order, no duplicates


@dataclass(frozen=True)
class AdapterConfig:
    """Block-LoRA (n_blocks > 1 shares one down-projection block) or LoRA (n_blocks = 1) on CLIP attention.

    Defaults are the CLIP-LoRA reference recipe (r=2, alpha=1, s=alpha/sqrt(r), dropout 0.25 on the adapter input,
    q/k/v of every layer of both towers) with Block-LoRA, n_blocks=8 (docs/method.md). Placement is by tower
    ("vision", "text"), layer range (`layers`: a LAYER_RANGES name or indices; `blocks` is its former name, still
    accepted) and projections (q, k, v, o). Every value is checked here: ConfigError names the bad one.
    Trainable parameters per adapted (d_out, d_in) matrix: r * d_in / n_blocks + r * d_out.
    """

    method: Method = option("block_lora", "block_lora (n_blocks > 1 share one down-projection block), lora, or a "
                            "baseline on the frozen model: probe, tip_adapter, tip_adapter_f, coop (docs/recipe.md)",
                            flag="--method")
    r: int = option(2, "rank", flag="--r")
    n_blocks: int | None = option(None, "blocks sharing the down-projection A (1 = LoRA)", flag="--n-blocks",
                                  shown="8 for block_lora, 1 for lora")
    alpha: float = option(1.0, "scaling numerator: s = alpha / sqrt(r) (rslora) or alpha / r", flag="--alpha")
    dropout: float = option(0.25, "dropout on the adapter input (CLIP-LoRA)", flag="--dropout")
    dropout_mask: DropoutMask = option("auto", "q, k and v (one input): one dropout mask per projection or one "
                                       "shared mask", shown="per_projection for lora (CLIP-LoRA), shared for "
                                       "block_lora")
    scaling: Scaling = option("rslora", "rslora: s = alpha / sqrt(r); standard: alpha / r")
    fold: Fold = option("sum", "how the n input chunks are combined: sum (the paper's formulation) or mean")
    a_init: AInit = option("kaiming", "fan-in of A's init: its own width d_in/n (kaiming) or d_in (kaiming_full)")
    towers: tuple[str, ...] = option(TOWERS, "towers to adapt: any of vision,text", flag="--towers")
    layers: str | tuple[int, ...] = option("all", "layers to adapt: all, bottom, mid, up, half-up, half-bottom, top, "
                                           "top3, or indices like 0,1 or 8-11", flag="--layers",
                                           aliases=("--blocks",))
    projections: tuple[str, ...] = option(("q", "k", "v"), "attention projections to adapt: any of q,k,v,o",
                                          flag="--projections")
    blocks: InitVar[str | tuple[int, ...] | None] = None  # the former name of `layers`

    def __post_init__(self, blocks: str | tuple[int, ...] | None) -> None:
        set_ = object.__setattr__
        if blocks is not None:
            if self.layers not in ("all", blocks):
                raise ConfigError(f"layers={self.layers!r} and blocks={blocks!r} disagree: blocks is the former "
                                  "name of layers, give one")
            set_(self, "layers", blocks)
        c.apply(self, "adapter", {"method": c.one_of(*METHODS), "r": c.num(1, 4096, integer=True),
                                  "n_blocks": c.num(1, 4096, integer=True, optional=True),
                                  # alpha 0 (or NaN) would train nothing, or nothing finite; MAX_ALPHA above
                                  "alpha": c.num(0, MAX_ALPHA, lo_open=True), "dropout": c.num(0, 1, hi_open=True),
                                  "scaling": c.one_of(*SCALINGS), "fold": c.one_of(*FOLDS),
                                  "a_init": c.one_of(*A_INITS), "dropout_mask": c.one_of(*DROPOUT_MASKS)})
        n = self.n_blocks
        if n is None:
            n = DEFAULT_N_BLOCKS if self.method == "block_lora" else 1
        if self.method == "lora" and n != 1:
            raise ConfigError(f"method 'lora' means n_blocks=1, got n_blocks={n}: use method 'block_lora'")
        if self.method not in ADAPTER_METHODS and n != 1:
            raise ConfigError(f"method {self.method!r} injects no adapter (it trains a head or prompt context on "
                              f"the frozen model, methods/), so n_blocks does not apply, got n_blocks={n}: drop it")
        set_(self, "n_blocks", n)
        set_(self, "alpha", float(self.alpha))
        set_(self, "dropout", float(self.dropout))
        set_(self, "towers", _parse_names(self.towers, TOWERS, "tower"))
        set_(self, "projections", _parse_names(self.projections, PROJECTIONS, "projection"))
        set_(self, "layers", _parse_layers(self.layers))

    @property
    def shared_dropout_mask(self) -> bool:
        """Whether q, k and v (one input) share one dropout mask; "auto" follows the method (config.METHOD_DEFAULTS)."""
        if self.dropout_mask == "auto":
            return self.method == "block_lora"
        return self.dropout_mask == "shared"

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["towers"], d["projections"] = list(self.towers), list(self.projections)
        d["layers"] = self.layers if isinstance(self.layers, str) else list(self.layers)
        return d

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> AdapterConfig:
        """The inverse of to_dict. Also reads the files of earlier versions (`blocks`, an empty `extra`)."""
        if not isinstance(data, Mapping):
            raise ConfigError(f"an adapter config must be a mapping of options, got {type(data).__name__}")
        data = {ALIASES.get(k, k): v for k, v in data.items()}
        if data.pop("extra", None):  # always empty in files of earlier versions: nothing ever read it
            raise ConfigError("the adapter option 'extra' is not supported: remove it")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown adapter option(s) {', '.join(unknown)}: known are {', '.join(sorted(known))}")
        return cls(**data)


# Reading the former name gives the current value (the InitVar above only serves construction; dataclass has taken
# its default already, so the class attribute is free for a read-only alias).
AdapterConfig.blocks = property(lambda self: self.layers, doc="The former name of `layers` (read-only).")
