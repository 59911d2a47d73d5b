"""open_clip (and the OpenAI `clip` package): where adapters go, and the backbone. Weights, preprocessing and
tokenizer sources: openclip_sources.py.

vision: visual.transformer.resblocks.{i}.attn (ViT: nn.MultiheadAttention, fused in_proj_weight, out_proj never
        called as a module), visual.trunk.* (a timm tower: SigLIP, PE-Core, EVA-02, MobileCLIP; timm_towers.py),
        or visual.attnpool (ModifiedResNet / RN50: its AttentionPool2d passes its Linears' weights to
        F.multi_head_attention_forward, so inject's probe refuses that tower by name)
text:   transformer.resblocks.{i}.attn (CLIP) or text.transformer.resblocks.{i}.attn (CustomTextCLIP), or the BERT
        layers of a transformers text tower (text.transformer: open_clip's HFTextEncoder, e.g. XLM-R)
open_clip keeps the blocks in an nn.ModuleList with batch-first attention; OpenAI's `clip` package (clip.model.CLIP)
in an nn.Sequential with sequence-first attention, which BlockLoRAMultiheadAttention reproduces as well.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..adapters.targeting import FUSED_MHA, LINEARS, Site, Targeting
from ..errors import BackboneError
from ..interop.export_forms import CLASSIFIER_KEY
from .activation import export_metadata, resolve
from .base import Backbone, check_token_ids, write_classifier
from .hf import bert_sites
from .openclip_sources import (
    folder_tokenizer,
    hub_tokenizer,
    load_tokenizer,
    open_clip_folder_hint,
    preprocess_for,
    read_checkpoint_into,
    weights_file,
)
from .preprocess import Preprocess
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


def placement(model: nn.Module) -> Targeting | None:
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
    return Targeting("open_clip", {"vision": vision, "text": text}, towers)


log = logging.getLogger(__name__)

# A tiny, randomly initialised CLIP (about 3.3M parameters: 32 px images, 8 px patches, 2+2 blocks of width 64,
# the real 49,408-token BPE tokenizer) so that every command can be smoke-tested on a CPU in seconds.
TINY_CLIP = dict(
    embed_dim=64,
    vision_cfg=dict(image_size=32, patch_size=8, width=64, layers=2, head_width=16),
    text_cfg=dict(context_length=77, vocab_size=49408, width=64, heads=4, layers=2),
)


class OpenClipBackbone(Backbone):
    """An open_clip model. `tokenizer_name`: the model name whose tokenizer it uses; `preprocess`: the weights'
    preprocessing (default: openclip_sources.preprocess_for); `tokenizer_dir`: a local copy of a tokenizer that
    comes from a hub."""

    family = "open_clip"

    def __init__(self, name: str, model: torch.nn.Module, pretrained: str | None, tokenizer_name: str,
                 preprocess: Preprocess | None = None, tokenizer_dir: str | None = None) -> None:
        preprocess = preprocess or preprocess_for(name, model, {}, None, pretrained is not None)
        super().__init__(name, model, pretrained, preprocess)
        self.tokenizer_name, self.tokenizer_dir = tokenizer_name, tokenizer_dir
        text_root = "text." if isinstance(getattr(model, "text", None), nn.Module) else ""
        self.tower_prefixes = {"vision": ("visual.",), "text": (text_root,) if text_root else (
            "transformer.", "token_embedding.", "positional_embedding", "ln_final.", "text_projection")}
        self.model.eval()

    def placement(self) -> Targeting:
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
        ids = self.tokenizer(list(texts))
        check_token_ids(ids, int(getattr(self.model, "vocab_size", 0) or 0), self.name,
                        self.tokenizer_dir or f"open_clip's tokenizer of {self.tokenizer_name}")
        return ids

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

    def export(self, state_dict: dict[str, torch.Tensor], path: str | os.PathLike,
               classifier: dict[str, Any] | None = None) -> list[str]:
        """Stock open_clip weights that carry their activation (activation.export_metadata) and `classifier` (as JSON
        under the metadata key blocklora.classifier, and in a folder as blocklora_classifier.json), by `path`'s form:

        NAME.safetensors   a state dict, the activation in the safetensors metadata
        NAME.pt / other    torch.save({"state_dict": ..., "blocklora_export": metadata}); open_clip reads "state_dict"
        DIR (no suffix)    open_clip's local-dir format: open_clip_config.json (model_cfg with quick_gelu,
                           preprocess_cfg) + open_clip_model.safetensors, and a hub tokenizer's files (SigLIP's:
                           open_clip.get_tokenizer("local-dir:DIR") reads them there); `open_clip.create_model(
                           "local-dir:DIR")` builds the right activation with no flag at all
        For the two files, stock open_clip needs the -quickgelu name or force_quick_gelu (export_metadata's hint).
        """
        from safetensors.torch import save_file

        path = Path(path)
        tensors = {k: v.detach().cpu().contiguous() for k, v in state_dict.items()}
        meta = export_metadata(self.name, self.activation.quick_gelu)
        if classifier is not None:
            meta[CLASSIFIER_KEY] = json.dumps(classifier)
        if path.suffix == ".safetensors":
            save_file(tensors, str(path), metadata=meta)
            return [str(path)]
        if path.suffix:
            torch.save({"state_dict": tensors, "blocklora_export": meta}, path)
            return [str(path)]
        path.mkdir(parents=True)
        p = self.preprocess  # the weights' own preprocessing, as resolved (not open_clip's default for the name)
        preprocess = {**dict(getattr(self.model.visual, "preprocess_cfg", {})), "size": p.size, "mean": list(p.mean),
                      "std": list(p.std), "interpolation": p.interpolation, "resize_mode": p.resize_mode,
                      "fill_color": p.fill_color}
        config = {"model_cfg": {**self.model_config(), "quick_gelu": self.activation.quick_gelu},
                  "preprocess_cfg": preprocess}
        (path / "open_clip_config.json").write_text(json.dumps(config, indent=2) + "\n")
        if hub_tokenizer(self.tokenizer_name):  # open_clip reads a local-dir's hub tokenizer from the folder itself
            self.tokenizer.tokenizer.save_pretrained(path)
        save_file(tensors, str(path / "open_clip_model.safetensors"), metadata=meta)
        write_classifier(path, classifier)
        return sorted(str(p) for p in path.iterdir())

    def model_config(self) -> dict:
        """The architecture as open_clip's model_cfg (its JSON config of the name; TINY_CLIP for tiny-clip)."""
        import copy

        import open_clip

        cfg = TINY_CLIP if self.name == "tiny-clip" else open_clip.get_model_config(self.name)
        return copy.deepcopy(dict(cfg))


def check_name(name: str) -> None:
    """Raises BackboneError unless `name` is tiny-clip or a model open_clip knows."""
    import open_clip

    if name != "tiny-clip" and name not in open_clip.list_models():
        schema, _, rest = name.partition(":")
        if schema == "local-dir":  # open_clip's own schemas: blocklora takes the architecture and the weights apart
            raise BackboneError(f"--model {name}: {rest} is {open_clip_folder_hint(rest)}")
        if schema == "hf-hub":
            raise BackboneError(f"--model {name}: pass the open_clip model name with --pretrained, a pretrained tag "
                                f"(open_clip.list_pretrained()) or the folder holding the files of {rest} "
                                "(open_clip_config.json and the weights)")
        raise BackboneError(f"unknown model {name!r}: use an open_clip name (e.g. ViT-B-16, ViT-B-32, ViT-L-14), "
                            "tiny-clip, effnet-minilm, or hf:PATH_OR_ID")


def default_pretrained(name: str) -> str | None:
    """The weights a model gets when --pretrained is not given: None (random init, the only weights tiny-clip has)
    for tiny-clip, else OpenAI's ("openai") where open_clip has them for this name. Raises BackboneError listing the
    model's tags when it has no OpenAI weights: there is no single right choice among the others."""
    import open_clip

    check_name(name)
    if name == "tiny-clip":
        return None
    tags = open_clip.list_pretrained_tags_by_model(name)
    if "openai" in tags:
        return "openai"
    if not tags:
        raise BackboneError(f"{name} has no pretrained weights in open_clip: pass a checkpoint file with "
                            "--pretrained FILE, or --pretrained none for random weights")
    raise BackboneError(f"{name} has no OpenAI weights (the default): pass --pretrained with one of its tags "
                        f"({', '.join(tags)}), a checkpoint file, or none")


def load(name: str, pretrained: str | None, quick_gelu: str = "auto", recorded_quick_gelu: bool | None = None,
         tokenizer: str | None = None, text: bool = False) -> OpenClipBackbone:
    """open_clip model `name` with weights from a tag, a local file or export folder, or none (random init).

    The MLP activation is resolved once (activation.resolve: the request, what the weights say, the model name) and
    built explicitly, whatever open_clip's own default for the name is; `recorded_quick_gelu` (an adapter's record)
    must agree with the weights. `tokenizer`: a local folder holding the model's tokenizer when it comes from a hub
    (SigLIP's); by default a model folder given as `pretrained` that holds it (folder_tokenizer). text=True loads the
    tokenizer first, before any weights: a command that encodes prompts then fails at once when a hub tokenizer is
    out of reach. Raises BackboneError (one line) for an unknown name or tag, a
    missing or mismatched file, a tokenizer or weights out of reach.
    """
    import open_clip

    none = pretrained in (None, "none")
    check_name(name)
    tokenizer_name = "ViT-B-32" if name == "tiny-clip" else name
    tokenizer = tokenizer or folder_tokenizer(tokenizer_name, None if none else pretrained)
    loaded_tokenizer = load_tokenizer(tokenizer_name, tokenizer) if text else None
    weights, declared = (None, {}) if none else weights_file(name, pretrained)
    act = resolve(name, None if none else pretrained, quick_gelu, recorded_quick_gelu)
    log.debug("%s: %s (from %s)", name, "QuickGELU" if act.quick_gelu else "GELU", act.source)
    with _seeded(0):  # random weights are the same every time: adapters trained on them can be reloaded
        if name == "tiny-clip":
            model = open_clip.CLIP(**TINY_CLIP, quick_gelu=act.quick_gelu)
        else:
            # force_quick_gelu sets the config's flag (and keeps open_clip's tag check quiet); the model keyword
            # overrides it both ways, so a -quickgelu name with --quick-gelu no builds GELU as asked.
            model = _create(name, act.quick_gelu, declared)
    if weights is not None:
        folder_config = Path(pretrained) / "open_clip_config.json" if os.path.isdir(pretrained) else None
        read_checkpoint_into(model, weights, name, folder_config)
    source = None if none else (str(Path(pretrained).resolve()) if weights == pretrained or os.path.isdir(pretrained)
                                else pretrained)
    label = None if none else (f"{pretrained}/open_clip_config.json" if os.path.isdir(pretrained) else
                               f"open_clip's pretrained config of {name}/{pretrained}")
    preprocess = preprocess_for(name, model, declared, label, has_weights=not none)
    backbone = OpenClipBackbone(name, model, source, tokenizer_name, preprocess, tokenizer)
    backbone._tokenizer = loaded_tokenizer
    backbone.activation = act
    return backbone


def _create(name: str, quick_gelu: bool, declared: dict) -> nn.Module:
    """open_clip.create_model without weights. A text tower that is a transformers model (text_cfg.hf_model_name,
    e.g. XLM-R) is built from that model's hub config: out of reach and not cached, a BackboneError saying so."""
    import open_clip

    try:
        # force_quick_gelu sets the config's flag (and keeps open_clip's tag check quiet); the model keyword
        # overrides it both ways, so a -quickgelu name with --quick-gelu no builds GELU as asked.
        return open_clip.create_model(name, pretrained=None, force_quick_gelu=quick_gelu,
                                      force_preprocess_cfg=declared, quick_gelu=quick_gelu)
    except OSError as e:
        hub = ((open_clip.get_model_config(name) or {}).get("text_cfg") or {}).get("hf_model_name")
        if not hub:
            raise
        why = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
        raise BackboneError(f"{name}'s text tower is the transformers model {hub}, built from its config on the "
                            f"Hugging Face hub, which could not be read ({why}): on a machine with a network run "
                            f"`python -c \"from transformers import AutoConfig; AutoConfig.from_pretrained('{hub}')\"` "
                            "and copy its Hugging Face cache here") from None


@contextlib.contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """Random initialisation from `seed`, the global torch RNG left as it was."""
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        yield
    finally:
        torch.random.set_rng_state(state)
