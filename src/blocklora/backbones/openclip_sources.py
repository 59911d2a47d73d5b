"""Where an open_clip model's weights, preprocessing and tokenizer come from.

weights: a pretrained tag (the hub cache first, the hub when reachable: a clear error offline, not minutes of
retries), a checkpoint file (safetensors, a torch state dict, OpenAI's TorchScript archive), or a folder written by
`blocklora export`; preprocessing: what that source declares, else what all of the architecture's tags agree on;
tokenizer: open_clip's bundled BPE, or one from the Hugging Face hub (SigLIP's), offline from a local copy.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import BackboneError
from .activation import is_torchscript_archive, local_dir_config
from .network import hub_reachable
from .preprocess import OPENAI_MEAN, OPENAI_STD, Preprocess

log = logging.getLogger(__name__)


def read_checkpoint_into(model: torch.nn.Module, path: str, name: str) -> None:
    """Load a user's checkpoint file: safetensors, a torch file (weights_only=True), or an OpenAI TorchScript."""
    from open_clip.factory import load_checkpoint, load_state_dict

    try:
        if is_torchscript_archive(path):
            state = torch.jit.load(path, map_location="cpu").state_dict()
            for key in ("input_resolution", "context_length", "vocab_size"):
                state.pop(key, None)
            missing, unexpected = model.load_state_dict(state, strict=False)
        else:
            load_state_dict(path)  # fails fast with a clear reason on files that are not weights
            incompatible = load_checkpoint(model, path, strict=False, weights_only=True)
            missing, unexpected = incompatible.missing_keys, incompatible.unexpected_keys
    except Exception as e:  # noqa: BLE001 - a user file: report the reason on one line
        raise BackboneError(f"cannot read checkpoint {path}: {str(e).splitlines()[0][:200]}; pass a .safetensors "
                            "or torch state-dict file of this architecture") from None
    missing = [k for k in missing if k != "attn_mask"]
    if missing or unexpected:
        first = missing[0] if missing else unexpected[0]
        raise BackboneError(f"checkpoint {path} does not match architecture {name}: "
                            f"{len(missing)} missing and {len(unexpected)} unexpected keys (first: {first}); "
                            "check the --model name")


def weights_file(name: str, pretrained: str) -> tuple[str, dict]:
    """The checkpoint file behind `pretrained` (the file itself, an export folder's weights, or a tag's download)
    and the preprocessing its source declares (a tag's or the folder's mean, std, interpolation, resize mode)."""
    import open_clip

    if os.path.isdir(pretrained):
        found = next((pretrained + os.sep + f for f in ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
                      if os.path.isfile(os.path.join(pretrained, f))), None)
        if found is None:
            raise BackboneError(f"{pretrained} is a folder without open_clip_model.safetensors: pass a checkpoint "
                                "file, a folder written by `blocklora export`, or a pretrained tag")
        return found, (local_dir_config(Path(pretrained)) or {}).get("preprocess_cfg", {})
    if os.path.sep in pretrained or os.path.exists(pretrained) or Path(pretrained).suffix or name == "tiny-clip":
        read_needs_file(pretrained)
        return pretrained, {}
    tags = open_clip.list_pretrained_tags_by_model(name)
    if pretrained not in tags:
        raise BackboneError(f"unknown pretrained tag {pretrained!r} for {name}: known tags are "
                            f"{', '.join(tags) or 'none'}, or pass a local checkpoint file")
    cfg = open_clip.get_pretrained_cfg(name, pretrained)
    cached = cached_weights(cfg)
    if cached is not None:
        return cached, cfg
    if not hub_reachable():  # no network: a clear error now, not minutes of retries
        raise BackboneError(f"cannot get pretrained weights {name}/{pretrained} (no network, not in the cache): "
                            f"download the checkpoint elsewhere and pass the local file, e.g. --pretrained "
                            f"/path/{name}.safetensors")
    from open_clip.pretrained import download_pretrained

    try:
        path = download_pretrained(cfg)
        if not path:
            raise RuntimeError("open_clip found no download source")
        return path, cfg
    except Exception as e:  # noqa: BLE001
        raise BackboneError(f"cannot get pretrained weights {name}/{pretrained} ({str(e).splitlines()[0][:160]}): "
                            f"download the checkpoint elsewhere and pass the local file, e.g. --pretrained "
                            f"/path/{name}.safetensors") from None


def cached_weights(cfg: dict) -> str | None:
    """The local copy open_clip would use for a pretrained tag (HF hub cache or its URL cache), if any."""
    hub = cfg.get("hf_hub", "")
    if hub:
        from huggingface_hub import try_to_load_from_cache

        model_id, filename = os.path.split(hub)
        for name in [filename] if filename else ["open_clip_model.safetensors", "open_clip_pytorch_model.bin"]:
            found = try_to_load_from_cache(model_id, name)
            if isinstance(found, str):
                return found
    url = cfg.get("url", "")
    if url:
        candidate = Path(os.path.expanduser("~/.cache/clip")) / os.path.basename(url)
        if candidate.is_file():
            return str(candidate)
    return None


