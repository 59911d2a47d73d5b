"""The identity of a model's frozen weights, and the adapter save / load that record and check it.

adapters/io.py stores whatever identity it is given: this module computes it (a hash of the weights, the MLP
activation) and checks it on reload, so that an adapter trained on one checkpoint is refused on another.
`save_adapter` / `load_adapter` here are the ones blocklora exports.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..adapters import io
from ..adapters.config import AdapterConfig
from ..adapters.inject import is_adapter_param, is_merged, unwrap
from ..errors import AdapterMismatchError, BlockLoRAError, ConfigError
from .activation import mlp_activation


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


def identity(model: nn.Module, weights_fingerprint: str | None = None) -> dict[str, Any]:
    """What an adapter records about the frozen weights it was trained on, and what a reload must match.

    fingerprint: of the weights as loaded (`weights_fingerprint` when the model now holds them in another dtype,
    Backbone.cast_frozen); activation: the MLP activation the modules compute, which the fingerprint cannot see
    (the same tensors under QuickGELU or GELU compute other features).
    """
    model = unwrap(model)
    return {"fingerprint": weights_fingerprint or fingerprint(model), "activation": mlp_activation(model)}


def save_adapter(model: nn.Module, directory: str | os.PathLike, backbone: str | None = None,
                 extra: dict[str, Any] | None = None, overwrite: bool = False,
                 weights_fingerprint: str | None = None, *, classnames: Sequence[str] | None = None,
                 template: str = "a photo of a {}.", logit_scale: float = 100.0,
                 pretrained: str | None = "auto") -> Path:
    """adapters.io.save_adapter recording the backbone's name and identity(); atomic: a complete directory or nothing.

    With `classnames` it also records what `blocklora predict / eval / export` need (the "run" record `blocklora
    train` writes): the --model string `backbone`, the weights `pretrained` ("auto": the model's default; a path is
    stored absolute), the class names, the prompt `template` (with one {}) and the cosine-to-logit `logit_scale`.
    Raises ConfigError when that record is asked for without `backbone` or with a bad value.
    """
    record = {"name": backbone, **identity(model, weights_fingerprint)}
    if classnames is not None:
        extra = {**(extra or {}), "run": _run_record(backbone, pretrained, classnames, template, logit_scale)}
    return io.save_adapter(model, directory, backbone=record, extra=extra, overwrite=overwrite)


def _run_record(backbone: str | None, pretrained: str | None, classnames: Sequence[str], template: str,
                logit_scale: float) -> dict[str, Any]:
    from .. import checks

    if not backbone:
        raise ConfigError("save_adapter(classnames=...) needs backbone=, the model as --model names it (e.g. "
                          "'ViT-B-16', 'tiny-clip', 'hf:/path'), so that the CLI can rebuild it")
    names = list(classnames) if not isinstance(classnames, str) else []
    if len(names) < 2 or not all(isinstance(n, str) and n for n in names):
        raise ConfigError(f"classnames must be a list of at least 2 class names, got {classnames!r}")
    checks.template("template", template)
    scale = float(checks.number("logit_scale", logit_scale, checks.Range(0, 1e4, lo_open=True)))
    if isinstance(pretrained, str) and os.path.exists(pretrained):
        pretrained = os.path.abspath(pretrained)  # the record holds from any working directory
    return {"model": backbone, "pretrained": pretrained, "classnames": names, "template": template,
            "logit_scale": scale, "loss": "softmax"}


def load_adapter(model: nn.Module, directory: str | os.PathLike, force: bool = False) -> AdapterConfig:
    """adapters.io.load_adapter refusing (unless force) an adapter trained on other frozen weights than `model`'s
    (a model class may name `retired_fingerprints` of its earlier versions, to say what such an adapter was for) or
    with another MLP activation. Raises AdapterMismatchError naming the mismatch; `model` is left unchanged."""
    check_identity(model, directory, force)
    return io.load_adapter(model, directory)


def check_identity(model: nn.Module, directory: str | os.PathLike, force: bool = False) -> None:
    """Refuse (unless force) an adapter folder recording other frozen weights or another MLP activation than
    `model`'s (load_adapter's check; the baselines of methods/ use it too). Raises AdapterMismatchError."""
    if not force:
        saved = io.read_adapter_meta(directory).get("backbone") or {}
        ours = identity(model)
        retired = getattr(model, "retired_fingerprints", {}).get(saved.get("fingerprint"))
        if retired:  # a model family that changed under the same name says what the adapter was trained on
            raise AdapterMismatchError(f"{directory} was trained on {retired}; it does not apply to this model "
                                       f"(fingerprint {ours['fingerprint']}): train the adapter again")
        if saved.get("fingerprint") and saved["fingerprint"] != ours["fingerprint"]:
            raise AdapterMismatchError(
                f"{directory} was trained on other frozen weights (fingerprint {saved['fingerprint']}, this model "
                f"{ours['fingerprint']}; backbone {saved.get('name')!r}): load the same checkpoint, or force to load "
                "anyway")
        if saved.get("activation") and saved["activation"] != ours["activation"]:
            raise AdapterMismatchError(
                f"{directory} was trained on a model computing {saved['activation']} in its MLPs, this model computes "
                f"{ours['activation']}: build it with the same activation (--quick-gelu "
                f"{'yes' if saved['activation'] == 'quick_gelu' else 'no'}), or force to load anyway")
