"""A baseline's adapter folder: the same files and metadata rules as an adapter's (adapters/io.py), its head inside.

    blocklora_adapter.json         format, format_version, blocklora_version, config (adapter.method = the baseline),
                                   backbone (name, fingerprint, activation), tensors (name -> shape),
                                   trainable_params, run (what eval / predict need), head (method, hyper-parameters)
    blocklora_adapter.safetensors  the head's tensors (probe.weight / bias, tip.keys / values / text, coop.ctx)

Written atomically with blocklora's ownership marker; read back through the same validating reader (a damaged or
hand-edited file is one error line). Reloading checks the frozen weights' identity (fingerprint, activation) as an
adapter's reload does.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load, save_file

from .._version import __version__
from ..adapters import io as aio
from ..adapters.config import AdapterConfig
from ..errors import AdapterMismatchError, BlockLoRAError, ConfigError
from ..ownership import atomic_folder, reported_write
from ..reading import read_bytes
from .base import Head
from .registry import METHODS, record

# The tensors each baseline saves (a folder with others is damaged or another method's).
TENSORS = {name: rec.saves for name, rec in METHODS.items() if not rec.is_adapter}


def save_head(head: Head, directory: str | os.PathLike, config: AdapterConfig, backbone: dict[str, Any],
              run: dict[str, Any], overwrite: bool = False) -> Path:
    """Write `head` as an adapter folder (see the module docstring). Raises BlockLoRAError for a folder that may not
    be replaced, AdapterMismatchError for non-finite tensors."""
    directory = Path(directory)
    if directory.exists() or directory.is_symlink():
        if not overwrite:
            raise BlockLoRAError(f"{directory} already exists: choose another path or pass overwrite")
        aio._check_replaceable(directory)
    tensors = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in head.tensors().items()}
    aio._check_finite(tensors, "refusing to save the head", "training diverged: lower baseline.method_lr")
    meta = {"format": aio.FORMAT, "format_version": aio.FORMAT_VERSION, "blocklora_version": __version__,
            "config": config.to_dict(), "backbone": backbone,
            "tensors": {k: list(v.shape) for k, v in sorted(tensors.items())},
            "trainable_params": head.trainable_params, "run": run,
            "head": {"method": head.method, "merges": record(head.method).merges, **head.meta()}}
    text = json.dumps(meta, indent=2, allow_nan=False) + "\n"
    with atomic_folder(directory, aio.KIND) as tmp:
        with reported_write(directory / aio.WEIGHTS_FILE):
            save_file(tensors, str(tmp / aio.WEIGHTS_FILE), metadata={"format": aio.FORMAT})
        (tmp / aio.CONFIG_FILE).write_text(text)
    return directory


def load_head(directory: str | os.PathLike, meta: dict[str, Any], backbone: Any, force: bool = False) -> Head:
    """The head saved in `directory` (its checked `meta`, trained.run_meta's run record filled in), on `backbone`
    (frozen weights checked against the recorded identity unless force). Raises AdapterMismatchError naming what is
    wrong with the folder."""
    from ..backbones.fingerprint import check_identity

    directory = Path(directory)
    method = meta["config"]["method"]
    check_identity(backbone.model, directory, force)
    try:
        tensors = load(read_bytes(directory / aio.WEIGHTS_FILE))
    except Exception as e:  # noqa: BLE001 - SafetensorError, OSError: a damaged or missing file
        why = str(e).splitlines()[0][:160] if str(e) else type(e).__name__
        raise AdapterMismatchError(f"cannot read {directory / aio.WEIGHTS_FILE}: {why}; the adapter directory is "
                                   "damaged") from None
    aio._check_finite(tensors, f"adapter {directory}", "the folder is damaged")
    if tuple(sorted(tensors)) != TENSORS[method]:
        raise AdapterMismatchError(f"adapter {directory} ({method}) holds the tensors {', '.join(sorted(tensors))}, "
                                   f"not {', '.join(TENSORS[method])}: the folder is damaged")
    head_meta = meta.get("head")
    if not isinstance(head_meta, dict) or head_meta.get("method") != method:
        raise AdapterMismatchError(f"{directory / aio.CONFIG_FILE}: 'head' is missing or not a {method} record; the "
                                   "file is damaged")
    run = meta["run"]
    classnames = list(run["classnames"])
    _check_shapes(method, tensors, len(classnames), backbone, directory)
    device = backbone.device
    tensors = {k: v.to(device) for k, v in tensors.items()}
    try:
        head = record(method).head_class().from_saved(tensors, head_meta, backbone, classnames, run["template"],
                                                      float(run["logit_scale"]))
    except (ConfigError, KeyError, TypeError, ValueError) as e:
        raise AdapterMismatchError(f"{directory / aio.CONFIG_FILE}: bad head record ({e}); the file is "
                                   "damaged") from None
    return head.to(device).eval()


def _check_shapes(method: str, t: dict[str, torch.Tensor], n_classes: int, backbone: Any, where: Path) -> None:
    def bad(what: str) -> AdapterMismatchError:
        return AdapterMismatchError(f"adapter {where} does not fit: {what}; was it trained on another model or "
                                    "class list?")

    if method == "probe" or method.startswith("tip_adapter"):
        from .cost import feature_dim

        d = feature_dim(backbone)  # the heads read (N, D) image features: another width fails only at eval
    if method == "probe":
        w, b = t["probe.weight"], t["probe.bias"]
        if w.dim() != 2 or tuple(w.shape) != (n_classes, d) or tuple(b.shape) != (n_classes,):
            raise bad(f"probe.weight {tuple(w.shape)} / probe.bias {tuple(b.shape)} for {n_classes} classes and "
                      f"image features of width {d}")
    elif method.startswith("tip_adapter"):
        k, v, x = t["tip.keys"], t["tip.values"], t["tip.text"]
        if k.dim() != 2 or v.dim() != 2 or x.dim() != 2 or k.shape[1] != d or v.shape != (k.shape[0], n_classes) \
                or x.shape != (n_classes, d):
            raise bad(f"tip.keys {tuple(k.shape)}, tip.values {tuple(v.shape)}, tip.text {tuple(x.shape)} for "
                      f"{n_classes} classes and image features of width {d}")
    else:
        from .coop import token_embedding

        width = token_embedding(backbone).weight.shape[1]
        ctx = t["coop.ctx"]
        if ctx.dim() != 2 or ctx.shape[1] != width or not 1 <= ctx.shape[0] <= 256:
            raise bad(f"coop.ctx {tuple(ctx.shape)} for a text tower of width {width}")
