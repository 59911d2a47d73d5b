"""The MultiheadAttention replacement computes exactly what the stock module computes."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from blocklora import AdapterConfig, BlockLoRAMultiheadAttention, inject
from conftest import example_inputs, make_openclip, randomize_adapters

E, H = 48, 4


def _stock(batch_first: bool, seed: int = 0) -> nn.MultiheadAttention:
    torch.manual_seed(seed)
    mha = nn.MultiheadAttention(E, H, batch_first=batch_first)
    with torch.no_grad():
        mha.in_proj_bias.normal_()
        mha.out_proj.bias.normal_()
    return mha.train()  # training mode: the stock module takes its general (non fast-path) route


def _masks(l: int, n: int):
    causal = torch.full((l, l), float("-inf")).triu_(1)
    bool_mask = torch.rand(l, l, generator=torch.Generator().manual_seed(1)) > 0.7
    bool_mask.fill_diagonal_(False)
    kpm = torch.zeros(n, l, dtype=torch.bool)
    kpm[0, -2:] = True
    per_head = torch.randn(n * H, l, l, generator=torch.Generator().manual_seed(2))
    return {"none": {}, "causal": {"attn_mask": causal}, "bool": {"attn_mask": bool_mask},
            "padding": {"key_padding_mask": kpm}, "per_head": {"attn_mask": per_head},
            "is_causal": {"attn_mask": causal, "is_causal": True}}


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("mask", ["none", "causal", "bool", "padding", "per_head", "is_causal"])
def test_untrained_replacement_equals_stock(batch_first, mask):
    stock = _stock(batch_first)
    ours = BlockLoRAMultiheadAttention(copy.deepcopy(stock), "qkvo", AdapterConfig(dropout=0.25)).train()
    n, l = 3, 9
    x = torch.randn((n, l, E) if batch_first else (l, n, E))
    kw = _masks(l, n)[mask]
    expected = stock(x, x, x, need_weights=False, **kw)[0]
    got, weights = ours(x, x, x, need_weights=False, **kw)
    assert weights is None
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("letters", ["qkvo", "qv", "k", "o"])
def test_adapted_replacement_equals_stock_with_updated_weights(batch_first, letters):
    """With B != 0, outputs equal the stock module whose weights carry the dense update: adapters are live."""
    stock = _stock(batch_first)
    ours = BlockLoRAMultiheadAttention(copy.deepcopy(stock), letters, AdapterConfig(n_blocks=4, dropout=0.0))
    randomize_adapters(ours, std=0.2)
    updated = copy.deepcopy(stock)
    with torch.no_grad():
        for p in letters:
            if p == "o":
                updated.out_proj.weight += ours.delta_weight("o")
            else:
                i = "qkv".index(p)
                updated.in_proj_weight[i * E:(i + 1) * E] += ours.delta_weight(p)
    x = torch.randn((2, 7, E) if batch_first else (7, 2, E))
    mask = torch.full((7, 7), float("-inf")).triu_(1)
    expected = updated(x, x, x, need_weights=False, attn_mask=mask)[0]
    got = ours(x, x, x, need_weights=False, attn_mask=mask)[0]
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(got, stock(x, x, x, need_weights=False, attn_mask=mask)[0], atol=1e-3)
    plain = ours(x, x, x, need_weights=False, attn_mask=mask)[0]
    ours.merge()  # merged forward == unmerged forward
    torch.testing.assert_close(ours(x, x, x, need_weights=False, attn_mask=mask)[0], plain, rtol=1e-5, atol=1e-5)


def test_cross_attention_inputs():
    stock = _stock(True)
    ours = BlockLoRAMultiheadAttention(copy.deepcopy(stock), "qkv", AdapterConfig(dropout=0.0))
    q, kv = torch.randn(2, 5, E), torch.randn(2, 8, E)
    torch.testing.assert_close(ours(q, kv, kv)[0], stock(q, kv, kv, need_weights=False)[0], rtol=1e-5, atol=1e-5)


def test_openclip_attention_class_layout():
    """open_clip's own Attention class (same parameters, called as attn(x, attn_mask), returns a tensor)."""
    from open_clip.transformer import Attention

    torch.manual_seed(0)
    stock = Attention(E, H).train()
    ours = BlockLoRAMultiheadAttention(copy.deepcopy(stock), "qkv", AdapterConfig(dropout=0.0))
    x = torch.randn(2, 6, E)
    mask = torch.full((6, 6), float("-inf")).triu_(1)
    torch.testing.assert_close(ours(x, attn_mask=mask), stock(x, attn_mask=mask), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("batch_first", [True, False])
def test_openclip_towers_untrained_adapters_give_original_features(batch_first):
    model = make_openclip(batch_first=batch_first)
    images, tokens = example_inputs()
    with torch.no_grad():
        img0, txt0 = model.encode_image(images), model.encode_text(tokens)
    inject(model, AdapterConfig(projections="qkvo"))
    with torch.no_grad():
        torch.testing.assert_close(model.encode_image(images), img0, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(model.encode_text(tokens), txt0, rtol=1e-5, atol=1e-5)
    randomize_adapters(model)
    with torch.no_grad():
        assert not torch.allclose(model.encode_image(images), img0, atol=1e-3)
        assert not torch.allclose(model.encode_text(tokens), txt0, atol=1e-3)


def test_openclip_text_tower_stays_causal():
    """A change to a token after position t must not change the adapted features read at position t."""
    model = make_openclip()
    inject(model, AdapterConfig())
    randomize_adapters(model)
    _, tokens = example_inputs(n_txt=2)
    t2 = tokens.clone()
    t2[:, -1] = 7  # after the end-of-text token
    with torch.no_grad():
        torch.testing.assert_close(model.encode_text(tokens), model.encode_text(t2), rtol=1e-6, atol=1e-6)
