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
# former names (blocks) and PEFT's (layers_to_transform), accepted in configs and adapter files
ALIASES = {"blocks": "layers", "layers_to_transform": "layers"}
# The targeting-by-name fields (adapters/targeting.py): left out of to_dict while unset, so that the configs, hashes
# and adapter files of family targetings are what they were before these fields existed.
BY_NAME = ("target_modules", "target_types", "layers_pattern", "fused")
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
    """'all' | 'up' | '0,1,5' | '8-11' | [0, 1] | 3 -> a name or a sorted tuple of indices (negative = from the top)."""
    if isinstance(value, int) and not isinstance(value, bool):  # PEFT's layers_to_transform may be one int
        value = [value]
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


def _strings(value: Any, what: str) -> tuple[str, ...]:
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)) or not items or not all(isinstance(i, str) and i for i in items):
        raise ConfigError(f"{what} must be a name or a non-empty list of names, got {value!r}")
    return tuple(items)


def _type_names(value: Any) -> tuple[str, ...]:
    """Classes (or their qualified names) -> qualified names (JSON-able, comparable; targeting.is_instance)."""
    items = value if isinstance(value, (list, tuple)) else [value]
    out = []
    for item in items:
        if isinstance(item, type):
            out.append(f"{item.__module__}.{item.__qualname__}")
        elif isinstance(item, str) and item:
            out.append(item)
        else:
            raise ConfigError(f"target_types must be module classes (e.g. torch.nn.Linear) or their names, got "
                              f"{item!r}")
    if not out:
        raise ConfigError("target_types is empty: name at least one module class, or leave it unset")
    return tuple(out)


def _check_by_name(cfg: AdapterConfig, set_: Any) -> None:
    """Normalise and check the targeting-by-name fields (PEFT's LoraConfig rules where PEFT has the field)."""
    import re

    tm = cfg.target_modules
    if tm is not None:
        if isinstance(tm, str):
            try:
                re.compile(tm)
            except (re.error, RecursionError, OverflowError) as e:
                raise ConfigError(f"target_modules {tm!r} is not a regular expression ({getattr(e, 'msg', e)}): "
                                  "give a valid one, or a list of module names") from None
            if cfg.layers != "all":  # PEFT's LoraConfig refuses this combination too
                raise ConfigError("layers (layers_to_transform) cannot be used when target_modules is a regular "
                                  "expression: select the layers in the expression, or give a list of names")
        else:
            set_(cfg, "target_modules", _strings(tm, "target_modules"))
    if cfg.target_types is not None:
        set_(cfg, "target_types", _type_names(cfg.target_types))
    if cfg.layers_pattern is not None:
        lp = _strings(cfg.layers_pattern, "layers_pattern")
        set_(cfg, "layers_pattern", lp[0] if isinstance(cfg.layers_pattern, str) else lp)
        if cfg.layers == "all":  # PEFT: "When layers_pattern is specified, layers_to_transform must also be"
            raise ConfigError("layers_pattern names where the block index is read: give layers too (e.g. 0,1)")
    fused = cfg.fused.items() if isinstance(cfg.fused, Mapping) else cfg.fused
    try:
        pairs = tuple((str(name), _parse_names(rows, PROJECTIONS, "projection")) for name, rows in fused)
    except (TypeError, ValueError):
        raise ConfigError(f"fused must map module names to their row blocks, e.g. {{'qkv': 'qkv'}}, got "
                          f"{cfg.fused!r}") from None
    for name, rows in pairs:
        if rows != ("q", "k", "v"):
            raise ConfigError(f"fused {name!r}: row blocks {','.join(rows)} are not supported; a fused Linear holds "
                              "q, k, v in this order (weight (3H, E), timm's qkv)")
    set_(cfg, "fused", pairs)
    if not cfg.by_name and (cfg.layers_pattern is not None or pairs):
        raise ConfigError("layers_pattern and fused apply to adapters placed by name: give target_modules (or "
                          "target_types) too")