def read_needs_file(path: str) -> None:
    if not os.path.isfile(path):
        raise BackboneError(f"checkpoint file {path} does not exist: pass an existing file, a pretrained tag, "
                            "or none for random weights")


# -- preprocessing and tokenizer ------------------------------------------------------------------------------------
def preprocess_for(name: str, model: nn.Module, declared: dict, label: str | None, has_weights: bool) -> Preprocess:
    """The preprocessing of the weights: what their source declares (`declared`: a pretrained tag's config, an
    export folder's preprocess_cfg; `label` says which); without a declaration (a file, random weights), the
    pretrained configs of `name` when all its tags agree (SigLIP: 0.5 / 0.5 and squash; MobileCLIP: no
    normalisation), else open_clip's default for the architecture (OpenAI CLIP's)."""
    import open_clip

    size = getattr(model.visual, "image_size", 224)
    size = int(size[0] if isinstance(size, (tuple, list)) else size)
    if declared.get("mean") is not None:
        return Preprocess(size, declared["mean"], declared.get("std", OPENAI_STD),
                          declared.get("interpolation") or "bicubic", declared.get("resize_mode") or "shortest",
                          label or "the weights' own configuration")
    known = open_clip.list_models()
    base = name.removesuffix("-quickgelu")
    tags = sorted({t for n in {name, base} if n in known for t in open_clip.list_pretrained_tags_by_model(n)})
    found: dict[tuple, list[str]] = {}
    for t in tags:
        for n in (name, base):
            cfg = open_clip.get_pretrained_cfg(n, t) if n in known else {}
            if cfg:
                key = (tuple(cfg.get("mean", OPENAI_MEAN)), tuple(cfg.get("std", OPENAI_STD)),
                       cfg.get("interpolation", "bicubic"), cfg.get("resize_mode", "shortest"))
                found.setdefault(key, []).append(t)
                break
    if len(found) == 1:
        (mean, std, interpolation, resize_mode), used = next(iter(found.items()))
        return Preprocess(size, mean, std, interpolation, resize_mode, f"open_clip's pretrained config of {name} "
                                                                       f"(its {len(used)} tag(s), which all agree)")
    cfg = dict(getattr(model.visual, "preprocess_cfg", {}) or {})
    why = f"its tags disagree ({', '.join(sorted(t for ts in found.values() for t in ts))})" if found else \
        "it has no pretrained tags"
    if has_weights and found:
        log.warning("%s: %s, so the weights' preprocessing is unknown: using open_clip's default for the "
                    "architecture; pass the pretrained tag to use its own", name, why)
    return Preprocess(size, cfg.get("mean", OPENAI_MEAN), cfg.get("std", OPENAI_STD),
                      cfg.get("interpolation", "bicubic"), cfg.get("resize_mode", "shortest"),
                      f"open_clip's default for {name} ({why})")


def load_tokenizer(model_name: str, directory: str | None = None) -> Any:
    """open_clip's tokenizer of `model_name`; one that comes from a hub (SigLIP's) from `directory`, the hub
    cache, or the hub. Offline with no copy, a BackboneError at once naming the tokenizer and the fix."""
    import open_clip
    from open_clip.tokenizer import HFTokenizer

    text_cfg = (open_clip.get_model_config(model_name) or {}).get("text_cfg", {})
    hub_id = text_cfg.get("hf_tokenizer_name", "")
    if not hub_id:
        if directory:
            raise BackboneError(f"{model_name}'s tokenizer ships with open_clip: drop --tokenizer {directory}")
        return open_clip.get_tokenizer(model_name)
    kwargs = dict(context_length=text_cfg.get("context_length", 77), tokenizer_mode=text_cfg.get("tokenizer_mode"),
                  **text_cfg.get("tokenizer_kwargs", {}))
    if directory:
        if not os.path.isdir(directory):
            raise BackboneError(f"tokenizer directory {directory} does not exist: pass the folder that "
                                f"AutoTokenizer.from_pretrained({hub_id!r}).save_pretrained(...) wrote")
        return _hf_tokenizer(HFTokenizer, directory, model_name, local_files_only=True, **kwargs)
    offline = not hub_reachable()
    try:
        return _hf_tokenizer(HFTokenizer, hub_id, model_name, local_files_only=offline, **kwargs)
    except BackboneError:
        if not offline:
            raise
    raise BackboneError(
        f"{model_name} needs the tokenizer {hub_id} from the Hugging Face hub, which is out of reach (no network) "
        f"and not in its cache: on a machine with a network run `python -c \"from transformers import "
        f"AutoTokenizer; AutoTokenizer.from_pretrained('{hub_id}').save_pretrained('DIR')\"`, copy DIR here and "
        f"pass --tokenizer DIR")


def _hf_tokenizer(cls: type, source: str, model_name: str, **kwargs: Any) -> Any:
    try:
        return cls(source, **kwargs)
    except (OSError, ValueError, ImportError) as e:  # a hub miss, a damaged folder, sentencepiece not installed
        raise BackboneError(f"cannot load the tokenizer of {model_name} from {source}: "
                            f"{str(e).strip().splitlines()[0][:200]}") from None
