"""Where an open_clip model's weights, preprocessing and tokenizer come from.

weights: a pretrained tag (the hub cache first, the hub when reachable: a clear error offline, not minutes of
retries), a checkpoint file (safetensors, a torch state dict, OpenAI's TorchScript archive), or a folder written by
`blocklora export`; preprocessing: what that source declares, else what all of the architecture's tags agree on;
tokenizer: open_clip's bundled BPE, or one from the Hugging Face hub (SigLIP's), offline from a local copy.
"""

from __future__ import annotations

import json
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


def read_checkpoint_into(model: torch.nn.Module, path: str, name: str, config: Path | None = None) -> None:
    """Load a user's checkpoint file: safetensors, a torch file (weights_only=True), or an OpenAI TorchScript.

    The checkpoint must have the shapes of the model `name` builds (check_shapes): open_clip's load_checkpoint would
    otherwise interpolate position embeddings of another image size or context length and run at the name's size,
    silently. `config`: the open_clip_config.json of the model folder the file is from, whose model_cfg must
    describe it (check_folder_config). Raises BackboneError (one line) for a file that is not weights, weights of
    another shape or architecture, or a folder config that does not describe them."""
    from open_clip.factory import load_checkpoint, load_state_dict

    try:
        if is_torchscript_archive(path):
            state = torch.jit.load(path, map_location="cpu").state_dict()
            for key in ("input_resolution", "context_length", "vocab_size"):
                state.pop(key, None)
            check_folder_config(config, model, state, path)
            check_shapes(model, state, path, name)
            missing, unexpected = model.load_state_dict(state, strict=False)
        else:
            state = _as_open_clip(model, load_state_dict(path))  # fails fast on files that are not weights
            check_folder_config(config, model, state, path)
            check_shapes(model, state, path, name)
            incompatible = load_checkpoint(model, path, strict=False, weights_only=True)
            missing, unexpected = incompatible.missing_keys, incompatible.unexpected_keys
    except BackboneError:
        raise
    except Exception as e:  # noqa: BLE001 - a user file: report the reason on one line
        raise BackboneError(f"cannot read checkpoint {path}: {str(e).splitlines()[0][:200]}; pass a .safetensors "
                            "or torch state-dict file of this architecture") from None
    missing = [k for k in missing if k != "attn_mask"]
    if missing or unexpected:
        first = missing[0] if missing else unexpected[0]
        raise BackboneError(f"checkpoint {path} does not match architecture {name}: "
                            f"{len(missing)} missing and {len(unexpected)} unexpected keys (first: {first}); "
                            "check the --model name")


def _as_open_clip(model: torch.nn.Module, state: dict) -> dict:
    """The state dict as open_clip's load_checkpoint sees it before it resizes anything: third-party key layouts
    converted (open_clip.convert.convert_state_dict), an old CLIP text layout moved under `text.`."""
    from open_clip.convert import convert_state_dict
    from open_clip.model import convert_to_custom_text_state_dict

    state = convert_state_dict(model, state)
    if "positional_embedding" in state and not hasattr(model, "positional_embedding"):
        state = convert_to_custom_text_state_dict(state)
    return state


# -- a checkpoint of another shape than the model name ----------------------------------------------------------------
VISION_POS = ("visual.positional_embedding", "visual.trunk.pos_embed")
PATCH_WEIGHT = ("visual.conv1.weight", "visual.trunk.patch_embed.proj.weight")
TEXT_POS = ("positional_embedding", "text.positional_embedding")
TOKEN_EMBEDDING = ("token_embedding.weight", "text.token_embedding.weight")
SCALARS = ("logit_scale", "logit_bias")  # open_clip reshapes these between a scalar and a 1-element vector


