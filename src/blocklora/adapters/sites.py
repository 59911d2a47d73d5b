"""Where adapters go: the sites of a model, handed to inject() by the model families (or by the caller).

The method library knows no model family. Each family (blocklora.backbones.*) registers a finder that reads its
own module names and returns a Placement: per tower, one Site per block (bottom to top). inject(), plan() and
load_adapter() ask `find_placement(model)`, which tries the registered finders in turn; a caller with a model of
its own passes a Placement to inject() directly.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from torch import nn

from ..errors import ConfigError

# Site kinds: how the module at Site.path is adapted (the layer classes are in layers.py / fused.py).
FUSED_MHA = "fused_mha"  # the module has nn.MultiheadAttention's fused layout (in_proj_weight (3E, E) + out_proj)
LINEARS = "linears"  # one child module per projection (q, k, v: nn.Linear; a fused qkv nn.Linear; o: nn.Linear)
LAYERS = "layers"  # a block without attention (a CNN's): named children (nn.Linear or 1x1 conv) per projection


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
class Placement:
    """A model's sites per tower (`sites[tower]`, bottom to top) and, for messages, what each tower is.

    `towers` maps every tower the family knows to a short description of the module found there (its class), so
    that a tower without sites can be refused by name ("a TimmModel around a ConvNeXt has no attention").
    """

    family: str
    sites: Mapping[str, tuple[Site, ...]]
    towers: Mapping[str, str] = field(default_factory=dict)

    def describe(self, tower: str) -> str:
        return self.towers.get(tower, "nothing")


Finder = Callable[[nn.Module], "Placement | None"]
_FINDERS: dict[str, Finder] = {}


def register_finder(family: str, finder: Finder) -> None:
    """Let inject() place adapters on the models `finder` recognises (it returns None for any other model)."""
    _FINDERS[family] = finder


def find_placement(model: nn.Module) -> Placement:
    """The placement of the first registered family that recognises `model`; a clear error otherwise."""
    for finder in _FINDERS.values():
        placement = finder(model)
        if placement is not None:
            return placement
    known = ", ".join(_FINDERS) or "none registered (import blocklora.backbones, or pass a Placement to inject)"
    raise ConfigError(f"blocklora does not know where attention lives in a {type(model).__name__}: known families "
                      f"are {known}")
