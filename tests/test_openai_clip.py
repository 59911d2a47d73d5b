"""OpenAI's own `clip` package model tree (clip.model.CLIP, as published on PyPI by clip-anytorch): residual blocks
in an nn.Sequential, sequence-first nn.MultiheadAttention, QuickGELU. The adapter contract on it (identity, merge,
round trip, stock export, training) is the "openai_clip_package" row of the matrix in test_contract.py."""

from __future__ import annotations

import pytest
import torch

from blocklora import AdapterConfig, BlockLoRAMultiheadAttention, inject
from blocklora.backbones.activation import mlp_activation
from conftest import randomize_adapters
from families import Unavailable, make_openai_clip


def tiny_openai_clip(seed: int = 0):
    try:
        return make_openai_clip(seed)
    except Unavailable as e:
        pytest.skip(str(e))


def inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(3, 3, 32, 32, generator=g)
    tokens = torch.randint(1, 126, (4, 16), generator=g)
    for i in range(4):  # end-of-text (the largest id: CLIP pools at argmax) at varied positions
        tokens[i, 4 + i] = 127
        tokens[i, 5 + i:] = 0
    return images, tokens


def test_the_package_tree_is_what_the_support_is_for():
    model = tiny_openai_clip()
    assert isinstance(model.transformer.resblocks, torch.nn.Sequential)
    attn = model.visual.transformer.resblocks[0].attn
    assert isinstance(attn, torch.nn.MultiheadAttention) and not attn.batch_first
    assert mlp_activation(model) == "quick_gelu"


def test_inject_finds_both_towers_in_the_sequential_tree():
    model = tiny_openai_clip()
    names = inject(model, AdapterConfig(n_blocks=4))
    assert names == [f"visual.transformer.resblocks.{i}.attn" for i in range(2)] + \
        [f"transformer.resblocks.{i}.attn" for i in range(2)]
    layer = model.transformer.resblocks[1].attn
    assert isinstance(layer, BlockLoRAMultiheadAttention) and not layer.batch_first


def test_gradients_reach_every_adapter_through_the_causal_text_tower():
    model = tiny_openai_clip()
    images, tokens = inputs(2)
    inject(model, AdapterConfig(n_blocks=4))
    randomize_adapters(model)
    img, txt = model.encode_image(images), model.encode_text(tokens)
    (img.square().sum() + txt.square().sum()).backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert len(grads) == 4 * 3 * 2 and all(g is not None and g.abs().sum() > 0 for g in grads.values())