def check_shapes(model: torch.nn.Module, state: dict, path: str, name: str) -> None:
    """Raise BackboneError when a tensor of the checkpoint has another shape than the same tensor of the model
    `name` builds. The error names what differs in the field's terms (image size and patch grid, context length,
    widths, vocabulary), both values, and the open_clip model names whose configs have the checkpoint's shapes."""
    own = model.state_dict()
    bad = [k for k, v in state.items() if k in own and k not in SCALARS and hasattr(v, "shape")
           and tuple(v.shape) != tuple(own[k].shape)]
    if not bad:
        return
    prefix = _prefix_tokens(model, own)
    theirs, ours = _facts(state, prefix), _facts(own, prefix)
    differ = [f"{_LABELS[k]} {_show(k, theirs)} in the checkpoint, {_show(k, ours)} in {name}"
              for k in _LABELS if k in theirs and k in ours and theirs[k] != ours[k]]
    if not differ:
        k = bad[0]
        differ = [f"{k} has shape {tuple(state[k].shape)} in the checkpoint, {tuple(own[k].shape)} in {name}"]
    fits = names_that_fit(theirs, exclude=name)
    hint = (f"use --model {' or '.join(fits)}, whose config has the checkpoint's shapes" if fits else
            "pass the model name the checkpoint was made for (no open_clip model config has its shapes)")
    raise BackboneError(f"checkpoint {path} was made for another model than {name}: {'; '.join(differ)}. open_clip "
                        "would interpolate position embeddings and run the weights at another size than they were "
                        f"trained at, silently; {hint}")


# A model folder's model_cfg fields, by the shape fact of _facts each states, with the weights that hold the fact
FOLDER_FIELDS = {"image_px": ("vision_cfg", "image_size", VISION_POS),
                 "patch": ("vision_cfg", "patch_size", PATCH_WEIGHT),
                 "vision_width": ("vision_cfg", "width", PATCH_WEIGHT),
                 "context": ("text_cfg", "context_length", TEXT_POS),
                 "vocab": ("text_cfg", "vocab_size", TOKEN_EMBEDDING),
                 "text_width": ("text_cfg", "width", TOKEN_EMBEDDING)}


def _image_size(name: str, value: Any) -> Any:
    """Rule: open_clip's image_size, one side or a (height, width) pair, in pixels."""
    from .. import checks

    if isinstance(value, list) and len(value) == 2:
        return [checks.number(f"{name}[{i}]", v, checks.Range(1, integer=True)) for i, v in enumerate(value)]
    return checks.number(name, value, checks.Range(1, integer=True))


def check_folder_config(config: Path | None, model: torch.nn.Module, state: dict, weights: str) -> None:
    """Refuse a model folder whose open_clip_config.json model_cfg does not describe the weights beside it (an image
    size, patch, width, context length or vocabulary of other shapes): open_clip, which builds the folder's model
    from model_cfg, would interpolate the position tables to the config's size, silently, and blocklora (which
    builds --model NAME and checks the weights against it) would run a folder that says another model. The fields
    it reads are checked for their types first. Raises BackboneError naming the field, both values and the tensor."""
    from .. import checks
    from ..reading import damaged, fields
    from .activation import local_dir_config

    if config is None or (folder := local_dir_config(config.parent)) is None:
        return  # no folder, or none open_clip reads (folder_preprocess has refused a damaged file)
    fix = "restore the open_clip_config.json the weights were saved with, or export the model folder again"
    side, text = checks.maybe(checks.num(1, integer=True)), checks.text(optional=True)
    rules = {"vision_cfg": {"image_size": checks.maybe(_image_size), "patch_size": side, "width": side,
                            "timm_model_name": text},
             "text_cfg": {"context_length": side, "vocab_size": side, "width": side, "hf_model_name": text}}
    model_cfg = folder["model_cfg"]
    with damaged(config, BackboneError, fix):
        for tower, tower_rules in rules.items():
            fields(model_cfg.get(tower, {}), tower_rules, f"model_cfg.{tower}", dict.fromkeys(tower_rules))
    declared, found = _config_facts(model_cfg), _facts(state, _prefix_tokens(model, model.state_dict()))
    for key, (tower, field, tensors) in FOLDER_FIELDS.items():
        if key in declared and key in found and declared[key] != found[key] and \
                (key != "vision_width" or found.get("vision") == "vit"):
            value = (model_cfg.get(tower) or {}).get(field)
            said = json.dumps(value) if value is not None else f"not set (open_clip's default {declared[key]})"
            tensor = next(k for k in tensors if k in state)
            shown = f"{found[key]} px" if key == "patch" else _show(key, found)
            raise BackboneError(
                f"{config}: model_cfg.{tower}.{field} is {said}, but the weights beside it ({Path(weights).name}) have "
                f"{_LABELS.get(key, 'patch size')} {shown}: {tensor} has shape {tuple(state[tensor].shape)}. The "
                f"config does not describe the weights (open_clip builds the folder's model from it and would "
                f"interpolate its position tables or fail to load); {fix}")


