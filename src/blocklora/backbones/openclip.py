"""open_clip (and the OpenAI `clip` package): where the attention lives. Towers are ViTs of ResidualAttentionBlocks.

vision: visual.transformer.resblocks.{i}.attn      text: transformer.resblocks.{i}.attn (CLIP)
                                                    or text.transformer.resblocks.{i}.attn (CustomTextCLIP)
Each `attn` is an nn.MultiheadAttention (fused in_proj_weight; out_proj never called as a module). open_clip keeps
the blocks in an nn.ModuleList with batch-first attention; OpenAI's `clip` package (clip.model.CLIP) in an
nn.Sequential with sequence-first attention, which BlockLoRAMultiheadAttention reproduces as well.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from ..errors import BackboneError
from .activation import export_metadata, local_dir_config, resolve
from .base import Backbone, is_torchscript_archive
from .network import hub_reachable
from .sites import AttentionSite

TOWER_PREFIXES = {"vision": ("visual.transformer.resblocks",), "text": ("transformer.resblocks",
                                                                        "text.transformer.resblocks")}


def _blocks(model: nn.Module, prefix: str) -> nn.Module | None:
    try:
        blocks = model.get_submodule(prefix)
    except AttributeError:
        return None
    if isinstance(blocks, (nn.ModuleList, nn.Sequential)) and all(hasattr(b, "attn") for b in blocks):
        return blocks
    return None


def attention_sites(model: nn.Module) -> dict[str, list[AttentionSite]] | None:
    if not (hasattr(model, "visual") and hasattr(model, "encode_text")):
        return None
    out: dict[str, list[AttentionSite]] = {}
    for tower, prefixes in TOWER_PREFIXES.items():
        for prefix in prefixes:
            blocks = _blocks(model, prefix)
            if blocks is not None:
                out[tower] = [AttentionSite(tower, i, f"{prefix}.{i}.attn", "fused") for i in range(len(blocks))]
                break
    return out or None


log = logging.getLogger(__name__)

# A tiny, randomly initialised CLIP (about 3.3M parameters: 32 px images, 8 px patches, 2+2 blocks of width 64,
# the real 49,408-token BPE tokenizer) so that every command can be smoke-tested on a CPU in seconds.
TINY_CLIP = dict(
    embed_dim=64,
    vision_cfg=dict(image_size=32, patch_size=8, width=64, layers=2, head_width=16),
    text_cfg=dict(context_length=77, vocab_size=49408, width=64, heads=4, layers=2),
)


class OpenClipBackbone(Backbone):
    family = "open_clip"

    def __init__(self, name: str, model: torch.nn.Module, pretrained: str | None, tokenizer_name: str) -> None:
        import open_clip

        cfg = getattr(model.visual, "preprocess_cfg", {})
        size = getattr(model.visual, "image_size", 224)
        size = size[0] if isinstance(size, (tuple, list)) else size
        super().__init__(name, model, pretrained, size, cfg.get("mean", open_clip.OPENAI_DATASET_MEAN),
                         cfg.get("std", open_clip.OPENAI_DATASET_STD))
        self.tokenizer = open_clip.get_tokenizer(tokenizer_name)
        self.model.eval()

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(images)

    def set_grad_checkpointing(self, enabled: bool = True) -> None:
        # open_clip 3.x checkpoints each residual block with use_reentrant=False (gradients reach the adapters
        # although the block's input needs none); encode_texts below calls the same transformer, so it applies.
        self.model.set_grad_checkpointing(enabled)

    def tokenize(self, texts: Sequence[str]) -> torch.Tensor:
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
        """Stock open_clip weights that carry their activation (activation.export_metadata), by `path`'s form:

        NAME.safetensors   a state dict, the activation in the safetensors metadata
        NAME.pt / other    torch.save({"state_dict": ..., "blocklora_export": metadata}); open_clip reads "state_dict"
        DIR (no suffix)    open_clip's local-dir format: open_clip_config.json (model_cfg with quick_gelu,
                           preprocess_cfg) + open_clip_model.safetensors; `open_clip.create_model("local-dir:DIR")`
                           builds the right activation with no flag at all
        For the two files, stock open_clip needs the -quickgelu name or force_quick_gelu (export_metadata's hint).
        """
        from safetensors.torch import save_file

        path = Path(path)
        tensors = {k: v.detach().cpu().contiguous() for k, v in state_dict.items()}
        meta = export_metadata(self.name, self.activation.quick_gelu)
        if path.suffix == ".safetensors":
            save_file(tensors, str(path), metadata=meta)
            return [str(path)]
        if path.suffix:
            torch.save({"state_dict": tensors, "blocklora_export": meta}, path)
            return [str(path)]
        path.mkdir(parents=True)
        config = {"model_cfg": {**self.model_config(), "quick_gelu": self.activation.quick_gelu},
                  "preprocess_cfg": dict(getattr(self.model.visual, "preprocess_cfg", {}))}
        (path / "open_clip_config.json").write_text(json.dumps(config, indent=2) + "\n")
        save_file(tensors, str(path / "open_clip_model.safetensors"), metadata=meta)
        return sorted(str(p) for p in path.iterdir())

    def model_config(self) -> dict:
        """The architecture as open_clip's model_cfg (its JSON config of the name; TINY_CLIP for tiny-clip)."""
        import copy

        import open_clip

        cfg = TINY_CLIP if self.name == "tiny-clip" else open_clip.get_model_config(self.name)
        return copy.deepcopy(dict(cfg))


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


def load(name: str, pretrained: str | None, quick_gelu: str = "auto",
         recorded_quick_gelu: bool | None = None) -> OpenClipBackbone:
    """open_clip model `name` with weights from a tag, a local file or export folder, or none (random init).

    The MLP activation is resolved once (activation.resolve: the request, what the weights say, the model name) and
    built explicitly, whatever open_clip's own default for the name is; `recorded_quick_gelu` (an adapter's record)
    must agree with the weights.
    """
    import open_clip

    none = pretrained in (None, "none")
    if name != "tiny-clip" and name not in open_clip.list_models():
        raise BackboneError(f"unknown model {name!r}: use an open_clip name (e.g. ViT-B-16, ViT-B-32, ViT-L-14), "
                            "tiny-clip, effnet-minilm, or hf:PATH_OR_ID")
    weights, preprocess = (None, {}) if none else _weights_file(name, pretrained)
    act = resolve(name, None if none else pretrained, quick_gelu, recorded_quick_gelu)
    log.debug("%s: %s (from %s)", name, "QuickGELU" if act.quick_gelu else "GELU", act.source)
    if name == "tiny-clip":
        torch_state = torch.random.get_rng_state()
        torch.manual_seed(0)  # the same random weights every time: adapters trained on it can be reloaded
        model = open_clip.CLIP(**TINY_CLIP, quick_gelu=act.quick_gelu)
        torch.random.set_rng_state(torch_state)
        tokenizer = "ViT-B-32"
    else:
        # force_quick_gelu sets the config's flag (and keeps open_clip's tag check quiet); the model keyword
        # overrides it both ways, so a -quickgelu name with --quick-gelu no builds GELU as asked.
        model = open_clip.create_model(name, pretrained=None, force_quick_gelu=act.quick_gelu,
                                       force_preprocess_cfg=preprocess, quick_gelu=act.quick_gelu)
        tokenizer = name
    if weights is not None:
        _read_checkpoint_into(model, weights, name)
    source = None if none else (str(Path(pretrained).resolve()) if weights == pretrained or os.path.isdir(pretrained)
                                else pretrained)
    backbone = OpenClipBackbone(name, model, source, tokenizer)
    backbone.activation = act
    return backbone


def _weights_file(name: str, pretrained: str) -> tuple[str, dict]:
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
        _read_needs_file(pretrained)
        return pretrained, {}
    tags = open_clip.list_pretrained_tags_by_model(name)
    if pretrained not in tags:
        raise BackboneError(f"unknown pretrained tag {pretrained!r} for {name}: known tags are "
                            f"{', '.join(tags) or 'none'}, or pass a local checkpoint file")
    cfg = open_clip.get_pretrained_cfg(name, pretrained)
    cached = _cached_weights(cfg)
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


