"""Adapter files: a directory with blocklora_adapter.json (config, backbone identity) and
blocklora_adapter.safetensors (tensors keyed by their real module names).

Our own file names on purpose: PEFT would read an adapter_config.json, drop the keys it does not know and load a
Block-LoRA adapter as plain LoRA without a word. Only safetensors and JSON are ever read: no pickle.

What identifies the frozen weights (a fingerprint, the MLP activation, ...) is the caller's to give and to check:
the backbones side computes it (blocklora.backbones.fingerprint), passes it in `backbone` when saving and compares
it before loading, so this module knows no model family.

The directory also holds blocklora's ownership marker (ownership.py): save_adapter(overwrite=True) replaces only an
adapter directory blocklora made, holding nothing but these files. Non-finite tensors are never saved or loaded.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load, save_file
from torch import nn

from .._version import __version__
from ..errors import AdapterMismatchError, BlockLoRAError, ConfigError
from ..ownership import MARKER, atomic_folder, check_deletable, marker_kind, protected, reported_write
from ..reading import loads, read_bytes, read_text, reason
from .config import BY_NAME, AdapterConfig
from .inject import adapter_config, adapter_state_dict, expected_shapes, inject, is_merged, unwrap
from .targeting import Targeting, describe_by_name

CONFIG_FILE = "blocklora_adapter.json"
WEIGHTS_FILE = "blocklora_adapter.safetensors"
FORMAT = "blocklora-adapter"
FORMAT_VERSION = 1
KIND = "adapter"  # the ownership marker's kind
# save_adapter's own metadata: `extra` may add keys, never replace these
RESERVED = ("format", "format_version", "blocklora_version", "config", "backbone", "tensors", "trainable_params")


def save_adapter(model: nn.Module, directory: str | os.PathLike, backbone: Mapping[str, Any] | None = None,
                 extra: dict[str, Any] | None = None, overwrite: bool = False) -> Path:
    """Write the adapter of an injected model. Atomic: a complete directory or nothing.

    `backbone`: what identifies the frozen weights (name, fingerprint, class, ...), stored under "backbone" and
    compared by the backbones side (backbones.fingerprint.load_adapter). `extra` adds JSON keys (not those in
    RESERVED). With overwrite=True an existing directory is replaced only if blocklora made it as an adapter
    directory and it holds nothing else. Raises BlockLoRAError (no adapter, non-finite tensors, a directory that may
    not be replaced), ConfigError (extra) and OSError when the disk refuses.
    """
    model = unwrap(model)
    cfg = adapter_config(model)
    if cfg is None:
        raise BlockLoRAError("this model carries no blocklora adapter: inject() or load_adapter() first")
    clash = sorted(set(extra or {}) & set(RESERVED))
    if clash:
        raise ConfigError(f"save_adapter(extra=...) may not set {clash[0]!r}: blocklora writes the adapter's own "
                          f"{', '.join(RESERVED)}; use another key")
    directory = Path(directory)
    if directory.exists() or directory.is_symlink():
        if not overwrite:
            raise BlockLoRAError(f"{directory} already exists: choose another path or pass overwrite")
        _check_replaceable(directory)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in adapter_state_dict(model).items()}
    _check_finite(tensors, "refusing to save the adapter", "training diverged: lower the learning rate")
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
    try:
        text = json.dumps(meta, indent=2, allow_nan=False) + "\n"
    except (TypeError, ValueError) as e:
        raise ConfigError(f"save_adapter(extra=...) must hold finite JSON values: {e}") from None
    with atomic_folder(directory, KIND) as tmp:
        with reported_write(directory / WEIGHTS_FILE):  # e.g. a full disk: the OS error it is
            save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": FORMAT, **_targeting_record(cfg)})
        (tmp / CONFIG_FILE).write_text(text)
    return directory


def _targeting_record(cfg: AdapterConfig) -> dict[str, str]:
    """An adapter placed by name keeps its targeting in the safetensors header too (the file alone says where its
    tensors go); family targetings are found again from the model and add nothing."""
    if not cfg.by_name:
        return {}
    fields = {k: v for k, v in cfg.to_dict().items() if k in BY_NAME or k in ("layers", "projections")}
    return {"targeting": json.dumps(fields, sort_keys=True)}


def _check_replaceable(directory: Path) -> None:
    """Refuse, on one line, to replace anything but an adapter directory blocklora wrote and nothing else."""
    check_deletable(directory, protected(), "directory")
    if directory.is_symlink() or not directory.is_dir():
        raise BlockLoRAError(f"{directory} is not an adapter directory: refusing to replace it; choose another path")
    if marker_kind(directory) != KIND:
        why = ("was written by an earlier blocklora version, which did not mark its folders"
               if (directory / CONFIG_FILE).is_file() else "is not an adapter directory blocklora made")
        raise BlockLoRAError(f"{directory} {why} (no {MARKER} marker): blocklora replaces only what it made; "
                             "delete it yourself or choose another path")
    foreign = sorted(set(os.listdir(directory)) - {CONFIG_FILE, WEIGHTS_FILE, MARKER})
    if foreign:
        raise BlockLoRAError(f"{directory} holds files blocklora did not write ({', '.join(foreign[:3])}): move "
                             "them away or choose another path")


def _check_finite(tensors: dict[str, torch.Tensor], what: str, hint: str) -> None:
    """Refuse a tensor that is not floating point (a hand-made file of int64 weights), then non-finite values."""
    ints = [k for k, v in tensors.items() if not v.is_floating_point()]
    if ints:
        dtype = str(tensors[ints[0]].dtype).removeprefix("torch.")
        raise AdapterMismatchError(f"{what}: {ints[0]} holds {dtype} values, where blocklora stores floating-point "
                                   f"weights ({len(ints)} of {len(tensors)} tensors): the file is damaged or not "
                                   "blocklora's; save float tensors")
    bad = [k for k, v in tensors.items() if not bool(torch.isfinite(v).all())]
    if bad:
        raise AdapterMismatchError(f"{what}: {bad[0]} holds NaN or infinite values ({len(bad)} of {len(tensors)} "
                                   f"tensors): {hint}")


def read_adapter_meta(directory: str | os.PathLike) -> dict[str, Any]:
    """The JSON half of an adapter directory, checked for format, types and a valid adapter config.

    Raises AdapterMismatchError naming the file for anything missing, damaged or of the wrong type."""
    path = Path(directory) / CONFIG_FILE
    if not os.path.lexists(path):
        hint = " (a PEFT adapter? blocklora reads only its own format)" if (Path(directory) /
                                                                          "adapter_config.json").exists() else ""
        raise AdapterMismatchError(f"no adapter at {directory}: {path.name} is missing{hint}")
    try:
        meta = loads(read_text(path))  # a regular file, UTF-8, nesting bounded (reading.py)
    except (OSError, ValueError) as e:  # ValueError: bad JSON, too deep, or bytes that are not UTF-8
        raise AdapterMismatchError(f"cannot read {path}: {reason(e)}; the adapter directory is damaged") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise AdapterMismatchError(f"{path} is not a blocklora adapter file")
    version = meta.get("format_version", 0)
    if not isinstance(version, int) or isinstance(version, bool) or version < 0:
        raise AdapterMismatchError(f"{path}: format_version {version!r} is not a version number; the file is damaged")
    if version > FORMAT_VERSION:
        raise AdapterMismatchError(f"{path} was written by a newer blocklora ({meta.get('blocklora_version')}): "
                                   "upgrade blocklora to read it")
    for key, kinds in (("config", (dict,)), ("backbone", (dict,)), ("tensors", (dict, type(None)))):
        if not isinstance(meta.get(key), kinds):
            raise AdapterMismatchError(f"{path}: {key!r} is missing or not a JSON object; the file is damaged")
    fp = meta["backbone"].get("fingerprint")
    if fp is not None and not isinstance(fp, str):
        raise AdapterMismatchError(f"{path}: backbone.fingerprint is not a string; the file is damaged")
    try:
        AdapterConfig.from_dict(meta["config"])
    except ConfigError as e:
        raise AdapterMismatchError(f"{path}: bad adapter config ({e}); the file is damaged") from None
    return meta


def load_adapter(model: nn.Module, directory: str | os.PathLike, placement: Targeting | None = None
                 ) -> AdapterConfig:
    """Inject the saved adapter into a fresh `model` (or fill an already-injected one with the same layout).

    Raises AdapterMismatchError, naming the mismatch and changing nothing, for an adapter whose modules, shapes or
    config do not fit, and for an adapter placed by name (target_modules) that was saved from a model of another
    class. `placement` as for inject(). Whether the frozen weights are the ones it was trained on is
    the backbones side's check (backbones.fingerprint.load_adapter, which blocklora exports).
    """
    model = unwrap(model)
    directory = Path(directory)
    if is_merged(model):  # copying into merged weights would leave the old update in them for good
        raise AdapterMismatchError("the model's adapters are merged into its weights: unmerge(model) before loading "
                                   "another adapter into it")
    meta = read_adapter_meta(directory)
    cfg = AdapterConfig.from_dict(meta["config"])
    saved_class = meta["backbone"].get("class")
    if cfg.by_name and saved_class not in (None, type(model).__name__):
        raise AdapterMismatchError(f"adapter {directory} was trained on a {saved_class}, this model is a "
                                   f"{type(model).__name__}: its targeting ({describe_by_name(cfg)}) belongs to "
                                   "another architecture; load it into the model class it was trained on")
    try:
        tensors = load(read_bytes(directory / WEIGHTS_FILE))  # read as a regular file: a FIFO would block
    except Exception as e:  # noqa: BLE001 - SafetensorError, OSError, ...: a damaged or missing file
        reason = str(e).splitlines()[0][:160] if str(e) else type(e).__name__
        raise AdapterMismatchError(f"cannot read {directory / WEIGHTS_FILE}: {reason}; the adapter directory is "
                                   "damaged") from None
    _check_finite(tensors, f"adapter {directory}", "the adapter is damaged or was saved from a diverged run")
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
