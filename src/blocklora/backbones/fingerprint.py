"""The identity of a model's frozen weights, and the adapter save / load that record and check it.

adapters/io.py stores whatever identity it is given and compares what it is asked to: this module is where the
identity is computed (a hash of the weights), so that an adapter trained on one checkpoint is refused on another.
`save_adapter` / `load_adapter` here are the ones blocklora exports.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..adapters import io
from ..adapters.config import AdapterConfig
from ..adapters.inject import is_adapter_param, is_merged
from ..errors import BlockLoRAError


def fingerprint(model: nn.Module) -> str:
    """A short hash (16 hex digits) of the frozen weights: names, shapes, and a strided sample of values in fp16.

    Cheap (at most 2,048 values per tensor), the same for fp32 and fp16 storage, different for different
    checkpoints of one architecture; adapter tensors are left out, so an injected model hashes like the stock one.
    Raises BlockLoRAError on merged adapters (the weights then carry the update).
    """
    if is_merged(model):
        raise BlockLoRAError("the adapters are merged into the weights: unmerge before fingerprinting the model")
    h = hashlib.sha256()
    for name, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
        if is_adapter_param(name):
            continue
        flat = p.detach().reshape(-1)
        step = max(1, flat.numel() // 2048)
        sample = flat[::step][:2048].to("cpu", torch.float16)
        h.update(f"{name}:{tuple(p.shape)}:".encode())
        h.update(sample.numpy().tobytes())
    return h.hexdigest()[:16]


def save_adapter(model: nn.Module, directory: str | os.PathLike, backbone: str | None = None,
                 extra: dict[str, Any] | None = None, overwrite: bool = False,
                 identity: dict[str, Any] | None = None) -> Path:
    """adapters.io.save_adapter recording the weights' fingerprint (and `backbone`, the model's name).

    `identity` adds keys a reload must match (e.g. the MLP activation). Atomic: a complete directory or nothing.
    """
    ident = {"name": backbone, "fingerprint": fingerprint(model), **(identity or {})}
    return io.save_adapter(model, directory, backbone=ident, extra=extra, overwrite=overwrite)


def load_adapter(model: nn.Module, directory: str | os.PathLike, force: bool = False,
                 identity: dict[str, Any] | None = None) -> AdapterConfig:
    """adapters.io.load_adapter refusing (unless force) an adapter trained on other frozen weights than `model`'s.

    Raises AdapterMismatchError naming the mismatch; `model` is left unchanged then.
    """
    expect = None if force else {"fingerprint": fingerprint(model), **(identity or {})}
    return io.load_adapter(model, directory, expect=expect, force=force)
