"""The MLP activation that belongs to a set of CLIP weights (QuickGELU or GELU), resolved once and recorded.

OpenAI trained CLIP with QuickGELU, x * sigmoid(1.702 x); open_clip's plain model names (ViT-B-16, ...) build GELU
and open_clip 3.x only warns when a tag wants the other one. The same weights under the other activation compute
other features without any error, and the weights' fingerprint cannot tell (same tensors). So the activation is
part of the weights' identity: it is resolved here from the strongest evidence at hand, recorded with every adapter,
results.json and export, and every reload uses the recorded value.

Evidence for an open_clip model, strongest first:
  1. an explicit request: quick_gelu "yes" / "no" (--quick-gelu), else a `-quickgelu` model name;
  2. what the weights say about themselves: the tag's pretrained config (open_clip.get_pretrained_cfg's
     quick_gelu), an OpenAI TorchScript archive (OpenAI released every CLIP with QuickGELU), the metadata blocklora
     writes into its exports (EXPORT_KEY), the open_clip_config.json of a local-dir export, or a Hugging Face
     hub-cache path that names a known tag's repository;
  3. a guess from the file name ("openai" in it), logged as a guess;
  4. the architecture's default: GELU for plain names.
An explicit request that contradicts (2) is honoured with a warning (an ablation, say). A recorded value (a reload
of an adapter) must agree with (2): a disagreement is an error, never a silent switch.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from ..errors import AdapterMismatchError
from ..reading import loads, read_text

log = logging.getLogger(__name__)

EXPORT_KEY = "blocklora.quick_gelu"  # safetensors metadata / torch-file key of blocklora's exports
QUICKGELU_SUFFIX = "-quickgelu"
REQUESTS = ("auto", "yes", "no")


@dataclass(frozen=True)
class Activation:
    """The resolved activation and where it came from (for logs, results.json and error messages)."""

    quick_gelu: bool
    source: str

    @property
    def name(self) -> str:
        return "quick_gelu" if self.quick_gelu else "gelu"

    @property
    def flag(self) -> str:
        """The --quick-gelu value that reproduces it."""
        return "yes" if self.quick_gelu else "no"


def _label(quick_gelu: bool) -> str:
    return "QuickGELU" if quick_gelu else "GELU"


def resolve(name: str, pretrained: str | None, request: str = "auto", recorded: bool | None = None) -> Activation:
    """The activation an open_clip model `name` with weights `pretrained` (tag, file, dir or None) must use.

    `request` is the user's --quick-gelu (auto, yes, no); `recorded` the value an adapter was trained with.
    Raises AdapterMismatchError when `recorded` contradicts what the weights say about themselves.
    """
    evidence = weights_evidence(name, pretrained)
    if recorded is not None:
        if evidence is not None and evidence.quick_gelu != recorded:
            raise AdapterMismatchError(
                f"the adapter was trained with {_label(recorded)}, but {evidence.source} says these weights use "
                f"{_label(evidence.quick_gelu)}: pass the weights it was trained on (--pretrained)")
        return Activation(recorded, "the adapter's record")
    if request in ("yes", "no"):
        chosen = Activation(request == "yes", f"--quick-gelu {request}")
    elif name.endswith(QUICKGELU_SUFFIX):
        chosen = Activation(True, f"the model name {name}")
    else:
        chosen = None
    if chosen is not None:
        if evidence is not None and evidence.quick_gelu != chosen.quick_gelu:
            log.warning("%s asks for %s although %s says %s: features will differ from the published model's",
                        chosen.source, _label(chosen.quick_gelu), evidence.source, _label(evidence.quick_gelu))
        return chosen
    if evidence is not None:
        return evidence
    if pretrained and "openai" in Path(pretrained).name.lower():
        log.warning("guessing QuickGELU for %s from its file name (OpenAI weights); pass --quick-gelu yes or no to "
                    "state it", pretrained)
        return Activation(True, f"the file name {Path(pretrained).name} (a guess)")
    return Activation(False, "the architecture's default")


def weights_evidence(name: str, pretrained: str | None) -> Activation | None:
    """What the weights say about their own activation (rule 2 above), or None when they say nothing."""
    import open_clip

    if pretrained in (None, "", "none"):
        return None
    if os.path.isdir(pretrained):
        cfg = local_dir_config(Path(pretrained))
        if cfg is not None and "quick_gelu" in cfg.get("model_cfg", {}):
            return Activation(bool(cfg["model_cfg"]["quick_gelu"]), f"{pretrained}/open_clip_config.json")
        return None
    if not os.path.isfile(pretrained):  # a pretrained tag
        base = name[: -len(QUICKGELU_SUFFIX)] if name.endswith(QUICKGELU_SUFFIX) else name
        for model in (name, base):
            cfg = open_clip.get_pretrained_cfg(model, pretrained) if model in open_clip.list_models() else {}
            if cfg:
                return Activation(bool(cfg.get("quick_gelu", False)), f"open_clip's pretrained config of "
                                                                       f"{model}/{pretrained}")
        return None
    if is_torchscript_archive(pretrained):
        return Activation(True, f"{pretrained} (an OpenAI TorchScript archive)")
    recorded = read_export_metadata(pretrained)
    if recorded is not None:
        return Activation(recorded, f"the blocklora export metadata of {pretrained}")
    tag = _hub_cache_tag(pretrained)
    if tag is not None:
        model, tag_name, quick = tag
        return Activation(quick, f"open_clip's pretrained config of {model}/{tag_name} (hub cache path)")
    return None


def local_dir_config(folder: Path) -> dict | None:
    path = folder / "open_clip_config.json"
    try:
        cfg = loads(read_text(path))  # reading.py: a regular file, nesting bounded
    except (OSError, ValueError):
        return None
    return cfg if isinstance(cfg, dict) and isinstance(cfg.get("model_cfg"), dict) else None


def _hub_cache_tag(path: str) -> tuple[str, str, bool] | None:
    """(model, tag, quick_gelu) of the pretrained tag whose hub repository holds `path` in the HF hub cache.

    The hub cache keeps files under .../models--<org>--<repo>/snapshots/<rev>/<file>: the folder names the repo.
    """
    import open_clip

    repo = next((part[len("models--"):].replace("--", "/") for part in Path(path).resolve().parts
                 if part.startswith("models--")), None)
    if repo is None:
        return None
    for model, tag in open_clip.list_pretrained():
        cfg = open_clip.get_pretrained_cfg(model, tag)
        if cfg.get("hf_hub", "").strip("/").split("/")[:2] == repo.split("/")[:2]:
            return model, tag, bool(cfg.get("quick_gelu", False))
    return None


# -- blocklora's own exports -----------------------------------------------------------------------------------
def export_metadata(model: str, quick_gelu: bool) -> dict[str, str]:
    """String metadata written into an exported checkpoint: the activation, and the open_clip call that loads it."""
    load = stock_load_hint(model, quick_gelu)
    return {EXPORT_KEY: "true" if quick_gelu else "false", "blocklora.model": model,
            "blocklora.activation": _label(quick_gelu), "blocklora.open_clip_load": load}


def stock_load_hint(model: str, quick_gelu: bool, path: str = "PATH") -> str:
    """How stock open_clip builds the exported model with the right activation."""
    import open_clip

    if model.endswith(QUICKGELU_SUFFIX) or not quick_gelu:
        return f"open_clip.create_model({model!r}, pretrained={path!r})"
    if model + QUICKGELU_SUFFIX in open_clip.list_models():
        return f"open_clip.create_model({model + QUICKGELU_SUFFIX!r}, pretrained={path!r})"
    return f"open_clip.create_model({model!r}, pretrained={path!r}, force_quick_gelu=True)"


def read_export_metadata(path: str | os.PathLike) -> bool | None:
    """The activation recorded in a blocklora export (safetensors metadata or torch file), or None."""
    path = str(path)
    if path.endswith(".safetensors"):
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(path, framework="pt") as f:
                value = (f.metadata() or {}).get(EXPORT_KEY)
        except (OSError, SafetensorError, ValueError):
            return None
        return None if value is None else value == "true"
    import zipfile

    if not zipfile.is_zipfile(path):
        return None
    try:  # a torch file: {"state_dict": ..., "blocklora_export": {...}} (open_clip reads "state_dict")
        import torch

        data = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # noqa: BLE001 - not our export, or not a torch file: it says nothing
        return None
    meta = data.get("blocklora_export") if isinstance(data, dict) else None
    if isinstance(meta, dict) and EXPORT_KEY in meta:
        return meta[EXPORT_KEY] == "true"
    return None


# -- what a built model computes -------------------------------------------------------------------------------
def mlp_activation(model: nn.Module) -> str | None:
    """"quick_gelu", "gelu" (or both joined by "+") as the model's modules compute them; None if neither is used.

    Reads the activation modules themselves (open_clip's and OpenAI's QuickGELU, nn.GELU, transformers'
    QuickGELUActivation / GELUActivation), so it sees what the model computes whatever the loader was told.
    """
    kinds = set()
    for module in model.modules():
        cls = type(module).__name__
        if "QuickGELU" in cls:
            kinds.add("quick_gelu")
        elif "GELU" in cls:
            kinds.add("gelu")
    return "+".join(sorted(kinds)) or None


def is_torchscript_archive(path: str | os.PathLike) -> bool:
    """OpenAI's original CLIP checkpoints are TorchScript archives (a zip holding constants.pkl and code/)."""
    import zipfile

    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as z:
        return any(n.endswith("constants.pkl") or "/code/" in n for n in z.namelist()[:200])
