"""Adapter files: a directory with blocklora_adapter.json (config, backbone, fingerprint) and
blocklora_adapter.safetensors (tensors keyed by their real module names).

Our own file names on purpose: PEFT would read an adapter_config.json, drop the keys it does not know and load a
Block-LoRA adapter as plain LoRA without a word. Only safetensors and JSON are ever read: no pickle.

The directory also holds blocklora's ownership marker (ownership.py): save_adapter(overwrite=True) replaces only an
adapter directory blocklora made, holding nothing but these files. Non-finite tensors are never saved or loaded.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from ..backbones.activation import mlp_activation
from ..errors import AdapterMismatchError, BlockLoRAError, ConfigError
from ..ownership import (
    MARKER,
    TEMP_SUFFIX,
    check_deletable,
    fix_modes,
    mark,
    marker_kind,
    protected,
    remove_stale_temps,
    temp_prefix,
)
from .config import AdapterConfig
from .inject import adapter_config, adapter_state_dict, inject, is_adapter_param, is_merged, plan

CONFIG_FILE = "blocklora_adapter.json"
WEIGHTS_FILE = "blocklora_adapter.safetensors"
FORMAT = "blocklora-adapter"
FORMAT_VERSION = 1
KIND = "adapter"  # the ownership marker's kind
# save_adapter's own metadata: `extra` may add keys, never replace these
RESERVED = ("format", "format_version", "blocklora_version", "config", "backbone", "tensors", "trainable_params")


def fingerprint(model: nn.Module) -> str:
    """A short hash of the frozen weights (names, shapes, and a strided sample of values rounded to fp16).

    Cheap (a few thousand values per tensor), independent of fp32/fp16 storage, and different for different
    checkpoints of one architecture. Computed on unmerged weights only.
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


def _version() -> str:
    from .. import __version__

    return __version__


