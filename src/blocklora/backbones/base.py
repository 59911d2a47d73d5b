"""The one interface every model family implements: encode images, encode texts, tokenize, transforms, export.

Training and evaluation code only ever talks to a Backbone; family modules (openclip.py, timm_towers.py, hf.py,
effnet_minilm.py) are the only code that knows a library's module names.
"""

from __future__ import annotations

import json
import os
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torchvision import transforms as T

from ..adapters.config import AdapterConfig
from ..adapters.inject import inject
from ..adapters.targeting import Targeting
from ..errors import BackboneError, ConfigError
from ..interop.export_forms import CLASSIFIER_FILE
from .activation import Activation, mlp_activation
from .fingerprint import fingerprint
from .preprocess import Preprocess


class Backbone(ABC):
    """A dual-encoder image-text model. `model` is the nn.Module that adapters are injected into.

    Subclasses set `family`, implement the abstract methods, `placement()` (where adapters go) and
    `tower_prefixes` (which parameter names belong to which tower), and load their tokenizer lazily in
    `_load_tokenizer()`, so that what needs no text (`blocklora params`, the probe) needs no tokenizer.
    """

    family: str = ""
    tower_prefixes: dict[str, tuple[str, ...]] = {}

    def __init__(self, name: str, model: nn.Module, pretrained: str | None, preprocess: Preprocess) -> None:
        self.name, self.model, self.pretrained, self.preprocess = name, model, pretrained, preprocess
        self._fingerprint: str | None = None
        self._tokenizer: Any = None
        # The resolved MLP activation (activation.py) of families where it is a choice the weights do not carry
        # (open_clip); None where the model's own config holds it.
        self.activation: Activation | None = None

    # -- identity --------------------------------------------------------------------------------------------------
    @property
    def fingerprint(self) -> str:
        """Hash of the frozen weights (backbones.fingerprint), computed once (before any adapter is merged)."""
        if self._fingerprint is None:
            self._fingerprint = fingerprint(self.model)
        return self._fingerprint

    def describe(self) -> dict[str, Any]:
        """What results.json records about the model: name, family, weights and their identity, activation, dtype,
        preprocessing and learned logit scale / bias."""
        out = {"name": self.name, "family": self.family, "pretrained": self.pretrained,
               "fingerprint": self.fingerprint, "image_size": self.image_size,
               "activation": mlp_activation(self.model), "weights_dtype": self.weights_dtype,
               "preprocess": self.preprocess.to_dict(), "logit_scale": self.learned_logit_scale(),
               "logit_bias": self.learned_logit_bias()}
        if self.activation is not None:
            out["quick_gelu"], out["activation_source"] = self.activation.quick_gelu, self.activation.source
        return out

    @property
    def weights_dtype(self) -> str:
        """The dtype(s) of the frozen floating-point weights, e.g. "float32" or "float16+float32"."""
        kinds = {str(p.dtype).replace("torch.", "") for n, p in self.model.named_parameters()
                 if p.is_floating_point() and ".lora_" not in n}
        return "+".join(sorted(kinds))

    @property
    def image_size(self) -> int:
        """Input resolution in pixels (square side), from the checkpoint's preprocessing (backbones/preprocess.py)."""
        return self.preprocess.size

    @property
    def mean(self) -> tuple[float, ...]:
        """Per-channel (R, G, B) normalisation mean of pixels in [0, 1], the checkpoint's own."""
        return self.preprocess.mean

    @property
    def std(self) -> tuple[float, ...]:
        """Per-channel (R, G, B) normalisation standard deviation of pixels in [0, 1], the checkpoint's own."""
        return self.preprocess.std

    @property
    def device(self) -> torch.device:
        """The device the model's parameters are on."""
        return next(self.model.parameters()).device

    def to(self, device: str | torch.device) -> Backbone:
        """Move the model (frozen weights and adapters) to `device`; returns self."""
        self.model.to(device)
        return self

    def cast_frozen(self, dtype: torch.dtype) -> None:
        """Store the frozen weights in `dtype` (adapter factors stay float32; normalisation layers float32).

        A half `dtype` is CLIP's own half-precision mode (OpenAI's convert_weights, open_clip's
        convert_weights_to_lp): with half weights the towers' residual streams run in half too, as CLIP-LoRA trains
        on GPU; normalisation layers keep fp32 parameters (CLIP computes LayerNorm in fp32 and casts back). Needs
        autocast of the same dtype. float32 also lifts a checkpoint stored in float16 / bfloat16 (parameters and
        buffers, e.g. BatchNorm statistics): CPU half kernels are slow and accumulate in half, which overflows.
        """
        _ = self.fingerprint  # of the weights as loaded (a bf16 copy would sample other values)
        half = (torch.float16, torch.bfloat16)
        norms = (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._NormBase)
        keep = {id(p) for m in self.model.modules() if isinstance(m, norms) for p in m.parameters()}
        for name, param in self.model.named_parameters():
            if not param.is_floating_point() or ".lora_" in name:
                continue
            target = torch.float32 if id(param) in keep or dtype == torch.float32 else dtype
            if param.dtype != target and (dtype != torch.float32 or param.dtype in half):
                param.data = param.data.to(target)
        if dtype == torch.float32:
            for buf in self.model.buffers():
                if buf.dtype in half:
                    buf.data = buf.data.to(torch.float32)

    # -- adapters --------------------------------------------------------------------------------------------------
    @abstractmethod
    def placement(self) -> Targeting:
        """Where adapters go in this model: per tower, one site per attention block (adapters/targeting.py)."""

    def inject(self, cfg: AdapterConfig) -> list[str]:
        """Inject adapters (adapters.inject) and prove with one probe forward that every one of them is called.

        Raises ConfigError, leaving the model unchanged, when the configuration does not fit or the model bypasses
        an adapted module (the error names the module's class). Returns the adapted module names.
        """
        return inject(self.model, cfg, self.placement(), probe=self.probe)

    @torch.no_grad()
    def probe(self) -> None:
        """One forward of each tower on the smallest input: one black image, one three-token prompt (no tokenizer)."""
        images = torch.zeros(1, 3, self.image_size, self.image_size, device=self.device)
        self.encode_images(images)
        self.encode_texts(move(self.probe_tokens(), self.device))

    @abstractmethod
    def probe_tokens(self) -> Any:
        """A one-prompt batch in encode_texts' format, built without the tokenizer (valid ids of this model)."""

    def tower_parameters(self, tower: str) -> Iterator[tuple[str, nn.Parameter]]:
        """(name, parameter) of every parameter of one tower ("vision" or "text"), adapters included."""
        prefixes = self.tower_prefixes.get(tower, ())
        for name, p in self.model.named_parameters():
            if name.startswith(prefixes):
                yield name, p

    # -- logits ----------------------------------------------------------------------------------------------------
    def learned_logit_scale(self) -> float | None:
        """exp(logit_scale) the checkpoint learned (train.logit_scale=auto), or None when it has none."""
        value = getattr(self.model, "logit_scale", None)
        return round(float(value.detach().float().exp().reshape(-1)[0]), 6) if isinstance(value, torch.Tensor) \
            else None

    def learned_logit_bias(self) -> float | None:
        """SigLIP's learned logit bias b (its sigmoid is sigma(scale * cos + b)), or None when it has none."""
        value = getattr(self.model, "logit_bias", None)
        return round(float(value.detach().float().reshape(-1)[0]), 6) if isinstance(value, torch.Tensor) else None

    # -- images ----------------------------------------------------------------------------------------------------
    def train_transform(self, scale_min: float = 0.08, flip: bool = True) -> T.Compose:
        """CLIP-LoRA's augmentation with this model's interpolation and normalisation (Preprocess.train_transform)."""
        return self.preprocess.train_transform(scale_min, flip)

    def eval_transform(self) -> T.Compose:
        """This model's own evaluation preprocessing (Preprocess.eval_transform)."""
        return self.preprocess.eval_transform()

    @abstractmethod
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) normalised pixels -> (N, D) image embeddings (not L2-normalised)."""

    # -- texts -----------------------------------------------------------------------------------------------------
    @property
    def tokenizer(self) -> Any:
        """The tokenizer, loaded on first use. Raises BackboneError (one line: which tokenizer, how to get it)."""
        if self._tokenizer is None:
            self._tokenizer = self._load_tokenizer()
        return self._tokenizer

    @abstractmethod
    def _load_tokenizer(self) -> Any:
        """Load the tokenizer (offline: from the weights' folder, a cache, or the user's --tokenizer directory)."""

    @abstractmethod
    def tokenize(self, texts: Sequence[str]) -> Any:
        """Prompts -> whatever encode_texts takes (a tensor or a dict of tensors), on the CPU."""

    def clean_texts(self, texts: Sequence[str]) -> list[str]:
        """The prompts as tokenize hands them to the model's own tokenizer: what an export's classifier records, so
        that the stock tokenizer given its "prompts" gives the tokens blocklora scored with. As written here;
        a family that cleans prompts before its tokenizer (HFBackbone: SigLIP's canonicalization) overrides it."""
        return list(texts)

    @abstractmethod
    def encode_texts(self, tokens: Any) -> torch.Tensor:
        """Tokenized prompts -> (C, D) text embeddings (not L2-normalised)."""

    def encode_prompts(self, texts: Sequence[str]) -> torch.Tensor:
        """C prompts -> (C, D) text embeddings (not L2-normalised), tokenized and moved to the model's device."""
        return self.encode_texts(move(self.tokenize(texts), self.device))

    # -- memory ----------------------------------------------------------------------------------------------------
    def set_grad_checkpointing(self, enabled: bool = True) -> None:
        """Recompute block activations in backward (non-reentrant torch.utils.checkpoint, RNG state preserved, so
        the adapters' dropout masks are the same in the recomputation and gradients equal the plain run's)."""
        raise ConfigError(f"gradient checkpointing is not available for {self.family} models: drop "
                          "train.grad_checkpointing")

    # -- export ----------------------------------------------------------------------------------------------------
    @abstractmethod
    def export(self, state_dict: dict[str, torch.Tensor], path: str | os.PathLike,
               classifier: dict[str, Any] | None = None) -> list[str]:
        """Write a merged state dict in the family's own format at `path` (interop/export_forms.py), with `classifier`
        (trained.classifier: class names, template, logits, activation) where the format keeps metadata; returns the
        files written."""


def check_token_ids(ids: torch.Tensor, vocab_size: int, model: str, source: str) -> None:
    """Raise BackboneError when a tokenizer gives ids the text tower's embedding table (`vocab_size` rows) does not
    hold: the tokenizer is another model's (torch would fail inside the embedding with "index out of range")."""
    if vocab_size > 0 and ids.numel() and (int(ids.max()) >= vocab_size or int(ids.min()) < 0):
        bad = int(ids.max()) if int(ids.max()) >= vocab_size else int(ids.min())
        raise BackboneError(f"the tokenizer of {model} ({source}) gives token id {bad}, but the text tower's "
                            f"vocabulary has {vocab_size} tokens (ids 0..{vocab_size - 1}): the tokenizer is another "
                            "model's; pass the checkpoint's own tokenizer (--tokenizer DIR)")


def check_padding(tokenizer: Any, model: str, source: str) -> None:
    """Raise BackboneError when a transformers tokenizer has no padding token: prompts are padded to one length
    (the model's own processor pads them too, and refuses such a tokenizer with the same reason)."""
    if getattr(tokenizer, "pad_token", "") is None:
        raise BackboneError(f"the tokenizer of {model} ({source}) has no padding token (pad_token in its "
                            "tokenizer_config.json / special_tokens_map.json), so prompts cannot be padded to one "
                            "length: pass the checkpoint's own tokenizer (--tokenizer DIR)")


def write_classifier(folder: str | os.PathLike, classifier: dict[str, Any] | None) -> None:
    """An export folder's blocklora_classifier.json (interop/export_forms.py): what a stock loader needs to classify."""
    if classifier is not None:
        (Path(folder) / CLASSIFIER_FILE).write_text(json.dumps(classifier, indent=2) + "\n")


def move(tokens: Any, device: torch.device | str) -> Any:
    """Tokens (a tensor or a dict of tensors) to `device`."""
    if isinstance(tokens, dict):
        return {k: v.to(device) for k, v in tokens.items()}
    return tokens.to(device)
