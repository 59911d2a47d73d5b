"""open_clip (and the OpenAI `clip` package): where adapters go, the tokenizer, the preprocessing.

vision: visual.transformer.resblocks.{i}.attn (ViT: nn.MultiheadAttention, fused in_proj_weight, out_proj never
        called as a module), visual.trunk.* (a timm tower: SigLIP, PE-Core, EVA-02, MobileCLIP; timm_towers.py),
        or visual.attnpool (ModifiedResNet / RN50: its AttentionPool2d passes its Linears' weights to
        F.multi_head_attention_forward, so inject's probe refuses that tower by name)
text:   transformer.resblocks.{i}.attn (CLIP) or text.transformer.resblocks.{i}.attn (CustomTextCLIP), or the BERT
        layers of a transformers text tower (text.transformer: open_clip's HFTextEncoder, e.g. XLM-R)
open_clip keeps the blocks in an nn.ModuleList with batch-first attention; OpenAI's `clip` package in an
nn.Sequential with sequence-first attention, which BlockLoRAMultiheadAttention reproduces as well.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..adapters.sites import FUSED_MHA, LINEARS, Placement, Site
from ..errors import BackboneError
from .base import Backbone, is_torchscript_archive
from .hf import bert_sites
from .network import hub_reachable
from .preprocess import OPENAI_MEAN, OPENAI_STD, Preprocess
from .timm_towers import trunk_sites

ATTENTION_POOL = (("q", "q_proj"), ("k", "k_proj"), ("v", "v_proj"), ("o", "c_proj"))  # ModifiedResNet.attnpool


def _resblock_sites(model: nn.Module, prefix: str, tower: str) -> tuple[Site, ...]:
    try:
        blocks = model.get_submodule(prefix)
    except AttributeError:
        return ()
    if isinstance(blocks, (nn.ModuleList, nn.Sequential)) and all(hasattr(b, "attn") for b in blocks):
        return tuple(Site(tower, i, f"{prefix}.{i}.attn", FUSED_MHA) for i in range(len(blocks)))
    return ()


def placement(model: nn.Module) -> Placement | None:
    """Sites of an open_clip CLIP / CustomTextCLIP / CoCa (or OpenAI clip) model; None for any other model."""
    if not (hasattr(model, "visual") and hasattr(model, "encode_text")):
        return None
    visual = model.visual
    vision = _resblock_sites(model, "visual.transformer.resblocks", "vision")
    if not vision and isinstance(getattr(visual, "trunk", None), nn.Module):
        vision = trunk_sites(visual.trunk, "visual.trunk", "vision")
    if not vision and isinstance(getattr(visual, "attnpool", None), nn.Module):
        vision = (Site("vision", 0, "visual.attnpool", LINEARS, ATTENTION_POOL),)
    text = _resblock_sites(model, "transformer.resblocks", "text") or \
        _resblock_sites(model, "text.transformer.resblocks", "text")
    text_module = getattr(model, "text", model)
    if not text and isinstance(getattr(text_module, "transformer", None), nn.Module):
        text = bert_sites(text_module.transformer, "text.transformer", "text")
    if not vision and not text:  # not an open_clip tree
        return None
    trunk = getattr(visual, "trunk", None)
    towers = {"vision": type(visual).__name__ + (f" around a timm {type(trunk).__name__}" if trunk is not None else ""),
              "text": type(getattr(model, "text", getattr(model, "transformer", model))).__name__}
    return Placement("open_clip", {"vision": vision, "text": text}, towers)


log = logging.getLogger(__name__)

# A tiny, randomly initialised CLIP (about 3.3M parameters: 32 px images, 8 px patches, 2+2 blocks of width 64,
# the real 49,408-token BPE tokenizer) so that every command can be smoke-tested on a CPU in seconds.
TINY_CLIP = dict(
    embed_dim=64,
    vision_cfg=dict(image_size=32, patch_size=8, width=64, layers=2, head_width=16),
    text_cfg=dict(context_length=77, vocab_size=49408, width=64, heads=4, layers=2),
)


class OpenClipBackbone(Backbone):
    """An open_clip model. `tokenizer_name`: the model name whose tokenizer it uses; `tag`: the pretrained tag the
    weights come from (their preprocessing); `tokenizer_dir`: a local copy of a tokenizer that comes from a hub."""

    family = "open_clip"

    def __init__(self, name: str, model: torch.nn.Module, pretrained: str | None, tokenizer_name: str,
                 tag: str | None = None, tokenizer_dir: str | None = None) -> None:
        super().__init__(name, model, pretrained, preprocess_for(name, model, tag, pretrained is not None))
        self.tokenizer_name, self.tokenizer_dir = tokenizer_name, tokenizer_dir
        text_root = "text." if isinstance(getattr(model, "text", None), nn.Module) else ""
        self.tower_prefixes = {"vision": ("visual.",), "text": (text_root,) if text_root else (
            "transformer.", "token_embedding.", "positional_embedding", "ln_final.", "text_projection")}
        self.model.eval()

    def placement(self) -> Placement:
        return placement(self.model)

    def probe_tokens(self) -> torch.Tensor:
        """(1, context_length) ids: start, one word, end-of-text (the largest id: open_clip pools at argmax)."""
        m = getattr(self.model, "text", self.model)
        context, vocab = int(m.positional_embedding.shape[0]), int(self.model.vocab_size)
        tokens = torch.zeros(1, context, dtype=torch.long)
        tokens[0, :3] = torch.tensor([vocab - 2, 1, vocab - 1])
        return tokens

    def _load_tokenizer(self) -> Any:
        return load_tokenizer(self.tokenizer_name, self.tokenizer_dir)

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(images)

    def set_grad_checkpointing(self, enabled: bool = True) -> None:
        # open_clip 3.x checkpoints each residual block with use_reentrant=False (gradients reach the adapters
        # although the block's input needs none); encode_texts below calls the same transformer, so it applies.
        self.model.set_grad_checkpointing(enabled)

    def tokenize(self, texts: Sequence[str]) -> torch.Tensor:
        """(C, context_length) ids, padded to the fixed length (SigLIP pools its last position: it needs that)."""
        return self.tokenizer(list(texts))

    def encode_texts(self, tokens: torch.Tensor) -> torch.Tensor:
        """CLIP.encode_text on prompts cut after the batch's last end-of-text token.

        The text tower is causal and reads its output at the end-of-text position, so the padding after it never
        reaches the output: cutting there is exact and saves up to 77/L of the text tower's work.
        """
        m = self.model
        pool = getattr(m, "text_pool_type", None)
        if pool not in ("argmax", "eos") or not hasattr(m, "token_embedding") or getattr(m, "attn_mask", None) is None:
            return m.encode_text(tokens)  # not a causal CLIP text tower: no safe cut
        if pool == "argmax":
            last = tokens.argmax(dim=-1)
        else:
            last = (tokens == m.text_eos_id).int().argmax(dim=-1)
        length = int(last.max()) + 1
        tokens = tokens[:, :length]
        cast = m.transformer.get_cast_dtype()
        x = m.token_embedding(tokens).to(cast) + m.positional_embedding[:length].to(cast)  # (C, L, width)
        x = m.transformer(x, attn_mask=m.attn_mask[:length, :length])
        x = m.ln_final(x)
        x = x[torch.arange(x.shape[0], device=x.device), last]  # (C, width) at end-of-text
        if isinstance(m.text_projection, torch.nn.Linear):
            return m.text_projection(x)
        return x @ m.text_projection if m.text_projection is not None else x

    def export(self, state_dict: dict[str, torch.Tensor], path: str | os.PathLike) -> list[str]:
        """A plain open_clip state dict: `open_clip.create_model(name, pretrained=path)` loads it."""
        from safetensors.torch import save_file

        path = Path(path)
        tensors = {k: v.detach().cpu().contiguous() for k, v in state_dict.items()}
        if path.suffix == ".safetensors":
            save_file(tensors, str(path))
        else:
            torch.save(tensors, path)
        return [str(path)]


def _read_checkpoint_into(model: torch.nn.Module, path: str, name: str) -> None:
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


def load(name: str, pretrained: str | None, quick_gelu: str = "auto", tokenizer: str | None = None
         ) -> OpenClipBackbone:
    """open_clip model `name` with weights from a tag, a local file, or none (random init).

    `tokenizer`: a local directory holding the model's tokenizer when it comes from a hub (SigLIP's). Raises
    BackboneError (one line) for an unknown name or tag, a missing or mismatched file, or weights out of reach.
    """
    import open_clip

    if name == "tiny-clip":
        if pretrained not in (None, "none"):
            _read_needs_file(pretrained)
        with _seeded(0):  # the same random weights every time: adapters trained on it can be reloaded
            model = open_clip.CLIP(**TINY_CLIP, quick_gelu=quick_gelu == "yes")
        if pretrained not in (None, "none"):
            _read_checkpoint_into(model, pretrained, name)
        return OpenClipBackbone(name, model, pretrained if pretrained not in (None, "none") else None, "ViT-B-32",
                                tokenizer_dir=tokenizer)
    if name not in open_clip.list_models():
        raise BackboneError(f"unknown model {name!r}: use an open_clip name (e.g. ViT-B-16, ViT-B-32, ViT-L-14), "
                            "tiny-clip, effnet-minilm, or hf:PATH_OR_ID")
    if pretrained in (None, "none"):
        with _seeded(0):  # the same random weights every time: adapters trained on them can be reloaded
            model = open_clip.create_model(name, pretrained=None)
        return OpenClipBackbone(name, model, None, name, tokenizer_dir=tokenizer)
    if os.path.sep in pretrained or os.path.exists(pretrained) or Path(pretrained).suffix:
        _read_needs_file(pretrained)
        force = quick_gelu == "yes" or (quick_gelu == "auto" and not name.endswith("-quickgelu") and (
            "openai" in Path(pretrained).name.lower() or is_torchscript_archive(pretrained)))
        if force:
            log.info("using QuickGELU for %s (OpenAI weights); override with quick_gelu=no", pretrained)
        model = open_clip.create_model(name, pretrained=None, force_quick_gelu=force)
        _read_checkpoint_into(model, pretrained, name)
        return OpenClipBackbone(name, model, str(Path(pretrained).resolve()), name, tokenizer_dir=tokenizer)
    tags = open_clip.list_pretrained_tags_by_model(name)
    if pretrained not in tags:
        raise BackboneError(f"unknown pretrained tag {pretrained!r} for {name}: known tags are "
                            f"{', '.join(tags) or 'none'}, or pass a local checkpoint file")
    if not hub_reachable():  # no network: a cached copy or a clear error now, not minutes of retries
        cached = _cached_weights(open_clip.get_pretrained_cfg(name, pretrained))
        if cached is None:
            raise BackboneError(f"cannot get pretrained weights {name}/{pretrained} (no network, not in the cache): "
                                f"download the checkpoint elsewhere and pass the local file, e.g. --pretrained "
                                f"/path/{name}.safetensors")
        qg = quick_gelu == "yes" or (quick_gelu == "auto" and open_clip.get_pretrained_cfg(name, pretrained).get(
            "quick_gelu", False))
        model = open_clip.create_model(name, pretrained=None, force_quick_gelu=qg)
        _read_checkpoint_into(model, cached, name)
        return OpenClipBackbone(name, model, pretrained, name, pretrained, tokenizer)
    try:
        model = open_clip.create_model(name, pretrained=pretrained, force_quick_gelu=quick_gelu == "yes")
    except Exception as e:  # noqa: BLE001
        raise BackboneError(f"cannot get pretrained weights {name}/{pretrained} ({str(e).splitlines()[0][:160]}): "
                            f"download the checkpoint elsewhere and pass the local file, e.g. --pretrained "
                            f"/path/{name}.safetensors") from None
    return OpenClipBackbone(name, model, pretrained, name, pretrained, tokenizer)


@contextlib.contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """Random initialisation from `seed`, the global torch RNG left as it was."""
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        yield
    finally:
        torch.random.set_rng_state(state)


def _cached_weights(cfg: dict) -> str | None:
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


def _read_needs_file(path: str) -> None:
    if not os.path.isfile(path):
        raise BackboneError(f"checkpoint file {path} does not exist: pass an existing file, a pretrained tag, "
                            "or none for random weights")




# -- preprocessing and tokenizer ------------------------------------------------------------------------------------
def preprocess_for(name: str, model: nn.Module, tag: str | None, has_weights: bool) -> Preprocess:
    """The preprocessing of the weights: the tag's pretrained config; without a tag (a file, random weights), the
    pretrained configs of `name` when all its tags agree (SigLIP: 0.5 / 0.5 and squash; MobileCLIP: no
    normalisation), else open_clip's default for the architecture (OpenAI CLIP's)."""
    import open_clip

    size = getattr(model.visual, "image_size", 224)
    size = int(size[0] if isinstance(size, (tuple, list)) else size)
    known = open_clip.list_models()
    base = name.removesuffix("-quickgelu")
    tags = [tag] if tag else sorted({t for n in {name, base} if n in known for t in
                                     open_clip.list_pretrained_tags_by_model(n)})
    found = {}
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
        where = f"tag {tag}" if tag else f"its {len(used)} pretrained tag(s), which all agree"
        return Preprocess(size, mean, std, interpolation, resize_mode, f"open_clip's pretrained config of {name} "
                                                                       f"({where})")
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