_LABELS = {"image_px": "image size", "context": "context length", "vision_width": "vision width",
           "text_width": "text width", "vocab": "vocabulary"}


def _show(key: str, facts: dict) -> str:
    if key == "image_px":
        grid, patch = facts.get("grid"), facts.get("patch")
        return f"{facts[key]} px" + (f" ({grid}x{grid} patches of {patch} px)" if grid and patch else "")
    return f"{facts[key]} tokens" if key in ("context", "vocab") else str(facts[key])


def _first(state: dict, keys: tuple[str, ...]) -> tuple[int, ...] | None:
    for k in keys:
        if k in state and hasattr(state[k], "shape"):
            return tuple(state[k].shape)
    return None


def _prefix_tokens(model: torch.nn.Module, own: dict) -> int:
    """Position-table rows that are not patches (class token, registers) in the model built: rows - grid cells."""
    visual = getattr(model, "visual", None)
    grid = getattr(visual, "grid_size", None) or getattr(getattr(getattr(visual, "trunk", None), "patch_embed", None),
                                                         "grid_size", None)
    rows = _first(own, VISION_POS)
    if grid is None or rows is None:
        return 1
    grid = (grid, grid) if isinstance(grid, int) else tuple(grid)
    return rows[-2] - grid[0] * grid[1]


def _facts(state: dict, prefix: int) -> dict[str, Any]:
    """Image size (patch grid x patch), context length, widths and vocabulary a state dict's shapes imply."""
    import math

    facts: dict[str, Any] = {}
    patch = _first(state, PATCH_WEIGHT)
    if patch is not None and len(patch) == 4:
        facts["patch"], facts["vision_width"] = patch[-1], patch[0]
        facts["vision"] = "vit" if PATCH_WEIGHT[0] in state else "timm"
    pos = _first(state, VISION_POS)
    if pos is not None and len(pos) >= 2 and pos[-2] > prefix:
        grid = math.isqrt(pos[-2] - prefix)
        if grid * grid == pos[-2] - prefix and "patch" in facts:
            facts["grid"], facts["image_px"] = grid, grid * facts["patch"]
    text = _first(state, TEXT_POS)
    if text is not None:
        facts["context"] = text[-2] if len(text) >= 2 else text[0]
    tokens = _first(state, TOKEN_EMBEDDING)
    if tokens is not None and len(tokens) == 2:
        facts["vocab"], facts["text_width"] = tokens
    return facts


def names_that_fit(facts: dict[str, Any], exclude: str = "") -> list[str]:
    """open_clip model names (at most 3, -quickgelu twins folded) whose configs state every fact a checkpoint's
    shapes give (tower kind, image size, patch, vision width, context length, vocabulary, text width), each equal."""
    import open_clip

    wanted = [k for k in facts if k != "grid"]
    fits: list[str] = []
    for n in open_clip.list_models():
        base = n.removesuffix("-quickgelu")
        if exclude in (n, base) or base in fits:
            continue
        own = _config_facts(open_clip.get_model_config(n) or {})
        if "image_px" in facts and all(k in own and own[k] == facts[k] for k in wanted if k != "vision_width"
                                       or own.get("vision") == "vit"):
            fits.append(base)
    return fits[:3]


def _config_facts(cfg: dict) -> dict[str, Any]:
    """The facts of _facts that an open_clip model config states (open_clip's CLIPTextCfg defaults included)."""
    import re

    vision, text = cfg.get("vision_cfg") or {}, cfg.get("text_cfg") or {}
    facts: dict[str, Any] = {}
    size = vision.get("image_size", 224)
    if isinstance(size, (list, tuple)):
        size = size[0] if len(set(size)) == 1 else None
    if size:
        facts["image_px"] = int(size)
    if vision.get("timm_model_name"):  # a timm tower: its patch is in its name (vit_base_patch16_siglip_224)
        found = re.search(r"patch(\d+)", vision["timm_model_name"])
        facts["vision"] = "timm"
        if found:
            facts["patch"] = int(found.group(1))
    elif not isinstance(vision.get("layers"), (list, tuple)):  # a CLIP ViT (a list of layers is a ModifiedResNet)
        facts["vision"] = "vit"
        facts["patch"], facts["vision_width"] = int(vision.get("patch_size", 16)), int(vision.get("width", 768))
    if not text.get("hf_model_name"):
        facts["context"] = int(text.get("context_length", 77))
        facts["vocab"], facts["text_width"] = int(text.get("vocab_size", 49408)), int(text.get("width", 512))
    return facts


