"""blocklora: Block-LoRA and LoRA fine-tuning of CLIP-style models for few-shot image classification.

The public names below are imported on first use (PEP 562): `import blocklora` and the command line start without
loading torch, so Ctrl-C during start-up reaches the CLI's handler instead of interrupting an import.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_HOMES = {
    "AdapterConfig": "adapters.config",
    **dict.fromkeys(("adapter_config", "adapter_layers", "adapter_state_dict", "adapters_disabled", "count_trainable",
                     "inject", "merge", "merged_state_dict", "plan", "unmerge"), "adapters.inject"),
    **dict.fromkeys(("fingerprint", "load_adapter", "read_adapter_meta", "save_adapter"), "adapters.io"),
    **dict.fromkeys(("BlockLoRALinear", "BlockLoRAMultiheadAttention"), "adapters.layers"),
    **dict.fromkeys(("AdapterMismatchError", "BlockLoRAError", "ConfigError", "DataError"), "errors"),
}

__all__ = sorted(_HOMES)


def __getattr__(name: str) -> Any:
    if name in _HOMES:
        value = getattr(importlib.import_module(f".{_HOMES[name]}", __name__), name)
        globals()[name] = value  # later look-ups skip this function
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
