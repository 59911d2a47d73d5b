"""transformers CLIP (CLIPModel, CLIPVisionModel, CLIPTextModel, ...): where the attention lives.

vision: vision_model.encoder.layers.{i}.self_attn      text: text_model.encoder.layers.{i}.self_attn
Each self_attn (CLIPAttention) holds four Linears: q_proj, k_proj, v_proj, out_proj.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from ..errors import AdapterMismatchError, BackboneError
from .activation import Activation
from .base import Backbone
from .network import hub_reachable
from .sites import AttentionSite

TOWER_PREFIXES = {"vision": "vision_model.encoder.layers", "text": "text_model.encoder.layers"}
LINEARS = (("q", "q_proj"), ("k", "k_proj"), ("v", "v_proj"), ("o", "out_proj"))


def attention_sites(model: nn.Module) -> dict[str, list[AttentionSite]] | None:
    out: dict[str, list[AttentionSite]] = {}
    for tower, prefix in TOWER_PREFIXES.items():
        try:
            layers = model.get_submodule(prefix)
        except AttributeError:
            continue
        if isinstance(layers, nn.ModuleList) and all(hasattr(layer, "self_attn") for layer in layers):
            out[tower] = [AttentionSite(tower, i, f"{prefix}.{i}.self_attn", "linears", LINEARS)
                          for i in range(len(layers))]
    return out or None


class HFClipBackbone(Backbone):
    """transformers CLIPModel from a local directory (config.json + weights, tokenizer, image processor) or hub id."""

    family = "transformers"

    def __init__(self, name: str, model: nn.Module, tokenizer, source: str) -> None:
        vc = model.config.vision_config
        mean, std = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
        processor = _image_processor(source)
        if processor is not None:
            mean, std = processor.image_mean, processor.image_std
        super().__init__(name, model, source, vc.image_size, mean, std)
        self.tokenizer = tokenizer
        self.model.eval()

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        return _tensor(self.model.get_image_features(pixel_values=images))

    def set_grad_checkpointing(self, enabled: bool = True) -> None:
        """transformers' per-layer checkpointing, non-reentrant: the frozen embeddings' output needs no gradient,
        and the reentrant variant would then pass none to the adapters inside the layers."""
        m = self.model
        if hasattr(m, "activation_checkpointing_enable"):  # transformers >= 5 (the old names warn)
            if enabled:
                m.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
            else:
                m.activation_checkpointing_disable()
        elif enabled:
            m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        else:
            m.gradient_checkpointing_disable()

    def tokenize(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        # padding=True pads to the longest prompt of the batch: with the causal mask and pooling at the EOS
        # token this is exact, and is the same cut as our open_clip path.
        # max_length: the position table's size. A tokenizer saved without model_max_length does not truncate
        # with truncation=True alone, and a longer prompt would overrun the position embeddings.
        out = self.tokenizer(list(texts), padding=True, truncation=True, return_tensors="pt",
                             max_length=self.model.config.text_config.max_position_embeddings)
        return {"input_ids": out["input_ids"], "attention_mask": out["attention_mask"]}

    def encode_texts(self, tokens: dict[str, torch.Tensor]) -> torch.Tensor:
        return _tensor(self.model.get_text_features(**tokens))

    def export(self, state_dict: dict[str, torch.Tensor], path: str | os.PathLike) -> list[str]:
        """A stock transformers directory: CLIPModel.from_pretrained(path) loads it (no blocklora needed)."""
        path = Path(path)
        self.model.save_pretrained(path, state_dict=state_dict)
        self.tokenizer.save_pretrained(path)
        processor = _image_processor(self.pretrained)
        if processor is not None:
            processor.save_pretrained(path)
        return sorted(str(p) for p in path.iterdir())


def _tensor(out) -> torch.Tensor:
    """transformers 5.x returns an output object (embedding in .pooler_output); 4.x a tensor."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def _image_processor(source: str | None):
    from transformers import CLIPImageProcessor

    if source is None:
        return None
    try:
        return CLIPImageProcessor.from_pretrained(source, local_files_only=os.path.isdir(source))
    except (OSError, ValueError):
        return None


def load(spec: str, quick_gelu: str = "auto", recorded_quick_gelu: bool | None = None) -> HFClipBackbone:
    """`spec` is a local directory or a hub id (the part after 'hf:').

    The MLP activation is the config's hidden_act (transformers records it with the weights); --quick-gelu yes/no
    overrides it in both towers, and an adapter's recorded activation must match it.
    """
    from transformers import AutoTokenizer, CLIPConfig, CLIPModel

    local = os.path.isdir(spec)
    if not local and (spec.startswith((".", "/", "~")) or os.path.sep in spec and spec.count("/") > 1):
        raise BackboneError(f"transformers model directory {spec} does not exist: pass a directory holding "
                            "config.json and model.safetensors, or a hub id")
    if not local and not hub_reachable():
        raise BackboneError(f"cannot download {spec} from the hub (no network): download it elsewhere "
                            "(save_pretrained) and pass --model hf:/path/to/dir")
    try:
        config = CLIPConfig.from_pretrained(spec, local_files_only=local)
    except (OSError, ValueError) as e:
        raise BackboneError(f"cannot load a transformers CLIP model from {spec}: {str(e).splitlines()[0][:200]}") \
            from None
    act = _activation(config, spec, quick_gelu, recorded_quick_gelu)
    try:
        model = CLIPModel.from_pretrained(spec, config=config, local_files_only=local)
        tokenizer = AutoTokenizer.from_pretrained(spec, local_files_only=local)
    except (OSError, ValueError) as e:
        raise BackboneError(f"cannot load a transformers CLIP model from {spec}: {str(e).splitlines()[0][:200]}") \
            from None
    backbone = HFClipBackbone(f"hf:{spec}", model, tokenizer, spec)
    backbone.activation = act
    return backbone


def _activation(config, spec: str, request: str, recorded: bool | None) -> Activation:
    """The towers' hidden_act as QuickGELU or not, after the request; sets it on `config`."""
    towers = (config.text_config, config.vision_config)
    stored = all(t.hidden_act == "quick_gelu" for t in towers)
    act = Activation(stored, f"{spec}/config.json (hidden_act)")
    if recorded is not None and recorded != stored:
        raise AdapterMismatchError(f"the adapter was trained with {'QuickGELU' if recorded else 'GELU'}, but "
                                   f"{act.source} says {towers[0].hidden_act}: pass the model it was trained on")
    if request in ("yes", "no") and (request == "yes") != stored:
        act = Activation(request == "yes", f"--quick-gelu {request} (the config says {towers[0].hidden_act})")
        for t in towers:
            t.hidden_act = "quick_gelu" if act.quick_gelu else "gelu"
    return act
