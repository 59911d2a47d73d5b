"""The fused q/k/v layers compute exactly what the stock modules compute: the nn.MultiheadAttention replacement
(open_clip, OpenAI CLIP) and the wrapped timm `qkv` Linear (SigLIP, PE-Core, MobileCLIP), which share their math."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from blocklora import AdapterConfig, BlockLoRAFusedQKV, BlockLoRAMultiheadAttention, ConfigError, inject
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
    ours = BlockLoRAMultiheadAttention(copy.deepcopy(stock), AdapterConfig(dropout=0.25), "qkvo").train()
    n, l = 3, 9
    x = torch.randn((n, l, E) if batch_first else (l, n, E))
    kw = _masks(l, n)[mask]
    expected = stock(x, x, x, need_weights=False, **kw)[0]
    got, weights = ours(x, x, x, need_weights=False, **kw)
    assert weights is None
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("projections", ["qkvo", "qv", "k", "o"])
def test_adapted_replacement_equals_stock_with_updated_weights(batch_first, projections):
    """With B != 0, outputs equal the stock module whose weights carry the dense update: adapters are live."""
    stock = _stock(batch_first)
    ours = BlockLoRAMultiheadAttention(copy.deepcopy(stock), AdapterConfig(n_blocks=4, dropout=0.0), projections)
    randomize_adapters(ours, std=0.2)
    updated = copy.deepcopy(stock)
    with torch.no_grad():
        for p in projections:
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


def _merged_pair(batch_first: bool, dropout: float = 0.0):
    """An adapted replacement (B != 0) and the stock module whose in_proj weight is W + the adapters' update."""
    torch.manual_seed(0)
    stock = nn.MultiheadAttention(E, H, dropout=dropout, batch_first=batch_first)
    with torch.no_grad():
        stock.in_proj_bias.normal_()
    ours = BlockLoRAMultiheadAttention(copy.deepcopy(stock), AdapterConfig(n_blocks=4, dropout=0.0), "qkv")
    randomize_adapters(ours, std=0.2)
    with torch.no_grad():
        for i, p in enumerate("qkv"):
            stock.in_proj_weight[i * E:(i + 1) * E] += ours.delta_weight(p)
    return stock.train(), ours.train()


@pytest.mark.parametrize("weights", ["none", "averaged", "per_head"])
@pytest.mark.parametrize(("batch_first", "unbatched"), [(True, False), (False, False), (True, True), (False, True)])
@pytest.mark.parametrize("mask", ["none", "causal", "bool", "padding", "per_head", "is_causal"])
def test_attention_weights_equal_stock(weights, batch_first, unbatched, mask):
    """Every forward option of the stock module: outputs and attention weights ((N, L, S) averaged over heads,
    (N, H, L, S) per head, no N for unbatched (L, E) input) equal the stock module with the merged weight."""
    stock, ours = _merged_pair(batch_first)
    n, l = (1, 6) if unbatched else (3, 6)
    kw = _masks(l, n)[mask]
    if unbatched:
        x = torch.randn(l, E)
        kw = {k: v[0] if k == "key_padding_mask" else v for k, v in kw.items()}  # (S,); per_head is (H, L, S)
    else:
        x = torch.randn((n, l, E) if batch_first else (l, n, E))
    opts = {"need_weights": weights != "none", "average_attn_weights": weights == "averaged", **kw}
    expected, expected_w = stock(x, x, x, **opts)
    got, got_w = ours(x, x, x, **opts)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    if weights == "none":
        assert got_w is None and expected_w is None
    else:
        assert got_w.shape == expected_w.shape
        torch.testing.assert_close(got_w, expected_w, rtol=1e-5, atol=1e-6)


def test_attention_weights_carry_dropout_in_training():
    """In training the returned weights are the dropped-out ones the values are averaged with, as the stock
    module's (same random stream, same masks); in eval no dropout."""
    stock, ours = _merged_pair(True, dropout=0.3)
    x = torch.randn(2, 5, E)
    for mode in (True, False):
        stock.train(mode), ours.train(mode)
        torch.manual_seed(5)
        expected, expected_w = stock(x, x, x, average_attn_weights=False)
        torch.manual_seed(5)
        got, got_w = ours(x, x, x, average_attn_weights=False)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got_w, expected_w, rtol=1e-5, atol=1e-6)
        assert bool((got_w == 0).any()) is mode


