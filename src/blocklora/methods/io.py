"""A baseline's adapter folder: the same files and metadata rules as an adapter's (adapters/io.py), its head inside.

    blocklora_adapter.json         format, format_version, blocklora_version, config (adapter.method = the baseline),
                                   backbone (name, fingerprint, activation), tensors (name -> shape),
                                   trainable_params, run (what eval / predict need), head (method, hyper-parameters)
    blocklora_adapter.safetensors  the head's tensors (probe.weight / bias, tip.keys / values / text, coop.ctx)

Written atomically with blocklora's ownership marker; read back through the same validating reader, then checked
against the head's own declaration (check_record: the tensors it saves and no others, floating point, of the shapes
Head.record_shapes names, finite; the "head" fields by Head.record_fields), so a damaged or hand-edited file is one
error line naming the file and the tensor or field. Reloading checks the frozen weights' identity (fingerprint,
activation) as an adapter's reload does.
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
from ..reading import damaged, fields, read_bytes
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
    head_meta = meta.get("head")
    if not isinstance(head_meta, dict) or head_meta.get("method") != method:
        raise AdapterMismatchError(f"{directory / aio.CONFIG_FILE}: 'head' is missing or not a {method} record; the "
                                   "file is damaged")
    run = meta["run"]
    classnames = list(run["classnames"])
    head_cls = record(method).head_class()
    head_meta = check_record(head_cls, tensors, head_meta, len(classnames), backbone, directory)
    device = backbone.device
    tensors = {k: v.to(device) for k, v in tensors.items()}
    try:
        head = head_cls.from_saved(tensors, head_meta, backbone, classnames, run["template"],
                                   float(run["logit_scale"]))
    except (ConfigError, KeyError, TypeError, ValueError) as e:
        raise AdapterMismatchError(f"{directory / aio.CONFIG_FILE}: bad head record ({e}); the file is "
                                   "damaged") from None
    return head.to(device).eval()


def check_record(head_cls: type[Head], tensors: dict[str, torch.Tensor], head_meta: dict[str, Any],
                 n_classes: int, backbone: Any, directory: Path) -> dict[str, Any]:
    """Check a saved head record against its class's declaration (Head.record_shapes, record_fields) and return its
    checked "head" fields: every tensor present and no other, floating point, of the declared shape, finite; every
    field of the right type and range. Raises AdapterMismatchError naming the file and the tensor or field."""
    method = head_cls.method
    weights, config = directory / aio.WEIGHTS_FILE, directory / aio.CONFIG_FILE
    if tuple(sorted(tensors)) != TENSORS[method]:
        raise AdapterMismatchError(f"adapter {directory} ({method}) holds the tensors {', '.join(sorted(tensors))}, "
                                   f"not {', '.join(TENSORS[method])}: the folder is damaged")
    aio._check_finite(tensors, str(weights), "the file is damaged")  # dtype first, then values
    with damaged(config, AdapterMismatchError):
        checked = fields(head_meta, head_cls.record_fields, "head", head_cls.record_defaults)
    known: dict[str, tuple[int, str]] = {"classes": (n_classes, f"{n_classes} classes")}

    def size(dim: str) -> int | None:
        """The size a dimension must have (None: not known yet, the first tensor naming it sets it)."""
        if dim not in known:  # computed only when a record names it (feature_dim runs the image tower once)
            if dim == "feature_dim":
                from .cost import feature_dim

                d = feature_dim(backbone)
                known[dim] = (d, f"image features of width {d}")
            elif dim == "token_width":
                from .coop import token_embedding

                w = token_embedding(backbone).weight.shape[1]
                known[dim] = (w, f"a text tower of width {w}")
            elif dim in checked:
                known[dim] = (checked[dim], f"head.{dim} {checked[dim]}")
        return known[dim][0] if dim in known else None

    for name, dims in head_cls.record_shapes.items():
        shape = tuple(tensors[name].shape)
        want = [size(d) for d in dims]
        if len(shape) != len(dims) or any(w is not None and w != n for w, n in zip(want, shape)):
            why = ", ".join(dict.fromkeys(known[d][1] for d in dims if d in known))
            raise AdapterMismatchError(f"{weights}: {name} has shape {shape}, which does not fit ({', '.join(dims)})"
                                       f"{' for ' + why if why else ''}: was it trained on another model or class "
                                       "list? Else the file is damaged")
        for d, n in zip(dims, shape):
            known.setdefault(d, (n, f"{d} {n} as in {name}"))
    problem = head_cls.record_problem(tensors)
    if problem:
        raise AdapterMismatchError(f"{weights}: {problem}: the file is damaged")
    return {**head_meta, **checked}
