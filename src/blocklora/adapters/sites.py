"""The former home of the family targetings (Placement, Site, register_finder, find_placement): now targeting.py.

Kept so that scripts importing `blocklora.adapters.sites` still run; the names are the very objects of targeting.py.
"""

from __future__ import annotations

from .targeting import (
    FUSED_MHA,
    LAYERS,
    LINEARS,
    Finder,
    Placement,
    Site,
    find_placement,
    register_finder,
)

__all__ = ["FUSED_MHA", "LAYERS", "LINEARS", "Finder", "Placement", "Site", "find_placement", "register_finder"]