def test_is_causal_alone_is_the_causal_mask():
    """is_causal without an attn_mask (the stock module refuses it) applies the causal mask, with or without
    weights and a key padding mask."""
    _, ours = _merged_pair(True)
    ours.eval()
    x = torch.randn(2, 6, E)
    kpm = torch.zeros(2, 6, dtype=torch.bool)
    kpm[1, -1] = True
    causal = torch.ones(6, 6, dtype=torch.bool).triu(1)
    for kw in ({}, {"key_padding_mask": kpm}):
        for need in (True, False):
            got, got_w = ours(x, x, x, need_weights=need, is_causal=True, **kw)
            expected, expected_w = ours(x, x, x, need_weights=need, attn_mask=causal, **kw)
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
            if need:
                torch.testing.assert_close(got_w, expected_w)


def test_cross_attention_inputs():
    stock = _stock(True)
    ours = BlockLoRAMultiheadAttention(copy.deepcopy(stock), AdapterConfig(dropout=0.0))
    q, kv = torch.randn(2, 5, E), torch.randn(2, 8, E)
    torch.testing.assert_close(ours(q, kv, kv)[0], stock(q, kv, kv, need_weights=False)[0], rtol=1e-5, atol=1e-5)


def test_openclip_attention_class_layout():
    """open_clip's own Attention class (same parameters, called as attn(x, attn_mask), returns a tensor)."""
    from open_clip.transformer import Attention

    torch.manual_seed(0)
    stock = Attention(E, H).train()
    ours = BlockLoRAMultiheadAttention(copy.deepcopy(stock), AdapterConfig(dropout=0.0))
    x = torch.randn(2, 6, E)
    mask = torch.full((6, 6), float("-inf")).triu_(1)
    torch.testing.assert_close(ours(x, attn_mask=mask), stock(x, attn_mask=mask), rtol=1e-5, atol=1e-5)


def _timm_attention(seed: int = 0, qkv_bias: bool = True):
    from timm.layers import Attention

    torch.manual_seed(seed)
    attn = Attention(E, H, qkv_bias=qkv_bias)
    if qkv_bias:
        with torch.no_grad():
            attn.qkv.bias.normal_()
    return attn.eval()


@pytest.mark.parametrize("projections", ["qkv", "qv", "k"])
def test_timm_fused_qkv_equals_stock_with_updated_row_blocks(projections):
    """The wrapped (3E, E) qkv Linear inside timm's own Attention: the adapters' updates land in q, k, v's row blocks
    (merge is exact), the attention module itself is untouched."""
    stock = _timm_attention()
    ours = copy.deepcopy(stock)
    ours.qkv = BlockLoRAFusedQKV(ours.qkv, AdapterConfig(n_blocks=4, dropout=0.0), projections)
    randomize_adapters(ours, std=0.2)
    updated = copy.deepcopy(stock)
    with torch.no_grad():
        for p in projections:
            i = "qkv".index(p)
            updated.qkv.weight[i * E:(i + 1) * E] += ours.qkv.delta_weight(p)
    x = torch.randn(2, 7, E)
    with torch.no_grad():
        got = ours(x)
        torch.testing.assert_close(got, updated(x), rtol=1e-5, atol=1e-5)
        assert not torch.allclose(got, stock(x), atol=1e-3)
        ours.qkv.merge()
        torch.testing.assert_close(ours(x), got, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ours.qkv.weight, updated.qkv.weight, rtol=1e-6, atol=1e-6)


def test_fused_qkv_and_mha_share_one_computation():
    """Same weights and factors: the timm Linear's output is the MHA replacement's fused input projection."""
    mha = BlockLoRAMultiheadAttention(_stock(True), AdapterConfig(n_blocks=4, dropout=0.0), "qkv")
    linear = nn.Linear(E, 3 * E)
    with torch.no_grad():
        linear.weight.copy_(mha.in_proj_weight)
        linear.bias.copy_(mha.in_proj_bias)
    fused = BlockLoRAFusedQKV(linear, AdapterConfig(n_blocks=4, dropout=0.0))
    randomize_adapters(mha, std=0.2)
    fused.load_state_dict({k.replace("in_proj_", ""): v for k, v in mha.state_dict().items()
                           if not k.startswith("out_proj")})
    x = torch.randn(3, 5, E)
    with torch.no_grad():
        assert torch.equal(fused(x), mha._qkv(x))


@pytest.mark.parametrize(("module", "projections", "message"), [
    (nn.Linear(E, 100), "qkv", "not 3 row blocks"),
    (nn.Linear(E, 3 * E), "qkvo", "only q, k and v are row blocks"),
    (nn.Conv2d(E, 3 * E, 1), "qkv", "not an nn.Linear"),
])
def test_fused_qkv_refuses_what_it_cannot_wrap(module, projections, message):
    with pytest.raises(ConfigError, match=message):
        BlockLoRAFusedQKV(module, AdapterConfig(n_blocks=4), projections)


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