@dataclass(frozen=True)
class AdapterConfig:
    """Block-LoRA (n_blocks > 1 shares one down-projection block) or LoRA (n_blocks = 1) on CLIP attention.

    Defaults are the CLIP-LoRA reference recipe (r=2, alpha=1, s=alpha/sqrt(r), dropout 0.25 on the adapter input,
    q/k/v of every layer of both towers) with Block-LoRA, n_blocks=8 (docs/method.md). Placement is by tower
    ("vision", "text"), layer range (`layers`: a LAYER_RANGES name or indices; `blocks` is its former name, still
    accepted) and projections (q, k, v, o). On any other model, adapters go where `target_modules` / `target_types`
    say (PEFT's matching rules; `layers` then selects by block index, PEFT's layers_to_transform, read after
    `layers_pattern`; `fused` names fused q/k/v Linears, whose row blocks `projections` selects; towers do not
    apply): adapters/targeting.py. Every value is checked here: ConfigError names the bad one.
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
    # Targeting by name and type, on any model (adapters/targeting.py; PEFT's LoraConfig names and rules)
    target_modules: str | tuple[str, ...] | None = option(
        None, "modules to adapt by name, on any model (PEFT's rules): a regular expression matching the whole name, "
        "or names matching exactly or as the end after a '.'; towers then do not apply")
    target_types: tuple[str, ...] | None = option(
        None, "module classes to adapt (classes or qualified names, e.g. torch.nn.Linear); with target_modules: "
        "modules matching both")
    layers_pattern: str | tuple[str, ...] | None = option(
        None, "with target_modules and layers: the name before the block index (PEFT's layers_pattern, e.g. blocks)")
    fused: tuple[tuple[str, tuple[str, ...]], ...] = option(
        (), "fused q/k/v Linears among the targets, by name, with their row blocks: {'qkv': 'qkv'} (timm)")
    blocks: InitVar[str | tuple[int, ...] | None] = None  # the former name of `layers`
    layers_to_transform: InitVar[int | tuple[int, ...] | None] = None  # PEFT's name of `layers`

    def __post_init__(self, blocks: str | tuple[int, ...] | None,
                      layers_to_transform: int | tuple[int, ...] | None = None) -> None:
        set_ = object.__setattr__
        for alias, value in (("blocks", blocks), ("layers_to_transform", layers_to_transform)):
            if value is not None:
                if self.layers not in ("all", value):
                    raise ConfigError(f"layers={self.layers!r} and {alias}={value!r} disagree: {alias} is another "
                                      "name of layers, give one")
                set_(self, "layers", value)
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
        set_(self, "n_blocks", n)
        set_(self, "alpha", float(self.alpha))
        set_(self, "dropout", float(self.dropout))
        set_(self, "towers", _parse_names(self.towers, TOWERS, "tower"))
        set_(self, "projections", _parse_names(self.projections, PROJECTIONS, "projection"))
        set_(self, "layers", _parse_layers(self.layers))
        _check_by_name(self, set_)

    @property
    def by_name(self) -> bool:
        """Whether adapters go where target_modules / target_types say (any model), not by a family's towers."""
        return self.target_modules is not None or self.target_types is not None

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
        for key in BY_NAME:
            if not d[key]:
                del d[key]
        if "target_modules" in d and not isinstance(self.target_modules, str):
            d["target_modules"] = list(self.target_modules)
        for key in ("target_types", "layers_pattern"):
            if key in d and not isinstance(d[key], str):
                d[key] = list(d[key])
        if "fused" in d:
            d["fused"] = {name: list(rows) for name, rows in self.fused}
        return d

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> AdapterConfig:
        """The inverse of to_dict. Also reads the files of earlier versions (`blocks`, an empty `extra`)."""
        if not isinstance(data, Mapping):
            raise ConfigError(f"an adapter config must be a mapping of options, got {type(data).__name__}")
        clash = [k for k in ALIASES if k in data and ALIASES[k] in data]
        if clash:
            raise ConfigError(f"adapter options {clash[0]} and {ALIASES[clash[0]]} are one option: give one")
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