def folder_model_names(folder: str) -> list[str]:
    """The open_clip model names (at most 3, -quickgelu twins folded) whose config is the model_cfg of a model
    folder's open_clip_config.json (its quick_gelu flag aside), [] when none is or it has none."""
    import open_clip

    cfg = local_dir_config(Path(folder))
    if cfg is None:
        return []
    recorded = _recorded_model(Path(folder) / "open_clip_model.safetensors")  # a blocklora export names it
    if recorded:
        return [recorded]
    own = {k: v for k, v in cfg["model_cfg"].items() if k != "quick_gelu"}
    names: list[str] = []
    for n in open_clip.list_models():
        base = n.removesuffix("-quickgelu")
        theirs = {k: v for k, v in (open_clip.get_model_config(n) or {}).items() if k != "quick_gelu"}
        if base not in names and theirs == own:
            names.append(base)
    return names[:3]


def _recorded_model(weights: Path) -> str | None:
    """The --model name a blocklora export's safetensors metadata records ("blocklora.model"), if any."""
    try:
        from safetensors import safe_open

        with safe_open(str(weights), "pt") as f:
            name = (f.metadata() or {}).get("blocklora.model")
    except Exception:  # noqa: BLE001 - no file, not safetensors: nothing recorded
        return None
    return name if isinstance(name, str) and name else None


def open_clip_folder_hint(folder: str) -> str:
    """How to load an open_clip model folder (open_clip's local-dir / a hub repository's files): the flags, with
    the model names its config matches."""
    names = folder_model_names(folder)
    name = " or ".join(names) if names else "NAME (the open_clip model it was saved from)"
    return f"an open_clip model folder (open_clip_config.json): pass --model {name} --pretrained {folder}"


def folder_preprocess(folder: Path) -> dict:
    """The preprocess_cfg of an open_clip model folder's open_clip_config.json ({} when the folder has no such file).
    A file that is there but damaged (not JSON, not an object, no model_cfg object, a preprocess_cfg that is not an
    object) is a BackboneError naming it: read as absent, the weights would silently get the architecture's default
    preprocessing (OpenAI CLIP's mean and std for a SigLIP export)."""
    from ..reading import read_json

    path = folder / "open_clip_config.json"
    if not os.path.lexists(path):
        return {}
    fix = "it is damaged: export the model folder again (blocklora export) or restore the file"
    cfg = read_json(path, "the open_clip model config", BackboneError, fix)
    preprocess = cfg.get("preprocess_cfg", {}) if isinstance(cfg, dict) else None
    if not isinstance(cfg, dict) or not isinstance(cfg.get("model_cfg"), dict) or \
            not isinstance(preprocess if preprocess is not None else {}, dict):
        what = ("not a JSON object" if not isinstance(cfg, dict) else "no model_cfg object"
                if not isinstance(cfg.get("model_cfg"), dict) else "preprocess_cfg is not an object")
        raise BackboneError(f"{path}: {what}; {fix}")
    return preprocess or {}


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
        return found, folder_preprocess(Path(pretrained))
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
PREPROCESS_KEYS = ("mean", "std", "interpolation", "resize_mode", "fill_color")  # open_clip's PreprocessCfg


