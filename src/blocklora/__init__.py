"""blocklora: Block-LoRA and LoRA fine-tuning of CLIP-style models for few-shot image classification.

The public names below are loaded on first use (PEP 562), together with blocklora.backbones, which registers where
adapters go in each supported model family. So `blocklora.inject(model)` works on open_clip, transformers and
effnet-minilm models, while `import blocklora.adapters...` alone loads the method library and no model family.
`import blocklora` and the command line start without loading torch, so Ctrl-C during start-up reaches the
CLI's handler instead of interrupting an import.
"""

from __future__ import annotations

import importlib
from typing import Any

from ._version import __version__ as __version__

_EXPORTS = {
    "AdapterConfig": ".adapters.config",
    "adapter_config": ".adapters.inject", "adapter_layers": ".adapters.inject",
    "adapter_state_dict": ".adapters.inject", "adapters_disabled": ".adapters.inject",
    "count_trainable": ".adapters.inject", "inject": ".adapters.inject", "merge": ".adapters.inject",
    "merged_state_dict": ".adapters.inject", "plan": ".adapters.inject", "unmerge": ".adapters.inject",
    "read_adapter_meta": ".adapters.io",
    "BlockLoRALinear": ".adapters.layers", "BlockLoRAConv1x1": ".adapters.layers",
    "BlockLoRAFusedQKV": ".adapters.fused", "BlockLoRAMultiheadAttention": ".adapters.fused",
    "Placement": ".adapters.sites", "Site": ".adapters.sites", "register_finder": ".adapters.sites",
    "fingerprint": ".backbones.fingerprint", "load_adapter": ".backbones.fingerprint",
    "save_adapter": ".backbones.fingerprint",
    "AdapterMismatchError": ".errors", "BlockLoRAError": ".errors", "ConfigError": ".errors", "DataError": ".errors",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'blocklora' has no attribute {name!r}")
    importlib.import_module(".backbones", __name__)  # fills the placement registry of the model families
    value = getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
