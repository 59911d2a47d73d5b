"""Adapter files: a directory with blocklora_adapter.json (config, backbone identity) and
blocklora_adapter.safetensors (tensors keyed by their real module names).

Our own file names on purpose: PEFT would read an adapter_config.json, drop the keys it does not know and load a
Block-LoRA adapter as plain LoRA without a word. Only safetensors and JSON are ever read: no pickle.

What identifies the frozen weights (a fingerprint, the MLP activation, ...) is the caller's to give and to check:
the backbones side computes it (blocklora.backbones.fingerprint), passes it in `backbone` when saving and compares
it before loading, so this module knows no model family.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from .._version import __version__
from ..errors import AdapterMismatchError, BlockLoRAError
from .config import AdapterConfig
from .inject import adapter_config, adapter_state_dict, expected_shapes, inject
from .sites import Placement

CONFIG_FILE = "blocklora_adapter.json"
WEIGHTS_FILE = "blocklora_adapter.safetensors"
FORMAT = "blocklora-adapter"
FORMAT_VERSION = 1


def save_adapter(model: nn.Module, directory: str | os.PathLike, backbone: Mapping[str, Any] | None = None,
                 extra: dict[str, Any] | None = None, overwrite: bool = False) -> Path:
    """Write the adapter of an injected model. Atomic: a complete directory or nothing.

    `backbone`: what identifies the frozen weights (name, fingerprint, class, ...), stored under "backbone" and
    compared by load_adapter's `expect`. Raises BlockLoRAError when the model has no adapter or `directory`
    exists (unless overwrite), OSError when the disk refuses.
    """
    cfg = adapter_config(model)
    if cfg is None:
        raise BlockLoRAError("this model carries no blocklora adapter: inject() or load_adapter() first")
    directory = Path(directory)
    if directory.exists() and not overwrite:
        raise BlockLoRAError(f"{directory} already exists: choose another path or pass overwrite")
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in adapter_state_dict(model).items()}
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "blocklora_version": __version__,
        "config": cfg.to_dict(),
        "backbone": {"class": type(model).__name__, **(backbone or {})},
        "tensors": {k: list(v.shape) for k, v in sorted(tensors.items())},
        "trainable_params": sum(v.numel() for v in tensors.values()),
        **(extra or {}),
    }
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    try:
        try:
            save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": FORMAT})
        except SafetensorError as e:  # e.g. a full disk: report it as the OS error it is
            raise OSError(f"cannot write {directory / WEIGHTS_FILE}: {e}") from None
        (tmp / CONFIG_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        if directory.exists():
            shutil.rmtree(directory)
        os.replace(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory


def read_adapter_meta(directory: str | os.PathLike) -> dict[str, Any]:
    """The JSON half of an adapter directory, checked for format."""
    path = Path(directory) / CONFIG_FILE
    if not path.is_file():
        hint = " (a PEFT adapter? blocklora reads only its own format)" if (Path(directory) /
                                                                          "adapter_config.json").exists() else ""
        raise AdapterMismatchError(f"no adapter at {directory}: {path.name} is missing{hint}")
    try:
        meta = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise AdapterMismatchError(f"cannot read {path}: {e}; the adapter directory is damaged") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise AdapterMismatchError(f"{path} is not a blocklora adapter file")
    if meta.get("format_version", 0) > FORMAT_VERSION:
        raise AdapterMismatchError(f"{path} was written by a newer blocklora ({meta.get('blocklora_version')}): "
                                   "upgrade blocklora to read it")
    return meta


def load_adapter(model: nn.Module, directory: str | os.PathLike, placement: Placement | None = None
                 ) -> AdapterConfig:
    """Inject the saved adapter into a fresh `model` (or fill an already-injected one with the same layout).

    Raises AdapterMismatchError, naming the mismatch and changing nothing, for an adapter whose modules, shapes or
    config do not fit. `placement` as for inject(). Whether the frozen weights are the ones it was trained on is
    the backbones side's check (backbones.fingerprint.load_adapter, which blocklora exports).
    """
    directory = Path(directory)
    meta = read_adapter_meta(directory)
    cfg = AdapterConfig.from_dict(meta["config"])
    try:
        tensors = load_file(str(directory / WEIGHTS_FILE))
    except (OSError, SafetensorError) as e:
        raise AdapterMismatchError(f"cannot read {directory / WEIGHTS_FILE}: {e}") from None
    existing = adapter_config(model)
    if existing is not None and existing != cfg:
        raise AdapterMismatchError(f"the model already carries an adapter with another config ({existing}); "
                                   "load into a fresh model")
    if existing is None:
        try:
            shapes = expected_shapes(model, cfg, placement)
        except BlockLoRAError as e:
            raise AdapterMismatchError(f"adapter {directory} does not fit this model: {e}") from None
        _check_tensors(shapes, tensors, directory)
        inject(model, cfg, placement)
    else:
        _check_tensors({k: tuple(v.shape) for k, v in adapter_state_dict(model).items()}, tensors, directory)
    with torch.no_grad():
        for name, value in tensors.items():
            model.get_parameter(name).copy_(value)
    return cfg


def _check_tensors(expected: dict[str, tuple[int, ...]], tensors: dict[str, torch.Tensor], where: Path) -> None:
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        first = (f"missing {missing[0]}" if missing else f"unexpected {unexpected[0]}")
        raise AdapterMismatchError(
            f"adapter {where} does not fit this model: {first} ({len(missing)} missing, {len(unexpected)} "
            "unexpected tensors); was it trained on another architecture?")
    for name, shape in expected.items():
        if tuple(tensors[name].shape) != tuple(shape):
            raise AdapterMismatchError(f"adapter {where} does not fit this model: {name} has shape "
                                       f"{tuple(tensors[name].shape)}, the model needs {tuple(shape)}")
