"""The adapter contract on OpenAI's own `clip` package model tree (clip.model.CLIP, as published on PyPI by
clip-anytorch): residual blocks in an nn.Sequential, sequence-first nn.MultiheadAttention, QuickGELU."""

from __future__ import annotations

import copy
import importlib.util
from pathlib import Path

import pytest
import torch

from blocklora import AdapterConfig, inject, load_adapter, merge, save_adapter
from blocklora.adapters.inject import merged_state_dict
from blocklora.adapters.layers import BlockLoRAMultiheadAttention
from blocklora.backbones.activation import mlp_activation
from conftest import randomize_adapters


def openai_clip_model():
    """clip/model.py of the installed package, loaded by path: the package's __init__ imports pkg_resources
    (setuptools), which recent environments no longer ship; the model module itself needs only torch."""
    spec = importlib.util.find_spec("clip")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("OpenAI's clip package (clip-anytorch) is not installed")
    path = Path(spec.submodule_search_locations[0]) / "model.py"
    module_spec = importlib.util.spec_from_file_location("openai_clip_model", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


def tiny_openai_clip(seed: int = 0):
    torch.manual_seed(seed)
    # embed_dim, image_resolution, vision_layers, vision_width, vision_patch_size, context_length, vocab_size,
    # transformer_width, transformer_heads, transformer_layers (clip.model.CLIP's positional signature)
    return openai_clip_model().CLIP(32, 32, 2, 64, 8, 16, 512, 48, 4, 2).eval()


def inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(3, 3, 32, 32, generator=g)
    tokens = torch.randint(1, 500, (4, 16), generator=g)
    for i in range(4):  # end-of-text (the largest id: CLIP pools at argmax) at varied positions
        tokens[i, 4 + i] = 511
        tokens[i, 5 + i:] = 0
    return images, tokens


def features(model, images, tokens):
    with torch.no_grad():
        return model.encode_image(images), model.encode_text(tokens)


def test_the_package_tree_is_what_the_support_is_for():
    model = tiny_openai_clip()
    assert isinstance(model.transformer.resblocks, torch.nn.Sequential)
    attn = model.visual.transformer.resblocks[0].attn
    assert isinstance(attn, torch.nn.MultiheadAttention) and not attn.batch_first
    assert mlp_activation(model) == "quick_gelu"


@pytest.mark.parametrize("n_blocks", [1, 4])
def test_inject_adapts_both_towers_and_starts_as_the_identity(n_blocks):
    model = tiny_openai_clip()
    stock = copy.deepcopy(model)
    images, tokens = inputs()
    names = inject(model, AdapterConfig(n_blocks=n_blocks, method="lora" if n_blocks == 1 else "block_lora"))
    assert names == [f"visual.transformer.resblocks.{i}.attn" for i in range(2)] + \
        [f"transformer.resblocks.{i}.attn" for i in range(2)]
    layer = model.transformer.resblocks[1].attn
    assert isinstance(layer, BlockLoRAMultiheadAttention) and not layer.batch_first
    for ours, ref in zip(features(model, images, tokens), features(stock, images, tokens)):
        torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)


def test_merge_export_and_reload_reproduce_the_adapted_model(tmp_path):
    model = tiny_openai_clip()
    images, tokens = inputs(1)
    inject(model, AdapterConfig(n_blocks=4, projections=("q", "k", "v", "o")))
    randomize_adapters(model)
    adapted = features(model, images, tokens)
    assert (adapted[1] - features(tiny_openai_clip(), images, tokens)[1]).abs().max() > 1e-3  # adapters act
    # a stock clip.model.CLIP loads the merged state dict strictly and computes the adapted features
    stock = tiny_openai_clip(seed=5)
    stock.load_state_dict(merged_state_dict(model), strict=True)
    for ours, ref in zip(features(stock, images, tokens), adapted):
        torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-5)
    # the adapter file round trip into a fresh model of the package
    save_adapter(model, tmp_path / "adapter", backbone="openai-clip-tiny")
    fresh = tiny_openai_clip()
    load_adapter(fresh, tmp_path / "adapter")
    for ours, ref in zip(features(fresh, images, tokens), adapted):
        torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)
    merge(fresh)
    for ours, ref in zip(features(fresh, images, tokens), adapted):
        torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-5)


def test_gradients_reach_every_adapter_through_the_causal_text_tower():
    model = tiny_openai_clip()
    images, tokens = inputs(2)
    inject(model, AdapterConfig(n_blocks=4))
    randomize_adapters(model)
    img, txt = model.encode_image(images), model.encode_text(tokens)
    (img.square().sum() + txt.square().sum()).backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert len(grads) == 4 * 3 * 2 and all(g is not None and g.abs().sum() > 0 for g in grads.values())
