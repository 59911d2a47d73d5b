"""The one interface every model family implements: encode images, encode texts, tokenize, transforms, export.

Training and evaluation code only ever talks to a Backbone; family modules (openclip.py, hf.py,
effnet_minilm.py) are the only code that knows a library's module names.
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torchvision import transforms as T

if TYPE_CHECKING:
    from .activation import Activation


class Backbone(ABC):
    """A dual-encoder image-text model. `model` is the nn.Module that adapters are injected into."""

    family: str = ""

    def __init__(self, name: str, model: nn.Module, pretrained: str | None, image_size: int,
                 mean: Sequence[float], std: Sequence[float]) -> None:
        self.name, self.model, self.pretrained = name, model, pretrained
        self.image_size, self.mean, self.std = int(image_size), tuple(mean), tuple(std)
        self._fingerprint: str | None = None
        # The resolved MLP activation (activation.py) of families where it is a choice the weights do not carry
        # (open_clip); None where the model's own config holds it.
        self.activation: Activation | None = None

    # -- identity --------------------------------------------------------------------------------------------------
    @property
    def fingerprint(self) -> str:
        """Hash of the frozen weights, computed once (before any adapter is merged)."""
        if self._fingerprint is None:
            from ..adapters.io import fingerprint  # adapters import backbones.sites: keep this import lazy

            self._fingerprint = fingerprint(self.model)
        return self._fingerprint

    def describe(self) -> dict[str, Any]:
        from .activation import mlp_activation

        out = {"name": self.name, "family": self.family, "pretrained": self.pretrained,
               "fingerprint": self.fingerprint, "image_size": self.image_size,
               "activation": mlp_activation(self.model), "weights_dtype": self.weights_dtype}
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
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def to(self, device: str | torch.device) -> Backbone:
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

    # -- images ----------------------------------------------------------------------------------------------------
    def train_transform(self, scale_min: float = 0.08, flip: bool = True) -> T.Compose:
        """CLIP-LoRA's augmentation: RandomResizedCrop(scale (scale_min, 1), bicubic) + horizontal flip."""
        steps: list[Any] = [T.RandomResizedCrop(self.image_size, scale=(scale_min, 1.0),
                                                interpolation=T.InterpolationMode.BICUBIC)]
        if flip:
            steps.append(T.RandomHorizontalFlip(0.5))
        return T.Compose([*steps, T.Lambda(_rgb), T.ToTensor(), T.Normalize(self.mean, self.std)])

    def eval_transform(self) -> T.Compose:
        """Resize the short side (bicubic), center crop, normalise: CLIP's evaluation preprocessing."""
        return T.Compose([T.Resize(self.image_size, interpolation=T.InterpolationMode.BICUBIC),
                          T.CenterCrop(self.image_size), T.Lambda(_rgb), T.ToTensor(),
                          T.Normalize(self.mean, self.std)])

    @abstractmethod
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) normalised pixels -> (N, D) image embeddings (not L2-normalised)."""

    # -- texts -----------------------------------------------------------------------------------------------------
    @abstractmethod
    def tokenize(self, texts: Sequence[str]) -> Any:
        """Prompts -> whatever encode_texts takes (a tensor or a dict of tensors), on the CPU."""

    @abstractmethod
    def encode_texts(self, tokens: Any) -> torch.Tensor:
        """Tokenized prompts -> (C, D) text embeddings (not L2-normalised), cut to the batch's real length."""

    def encode_prompts(self, texts: Sequence[str]) -> torch.Tensor:
        return self.encode_texts(move(self.tokenize(texts), self.device))

    # -- memory ----------------------------------------------------------------------------------------------------
    def set_grad_checkpointing(self, enabled: bool = True) -> None:
        """Recompute block activations in backward (non-reentrant torch.utils.checkpoint, RNG state preserved, so
        the adapters' dropout masks are the same in the recomputation and gradients equal the plain run's)."""
        from ..errors import ConfigError

        raise ConfigError(f"gradient checkpointing is not available for {self.family} models: drop "
                          "train.grad_checkpointing")

    # -- export ----------------------------------------------------------------------------------------------------
    @abstractmethod
    def export(self, state_dict: dict[str, torch.Tensor], path: str | os.PathLike) -> list[str]:
        """Write a merged state dict in the family's own format at `path`; returns the files written."""


def _rgb(image: Any) -> Any:
    return image.convert("RGB") if hasattr(image, "convert") and image.mode != "RGB" else image


def move(tokens: Any, device: torch.device | str) -> Any:
    """Tokens (a tensor or a dict of tensors) to `device`."""
    if isinstance(tokens, dict):
        return {k: v.to(device) for k, v in tokens.items()}
    return tokens.to(device)


def is_torchscript_archive(path: str | os.PathLike) -> bool:
    """OpenAI's original CLIP checkpoints are TorchScript archives (a zip holding constants.pkl and code/)."""
    import zipfile

    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as z:
        return any(n.endswith("constants.pkl") or "/code/" in n for n in z.namelist()[:200])
