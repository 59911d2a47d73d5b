"""Where adapters go, as data: by module name and type on any nn.Module, or a model family's ready-made targeting.

Two ways to say it, one result (a list of Target: module path, layer kind, projections), which inject() validates
as a whole before it changes anything:

- **By name and type, on any model** (AdapterConfig.target_modules / target_types / layers / layers_pattern /
  fused). The name rules are PEFT's (peft.tuners.tuners_utils.check_target_module_exists): a str is a regular
  expression that must match the whole module name (re.fullmatch); a list matches a name equal to an entry or
  ending in "." + entry. `target_types` keeps modules that are instances of one of the classes (given as classes or
  qualified names). `layers` (PEFT's layers_to_transform) keeps modules whose block index, the first number after
  a `layers_pattern` name (default: any name) in the module name, is selected; as in PEFT it needs a list of names,
  not a regular expression. `fused` names fused q/k/v Linears (timm's `qkv`: weight (3H, E), rows q, k, v).
  What each matched module becomes follows its type (match_kind): nn.Linear, a 1x1 nn.Conv2d, transformers'
  Conv1D (GPT-2: its weight (d_in, d_out) is a transposed Linear's), nn.MultiheadAttention (q, k, v, o per
  AdapterConfig.projections), a fused qkv Linear; any other type is refused by name.
- **A family's targeting** (Targeting, formerly Placement): per tower, one Site per block (bottom to top), found by
  a finder the family registers (register_targeting; blocklora.backbones registers open_clip, transformers and
  effnet-minilm) and selected by AdapterConfig.towers / layers / projections. A caller may pass one to inject().

This module imports no model family (Conv1D is recognised by its layout and class name, not imported).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from ..errors import ConfigError
from .config import resolve_layers

# Site kinds: how the module at Site.path is adapted (the layer classes are in layers.py / fused.py).
FUSED_MHA = "fused_mha"  # the module has nn.MultiheadAttention's fused layout (in_proj_weight (3E, E) + out_proj)
LINEARS = "linears"  # one child module per projection (q, k, v: nn.Linear; a fused qkv nn.Linear; o: nn.Linear)
LAYERS = "layers"  # a block without attention (a CNN's): named children (nn.Linear or 1x1 conv) per projection
MATCHED_TOWER = "model"  # the tower name of targets matched by name and type (reports group by it)


@dataclass(frozen=True)
class Site:
    """One block's adaptable modules in one tower.

    kind FUSED_MHA: the module at `path` is replaced as a whole; `children` is empty.
    kind LINEARS: `children` holds (projection, child name) pairs under `path`. A child named under q, k and v
    together is a fused qkv nn.Linear of shape (3H, E) whose row blocks are q, k and v (timm's `qkv`); any other
    child is an nn.Linear wrapped as one matrix. Projections a site lacks are an error.
    kind LAYERS: (projection, child) pairs naming nn.Linear or 1x1 nn.Conv2d children; a child may stand under
    several projections and is then wrapped once. Projections a site lacks are skipped. The family's module says
    what the projections mean there.
    """

    tower: str
    layer: int
    path: str
    kind: str
    children: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class Targeting:
    """A model family's sites per tower (`sites[tower]`, bottom to top) and, for messages, what each tower is.

    `towers` maps every tower the family knows to a short description of the module found there (its class), so
    that a tower without sites can be refused by name ("a TimmModel around a ConvNeXt has no attention").
    """

    family: str
    sites: Mapping[str, tuple[Site, ...]]
    towers: Mapping[str, str] = field(default_factory=dict)

    def describe(self, tower: str) -> str:
        return self.towers.get(tower, "nothing")


Placement = Targeting  # the former name

Finder = Callable[[nn.Module], "Targeting | None"]
_FINDERS: dict[str, Finder] = {}


def register_targeting(family: str, finder: Finder) -> None:
    """Let inject() place adapters on the models `finder` recognises (it returns None for any other model)."""
    _FINDERS[family] = finder


register_finder = register_targeting  # the former name


def find_targeting(model: nn.Module) -> Targeting:
    """The targeting of the first registered family that recognises `model`; a clear error otherwise."""
    for finder in _FINDERS.values():
        targeting = finder(model)
        if targeting is not None:
            return targeting
    known = ", ".join(_FINDERS) or "none registered (import blocklora.backbones, or pass a Targeting to inject)"
    raise ConfigError(f"blocklora does not know where attention lives in a {type(model).__name__}: known families "
                      f"are {known}; or name the modules to adapt, e.g. AdapterConfig(target_modules=[\"qkv\", "
                      "\"proj\"]) (PEFT's rules)")


find_placement = find_targeting  # the former name


@dataclass(frozen=True)
class Target:
    """One module that inject() will replace by inject.LAYER_CLASSES[kind](module, cfg, projections)."""

    path: str
    kind: str
    projections: tuple[str, ...]
    tower: str
    layer: int


# -- by name and type (PEFT's rules) -----------------------------------------------------------------------------------
def name_matches(name: str, target_modules: str | Iterable[str]) -> bool:
    """PEFT's name rule (check_target_module_exists): a str is a regular expression matching the whole name; a list
    matches a name equal to one entry or ending in "." + entry."""
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, name) is not None
    return any(name == key or name.endswith(f".{key}") for key in target_modules)


def layer_index(name: str, layers_pattern: str | Iterable[str] | None = None) -> int | None:
    """The block index PEFT reads from a module name: the first number segment after a `layers_pattern` name, or
    (no pattern) after any name segment ("blocks.3.attn.qkv" -> 3); None when the name has none."""
    if not layers_pattern:
        match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", name)
    else:
        match = None
        for pattern in [layers_pattern] if isinstance(layers_pattern, str) else layers_pattern:
            match = re.match(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", name)
            if match is not None:
                break
    return int(match.group("idx")) if match else None


def type_name(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def is_instance(module: nn.Module, types: Iterable[str]) -> bool:
    """Whether `module`'s class, or a base class, is named by one of `types` (qualified or short names)."""
    names = {n for c in type(module).__mro__ for n in (type_name(c), c.__qualname__)}
    return any(t in names for t in types)


def is_conv1d(module: nn.Module) -> bool:
    """transformers' Conv1D (GPT-2): y = x @ W + b with W (d_in, d_out), recognised without importing transformers."""
    weight = getattr(module, "weight", None)
    return (type(module).__name__ == "Conv1D" and isinstance(getattr(module, "nf", None), int)
            and getattr(weight, "dim", lambda: 0)() == 2 and weight.shape[1] == module.nf)


def is_fused_attention(module: nn.Module) -> bool:
    """nn.MultiheadAttention or a module with its parameter layout (open_clip's Attention)."""
    return isinstance(module, nn.MultiheadAttention) or (
        hasattr(module, "in_proj_weight") and isinstance(getattr(module, "out_proj", None), nn.Linear))


def match_kind(module: nn.Module, fused: bool) -> str | None:
    """The layer kind (inject.LAYER_CLASSES) of a matched module, or None when blocklora has no layer for it."""
    if fused:
        return "fused_qkv" if isinstance(module, nn.Linear) else None
    if is_fused_attention(module):
        return "fused_mha"
    if isinstance(module, nn.Linear):
        return "linear"
    if isinstance(module, nn.Conv2d):
        return "conv1x1"  # BlockLoRAConv1x1.problem refuses other kernels by name
    if is_conv1d(module):
        return "conv1d"
    return None


SUPPORTED = ("nn.Linear, a 1x1 nn.Conv2d, transformers' Conv1D, nn.MultiheadAttention or a fused qkv nn.Linear "
             "(named in fused=)")


def match(model: nn.Module, cfg: Any) -> list[Target]:
    """The targets of an AdapterConfig that names its modules (cfg.by_name), in module order.

    Raises ConfigError when nothing matches (with examples of the model's module names), for a matched module of a
    type blocklora cannot adapt (naming module and type), for a Linear that its nn.MultiheadAttention never calls
    (out_proj: target the attention itself), for nested targets and for `fused` names matching no target.
    """
    modules = dict(model.named_modules(remove_duplicate=False))  # a module under two names: plan() refuses it
    fused = dict(cfg.fused)
    found: list[tuple[str, nn.Module, int]] = []
    unindexed: list[str] = []  # matched by name and type, but without a block index to select by
    for name, module in modules.items():
        if not name:
            continue  # the model itself cannot be replaced in place
        if cfg.target_modules is not None and not name_matches(name, cfg.target_modules):
            continue
        if cfg.target_types is not None and not is_instance(module, cfg.target_types):
            continue
        index = layer_index(name, cfg.layers_pattern) if cfg.layers != "all" else None
        if cfg.layers != "all" and index is None:
            unindexed.append(name)
            continue  # PEFT: a module without a block index is not selected when layers are
        found.append((name, module, index if index is not None else 0))
    if cfg.layers != "all" and found:
        # a named range (CLIP-LoRA's "up", "top3", ...) and negative indices count the blocks the names reach;
        # other indices select as in PEFT (one that no name carries selects nothing)
        depth = 1 + max(i for _, _, i in found)
        keep = set(resolve_layers(cfg.layers, depth)) if isinstance(cfg.layers, str) else \
            {i + depth if i < 0 else i for i in cfg.layers}
        indices, example = sorted({i for _, _, i in found}), found[0][0]
        found = [f for f in found if f[2] in keep]
        if not found:
            raise ConfigError(f"layers={cfg.layers!r} selects none of the block indices of the modules matched "
                              f"(e.g. {example}): they have {', '.join(map(str, indices))}")
    if not found and unindexed:
        pattern = f"layers_pattern {cfg.layers_pattern!r}" if cfg.layers_pattern else "PEFT's default rule (a " \
            "number after a name that follows another name, as in encoder.layer.3.)"
        raise ConfigError(f"layers={cfg.layers!r}: the modules matched (e.g. {unindexed[0]}) have no block index "
                          f"by {pattern}: name the segment before the index with layers_pattern (e.g. 'blocks', "
                          "'layers')")
    if not found:
        raise ConfigError(f"{describe_by_name(cfg)} matched no module of this {type(model).__name__}: its "
                          f"{_examples(modules)}")
    chosen = {name for name, _, _ in found}
    nested = next(((".".join(a), n) for n in sorted(chosen) for i in range(1, n.count(".") + 1)
                   if ".".join(a := n.split(".")[:i]) in chosen), None)
    if nested:
        raise ConfigError(f"{nested[1]} lies inside {nested[0]}, which would be adapted as a whole: narrow "
                          "target_modules / target_types so that only one of them matches")
    targets: list[Target] = []
    for name, module, index in found:
        parent = name.rpartition(".")[0]
        if parent in modules and is_fused_attention(modules[parent]) and isinstance(module, nn.Linear):
            raise ConfigError(f"cannot adapt {name}: {type(modules[parent]).__name__} {parent} reads its weight "
                              "without calling it; target the attention itself (projection o adapts out_proj)")
        is_fused = name_matches(name, list(fused))
        kind = match_kind(module, is_fused)
        if kind is None:
            why = (f"fused q/k/v row blocks need an nn.Linear (weight (3H, E)), it is a {type(module).__name__}"
                   + ("; adapt it as one matrix (drop it from fused=)" if is_conv1d(module) else "")
                   if is_fused else f"it is a {type_name(type(module))}; blocklora adapts {SUPPORTED}")
            raise ConfigError(f"cannot adapt {name}: {why}")
        projections: tuple[str, ...] = ()
        if kind == "fused_qkv":
            rows = next(v for k, v in fused.items() if name_matches(name, [k]))
            projections = tuple(p for p in rows if p in cfg.projections)
            if not projections:
                raise ConfigError(f"cannot adapt {name}: none of its row blocks {','.join(rows)} is among the "
                                  f"projections {','.join(cfg.projections)}")
        elif kind == "fused_mha":
            projections = cfg.projections
        targets.append(Target(name, kind, projections, MATCHED_TOWER, index))
    paths = [t.path for t in targets]
    unused = [k for k in fused if not any(name_matches(p, [k]) for p in paths)]
    if unused:
        raise ConfigError(f"fused names {unused[0]!r}, which matches none of the targeted modules "
                          f"({', '.join(paths[:3])}{', ...' if len(paths) > 3 else ''}): add it to target_modules")
    return targets


def describe_by_name(cfg: Any) -> str:
    """The targeting-by-name fields of cfg, for messages: "target_modules=[...] with layers=(0,)"."""
    parts = []
    if cfg.target_modules is not None:
        parts.append(f"target_modules={cfg.target_modules!r}")
    if cfg.target_types is not None:
        parts.append(f"target_types={list(cfg.target_types)!r}")
    if cfg.layers != "all":
        parts.append(f"layers={cfg.layers!r}" + (f" (layers_pattern={cfg.layers_pattern!r})"
                                                  if cfg.layers_pattern else ""))
    return " with ".join(parts)


def _examples(modules: Mapping[str, nn.Module]) -> str:
    """A few names of the model's adaptable modules, for the message of a pattern that matched nothing."""
    names = [n for n, m in modules.items() if n and match_kind(m, False) is not None][:4]
    if not names:
        return "modules include no nn.Linear, Conv2d, Conv1D or MultiheadAttention"
    return f"adaptable modules are named like {', '.join(names)}"