def save_adapter(model: nn.Module, directory: str | os.PathLike, backbone: str | None = None,
                 extra: dict[str, Any] | None = None, overwrite: bool = False,
                 weights_fingerprint: str | None = None) -> Path:
    """Write the adapter of an injected model. Atomic: a complete directory or nothing.

    `extra` adds JSON keys (not those in RESERVED). With overwrite=True an existing directory is replaced only if
    blocklora made it as an adapter directory and it holds nothing else. `weights_fingerprint`: the frozen weights'
    fingerprint as loaded, when the model now holds them in another dtype (Backbone.cast_frozen to bf16 rounds
    differently from the fingerprint's fp16 sample). Raises BlockLoRAError (non-finite tensors, a directory that may
    not be replaced) and ConfigError (extra)."""
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
        "blocklora_version": _version(),
        "config": cfg.to_dict(),
        # The activation is part of the weights' identity that the fingerprint cannot see (same tensors).
        "backbone": {"name": backbone, "fingerprint": weights_fingerprint or fingerprint(model),
                     "class": type(model).__name__,
                     "activation": mlp_activation(model)},
        "tensors": {k: list(v.shape) for k, v in sorted(tensors.items())},
        "trainable_params": sum(v.numel() for v in tensors.values()),
        **(extra or {}),
    }
    try:
        text = json.dumps(meta, indent=2, allow_nan=False) + "\n"
    except (TypeError, ValueError) as e:
        raise ConfigError(f"save_adapter(extra=...) must hold finite JSON values: {e}") from None
    directory.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(directory.parent)  # leftovers of killed writes here (their process is gone)
    tmp = Path(tempfile.mkdtemp(prefix=temp_prefix(directory.name), suffix=TEMP_SUFFIX, dir=directory.parent))
    try:
        try:
            save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": FORMAT})
        except SafetensorError as e:  # e.g. a full disk: report it as the OS error it is
            raise OSError(f"cannot write {directory / WEIGHTS_FILE}: {e}") from None
        (tmp / CONFIG_FILE).write_text(text)
        mark(tmp, KIND)
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        fix_modes(tmp)  # mkdtemp makes a private folder; the user's umask decides
        if directory.exists():
            shutil.rmtree(directory)
        os.replace(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory


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
    bad = [k for k, v in tensors.items() if not v.is_floating_point() or not bool(torch.isfinite(v).all())]
    if bad:
        raise AdapterMismatchError(f"{what}: {bad[0]} holds NaN or infinite values ({len(bad)} of {len(tensors)} "
                                   f"tensors): {hint}")


def read_adapter_meta(directory: str | os.PathLike) -> dict[str, Any]:
    """The JSON half of an adapter directory, checked for format, types and a valid adapter config.

    Raises AdapterMismatchError naming the file for anything missing, damaged or of the wrong type."""
    path = Path(directory) / CONFIG_FILE
    if not path.is_file():
        hint = " (a PEFT adapter? blocklora reads only its own format)" if (Path(directory) /
                                                                          "adapter_config.json").exists() else ""
        raise AdapterMismatchError(f"no adapter at {directory}: {path.name} is missing{hint}")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:  # ValueError: bad JSON or bytes that are not UTF-8
        reason = str(e).splitlines()[0][:120] if str(e) else type(e).__name__
        raise AdapterMismatchError(f"cannot read {path}: {reason}; the adapter directory is damaged") from None
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


def load_adapter(model: nn.Module, directory: str | os.PathLike, force: bool = False) -> AdapterConfig:
    """Inject the saved adapter into a fresh `model` (or fill an already-injected one with the same layout).

    Refuses, naming the mismatch and changing nothing, an adapter whose modules, shapes or config do not fit,
    or (unless force=True) one trained on other frozen weights than `model`'s or with another MLP activation.
    """
    directory = Path(directory)
    if is_merged(model):  # copying into merged weights would leave the old update in them for good
        raise AdapterMismatchError("the model's adapters are merged into its weights: unmerge(model) before loading "
                                   "another adapter into it")
    meta = read_adapter_meta(directory)
    cfg = AdapterConfig.from_dict(meta["config"])
    try:
        tensors = load_file(str(directory / WEIGHTS_FILE))
    except Exception as e:  # noqa: BLE001 - SafetensorError, OSError, ...: a damaged or missing file
        reason = str(e).splitlines()[0][:160] if str(e) else type(e).__name__
        raise AdapterMismatchError(f"cannot read {directory / WEIGHTS_FILE}: {reason}; the adapter directory is "
                                   "damaged") from None
    _check_finite(tensors, f"adapter {directory}", "the adapter is damaged or was saved from a diverged run")
    existing = adapter_config(model)
    if existing is not None and existing != cfg:
        raise AdapterMismatchError(f"the model already carries an adapter with another config ({existing}); "
                                   "load into a fresh model")
    if not force:
        saved, ours = meta["backbone"].get("fingerprint"), fingerprint(model)
        retired = getattr(model, "retired_fingerprints", {}).get(saved)
        if retired:  # a model family that changed under the same name says what the adapter was trained on
            raise AdapterMismatchError(f"{directory} was trained on {retired}; it does not apply to this model "
                                       f"(fingerprint {ours}): train the adapter again")
        if saved and saved != ours:
            raise AdapterMismatchError(
                f"{directory} was trained on other frozen weights (fingerprint {saved}, this model {ours}; backbone "
                f"{meta['backbone'].get('name')!r}): load the same checkpoint, or force to load anyway")
        saved, ours = meta.get("backbone", {}).get("activation"), mlp_activation(model)
        if saved and saved != ours:
            raise AdapterMismatchError(
                f"{directory} was trained on a model computing {saved} in its MLPs, this model computes {ours}: build "
                f"it with the same activation (--quick-gelu {'yes' if saved == 'quick_gelu' else 'no'}), or force "
                "to load anyway")
    if existing is None:
        try:
            plan(model, cfg)
        except BlockLoRAError as e:
            raise AdapterMismatchError(f"adapter {directory} does not fit this model: {e}") from None
        _check_tensors(_expected_shapes(model, cfg), tensors, directory)
        inject(model, cfg)
    else:
        _check_tensors({k: tuple(v.shape) for k, v in adapter_state_dict(model).items()}, tensors, directory)
    with torch.no_grad():
        for name, value in tensors.items():
            model.get_parameter(name).copy_(value)
    return cfg


def _expected_shapes(model: nn.Module, cfg: AdapterConfig) -> dict[str, tuple[int, ...]]:
    """The adapter tensor names and shapes inject(model, cfg) would create, computed without changing `model`."""
    shapes: dict[str, tuple[int, ...]] = {}
    for t in plan(model, cfg):
        module = model.get_submodule(t.path)
        if t.kind == "fused":
            e = module.in_proj_weight.shape[1]
            for letter in t.letters:
                shapes[f"{t.path}.lora_A.{letter}"] = (cfg.r, e // cfg.n_blocks)
                shapes[f"{t.path}.lora_B.{letter}"] = (e, cfg.r)
        else:  # a Linear, or a 1x1 convolution (channels in the role of features)
            d_in, d_out = (module.in_channels, module.out_channels) if t.kind == "conv1x1" else \
                (module.in_features, module.out_features)
            shapes[f"{t.path}.lora_A"] = (cfg.r, d_in // cfg.n_blocks)
            shapes[f"{t.path}.lora_B"] = (d_out, cfg.r)
    return shapes


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