def preprocess_for(name: str, model: nn.Module, declared: dict, label: str | None, has_weights: bool) -> Preprocess:
    """The preprocessing of the weights: what their source declares (`declared`: a pretrained tag's config, an
    export or model folder's preprocess_cfg; `label` says which), over open_clip's PreprocessCfg defaults for the
    keys it leaves out, as open_clip's create_model merges them; without a declaration (a file, random weights), the
    pretrained configs of `name` when all its tags agree (SigLIP: 0.5 / 0.5 and squash; MobileCLIP: no
    normalisation), else open_clip's default for the architecture (OpenAI CLIP's). A declared `size` other than
    the model's image size is a BackboneError (the weights would be fed images of another size)."""
    import open_clip
    from open_clip.transform import PreprocessCfg

    size = getattr(model.visual, "image_size", 224)
    size = int(size[0] if isinstance(size, (tuple, list)) else size)
    given = {k: v for k, v in declared.items() if k in PREPROCESS_KEYS and v is not None}
    if declared.get("mode") not in (None, "RGB"):  # open_clip's PreprocessCfg asserts it
        raise BackboneError(f"{label or 'the preprocessing config'} says mode {declared['mode']!r}: open_clip "
                            "feeds its models RGB images (PreprocessCfg.mode 'RGB')")
    if declared.get("size") is not None:
        side = declared["size"]
        side = list(side) if isinstance(side, (tuple, list)) else [side, side]
        if side != [size, size]:
            raise BackboneError(f"{label or 'the preprocessing config'} says size {declared['size']}, but {name} "
                                f"takes {size}x{size} images: the config and the model are for other image sizes; "
                                "pass the model name the weights were made for")
    if given:
        defaults = PreprocessCfg()
        cfg = {k: given.get(k, getattr(defaults, k)) for k in PREPROCESS_KEYS}
        return Preprocess(size, cfg["mean"], cfg["std"], cfg["interpolation"], cfg["resize_mode"],
                          label or "the weights' own configuration", cfg["fill_color"])
    known = open_clip.list_models()
    base = name.removesuffix("-quickgelu")
    tags = sorted({t for n in {name, base} if n in known for t in open_clip.list_pretrained_tags_by_model(n)})
    found: dict[tuple, list[str]] = {}
    for t in tags:
        for n in (name, base):
            cfg = open_clip.get_pretrained_cfg(n, t) if n in known else {}
            if cfg:
                key = (tuple(cfg.get("mean", OPENAI_MEAN)), tuple(cfg.get("std", OPENAI_STD)),
                       cfg.get("interpolation", "bicubic"), cfg.get("resize_mode", "shortest"),
                       json.dumps(cfg.get("fill_color", 0)))
                found.setdefault(key, []).append(t)
                break
    if len(found) == 1:
        (mean, std, interpolation, resize_mode, fill), used = next(iter(found.items()))
        return Preprocess(size, mean, std, interpolation, resize_mode, f"open_clip's pretrained config of {name} "
                                                                       f"(its {len(used)} tag(s), which all agree)",
                          json.loads(fill))
    cfg = dict(getattr(model.visual, "preprocess_cfg", {}) or {})
    why = f"its tags disagree ({', '.join(sorted(t for ts in found.values() for t in ts))})" if found else \
        "it has no pretrained tags"
    if has_weights and found:
        log.warning("%s: %s, so the weights' preprocessing is unknown: using open_clip's default for the "
                    "architecture; pass the pretrained tag to use its own", name, why)
    return Preprocess(size, cfg.get("mean", OPENAI_MEAN), cfg.get("std", OPENAI_STD),
                      cfg.get("interpolation", "bicubic"), cfg.get("resize_mode", "shortest"),
                      f"open_clip's default for {name} ({why})", cfg.get("fill_color", 0))


def hub_tokenizer(model_name: str) -> str:
    """The Hugging Face hub tokenizer open_clip's config of `model_name` names (text_cfg.hf_tokenizer_name: SigLIP's,
    XLM-R's, ...), or "" for open_clip's bundled one."""
    import open_clip

    return ((open_clip.get_model_config(model_name) or {}).get("text_cfg", {}) or {}).get("hf_tokenizer_name", "")


TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.json")  # what a tokenizer's save_pretrained always writes


def folder_tokenizer(model_name: str, pretrained: str | None) -> str | None:
    """The model folder `pretrained` itself when it holds the model's hub tokenizer (open_clip's local-dir rule: a
    folder's HFTokenizer is read from that folder; blocklora's folder exports carry it), else None."""
    if not pretrained or not os.path.isdir(pretrained) or not hub_tokenizer(model_name):
        return None
    return pretrained if any(os.path.isfile(os.path.join(pretrained, f)) for f in TOKENIZER_FILES) else None


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
    from .base import check_padding

    try:
        tokenizer = cls(source, **kwargs)
    except (OSError, ValueError, ImportError) as e:  # a hub miss, a damaged folder, sentencepiece not installed
        raise BackboneError(f"cannot load the tokenizer of {model_name} from {source}: "
                            f"{str(e).strip().splitlines()[0][:200]}") from None
    check_padding(getattr(tokenizer, "tokenizer", None), model_name, source)  # HFTokenizer pads to max_length
    return tokenizer
