"""blocklora: Block-LoRA and LoRA fine-tuning of CLIP-style models for few-shot image classification."""

from __future__ import annotations

__version__ = "0.1.0"

from .adapters.config import AdapterConfig
from .adapters.inject import (
    adapter_config,
    adapter_layers,
    adapter_state_dict,
    adapters_disabled,
    count_trainable,
    inject,
    merge,
    merged_state_dict,
    plan,
    unmerge,
)
from .adapters.io import fingerprint, load_adapter, read_adapter_meta, save_adapter
from .adapters.layers import BlockLoRALinear, BlockLoRAMultiheadAttention
from .errors import AdapterMismatchError, BlockLoRAError, ConfigError, DataError

__all__ = [
    "AdapterConfig", "AdapterMismatchError", "BlockLoRAError", "BlockLoRALinear", "BlockLoRAMultiheadAttention",
    "ConfigError", "DataError", "adapter_config", "adapter_layers", "adapter_state_dict", "adapters_disabled",
    "count_trainable", "fingerprint", "inject", "load_adapter", "merge", "merged_state_dict", "plan",
    "read_adapter_meta", "save_adapter", "unmerge",
]
