"""core.fold_dropout: fold_n(dropout(x)) as one autograd node that keeps nothing of x's size for backward."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import blocklora.adapters.core as core
from blocklora.adapters.config import AdapterConfig
from blocklora.adapters.core import draw_seed, dropout_mask, fold_dropout
from blocklora.adapters.fused import BlockLoRAMultiheadAttention
from blocklora.adapters.layers import BlockLoRAConv1x1, BlockLoRALinear


def _reference(x, p, n, mask, dim=-1):
    """The plain formula: fold of F.dropout's output, with a given keep-mask."""
    dim = dim % x.dim()
    h = x * mask / (1 - p)
    return h.unflatten(dim, (n, x.shape[dim] // n)).sum(dim) if n > 1 else h


@pytest.mark.parametrize("n,dim", [(1, -1), (4, -1), (3, 1)])
def test_gradcheck_and_equals_plain_formula(n, dim):
    shape = (3, 12, 5) if dim == 1 else (3, 5, 12)
    x = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    seed, p = 1234, 0.3
    fn = lambda t: fold_dropout(t, p, n, True, dim=dim, seed=seed)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x,))
    mask = dropout_mask(x.shape, p, seed, x.device)
    assert 0 < mask.sum() < mask.numel()
    out, ref = fn(x), _reference(x, p, n, mask, dim)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    g = torch.randn_like(out)
    (gx,) = torch.autograd.grad(out, x, g)
    (gx_ref,) = torch.autograd.grad(ref, x, g)
    torch.testing.assert_close(gx, gx_ref, rtol=1e-12, atol=1e-12)


def test_p0_and_eval_are_the_plain_fold():
    x = torch.randn(4, 16)
    assert fold_dropout(x, 0.0, 1) is x
    torch.testing.assert_close(fold_dropout(x, 0.5, 4, training=False), x.view(4, 4, 4).sum(1))
    state = torch.random.get_rng_state()
    fold_dropout(x, 0.5, 4, training=False)
    assert torch.equal(state, torch.random.get_rng_state())  # no RNG draw outside training


def test_seed_comes_from_global_rng():
    x = torch.randn(6, 32)
    torch.manual_seed(5)
    a = fold_dropout(x, 0.25, 4)
    torch.manual_seed(5)
    b = fold_dropout(x, 0.25, 4)
    c = fold_dropout(x, 0.25, 4)
    assert torch.equal(a, b) and not torch.equal(b, c)
    torch.manual_seed(5)
    torch.testing.assert_close(a, _reference(x, 0.25, 4, dropout_mask(x.shape, 0.25, draw_seed(), x.device)))


def _grads(out, tensors, g):
    return torch.autograd.grad(out, tensors, g)


def test_linear_matches_reference_with_same_mask():
    torch.manual_seed(0)
    layer = BlockLoRALinear(nn.Linear(48, 40).double(), AdapterConfig(r=3, n_blocks=4, alpha=1.5, dropout=0.4)).train()
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(2, 7, 48, dtype=torch.float64, requires_grad=True)
    torch.manual_seed(11)
    out = layer(x)
    torch.manual_seed(11)
    mask = dropout_mask(x.shape, 0.4, draw_seed(), x.device)
    s = 1.5 / math.sqrt(3)
    ref = F.linear(x, layer.weight, layer.bias) + s * (_reference(x, 0.4, 4, mask) @ layer.lora_A.T) @ layer.lora_B.T
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    g = torch.randn_like(out)
    for a, b in zip(_grads(out, (x, layer.lora_A, layer.lora_B), g), _grads(ref, (x, layer.lora_A, layer.lora_B), g)):
        torch.testing.assert_close(a, b, rtol=1e-11, atol=1e-12)


def test_attention_qkv_matches_reference_with_same_mask():
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(32, 4, batch_first=True).double()
    layer = BlockLoRAMultiheadAttention(mha, AdapterConfig(n_blocks=4, dropout=0.25, fold="mean")).train()
    with torch.no_grad():
        for b in layer.lora_B.values():
            b.normal_()
    x = torch.randn(2, 5, 32, dtype=torch.float64, requires_grad=True)
    torch.manual_seed(3)
    out = layer._qkv(x)
    torch.manual_seed(3)
    mask = dropout_mask(x.shape, 0.25, draw_seed(), x.device)  # one mask shared by q, k and v
    h = _reference(x, 0.25, 4, mask) / 4  # fold "mean"
    s = 1.0 / math.sqrt(2)
    ref = F.linear(x, layer.in_proj_weight, layer.in_proj_bias) + s * torch.cat(
        [(h @ layer.lora_A[p].T) @ layer.lora_B[p].T for p in "qkv"], dim=-1)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    params = (x, *layer.lora_A.values(), *layer.lora_B.values())
    g = torch.randn_like(out)
    for a, b in zip(_grads(out, params, g), _grads(ref, params, g)):
        torch.testing.assert_close(a, b, rtol=1e-11, atol=1e-12)


def test_conv1x1_matches_reference_with_same_mask():
    torch.manual_seed(0)
    layer = BlockLoRAConv1x1(nn.Conv2d(16, 8, 1).double(), AdapterConfig(n_blocks=4, r=2, dropout=0.5)).train()
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(2, 16, 3, 3, dtype=torch.float64, requires_grad=True)
    torch.manual_seed(7)
    out = layer(x)
    torch.manual_seed(7)
    mask = dropout_mask(x.shape, 0.5, draw_seed(), x.device)
    h = _reference(x, 0.5, 4, mask, dim=1)  # (N, 4, H, W)
    z = torch.einsum("nchw,rc->nrhw", h, layer.lora_A)
    ref = F.conv2d(x, layer.weight, layer.bias) + torch.einsum("nrhw,or->nohw", z, layer.lora_B) / math.sqrt(2)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    g = torch.randn_like(out)
    for a, b in zip(_grads(out, (x, layer.lora_A, layer.lora_B), g), _grads(ref, (x, layer.lora_A, layer.lora_B), g)):
        torch.testing.assert_close(a, b, rtol=1e-11, atol=1e-12)


def _saved_bytes(fn, exclude) -> tuple[int, list[tuple[int, ...]]]:
    """Bytes of the distinct tensors autograd keeps for backward while fn runs (parameters excluded)."""
    skip = {p.data_ptr() for p in exclude}
    seen: dict[int, tuple[int, tuple[int, ...]]] = {}

    def pack(t):
        if t.data_ptr() not in skip:
            seen[t.data_ptr()] = (t.numel() * t.element_size(), tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(b for b, _ in seen.values()), [s for _, s in seen.values()]


@pytest.mark.parametrize("method,n", [("block_lora", 8), ("lora", 1)])
def test_adapter_branch_keeps_only_the_folded_input(method, n):
    """Linear adapter, dropout on: the branch keeps h = fold(drop(x)) (4 d/n bytes per token), z (4 r bytes per
    token) and the scaled B.T (r x d, once); no tensor of x's size (the old path kept F.dropout's float mask too:
    + 4 d bytes per token)."""
    d, r, tokens = 768, 2, 8 * 197
    layer = BlockLoRALinear(nn.Linear(d, d), AdapterConfig(r=r, n_blocks=n, dropout=0.25)).train()
    layer.weight.requires_grad_(False)
    layer.bias.requires_grad_(False)
    x = torch.randn(8, 197, d, requires_grad=True)
    layer.adapter_enabled = False
    base, _ = _saved_bytes(lambda: layer(x), layer.parameters())
    layer.adapter_enabled = True
    adapted, shapes = _saved_bytes(lambda: layer(x), layer.parameters())
    assert adapted - base == tokens * (d // n + r) * 4 + r * d * 4
    if n > 1:
        assert all(math.prod(s) < x.numel() for s in shapes)  # nothing of x's size


def test_attention_branch_saved_bytes():
    """Fused q/k/v: one folded input for the three projections, z for all three, and the small A / B concatenations."""
    e, r, tokens = 768, 2, 8 * 197
    layer = BlockLoRAMultiheadAttention(nn.MultiheadAttention(e, 12, batch_first=True),
                                        AdapterConfig(dropout=0.25)).train()
    for name, p in layer.named_parameters():
        p.requires_grad_("lora_" in name)
    x = torch.randn(8, 197, e, requires_grad=True)
    layer.adapter_enabled = False
    base, _ = _saved_bytes(lambda: layer._qkv(x), layer.parameters())
    layer.adapter_enabled = True
    adapted, _ = _saved_bytes(lambda: layer._qkv(x), layer.parameters())
    folded, z, a_cat, b_diag = tokens * e // 8 * 4, tokens * 3 * r * 4, 3 * r * e // 8 * 4, 3 * r * 3 * e * 4
    assert adapted - base == folded + z + a_cat + b_diag  # b_diag: the scaled block-diagonal (q, k, v) B.T


@pytest.mark.parametrize("p", [0.25, 0.3, 0.5])
def test_mask_keep_rate(p):
    """16-bit draws when p is a multiple of 2**-16 (0.25, 0.5), a float per element otherwise (0.3): P(kept) = 1 - p."""
    mask = dropout_mask((1000, 1003), p, 9, "cpu")  # an odd element count: the 16-bit path trims its last word
    assert mask.shape == (1000, 1003) and mask.dtype == torch.bool
    assert abs(mask.float().mean().item() - (1 - p)) < 3e-3
    assert torch.equal(mask, dropout_mask((1000, 1003), p, 9, "cpu")) and not torch.equal(
        mask, dropout_mask((1000, 1003), p, 10, "cpu"))


def test_add_up_projection_paths():
    out, z, up = torch.randn(2, 3, 8), torch.randn(2, 3, 2), torch.randn(2, 8)
    expected = out + z @ up
    torch.testing.assert_close(core.add_up_projection(out.clone(), z, up), expected)  # fresh: in place
    view = out.clone().transpose(0, 1)  # not contiguous: out of place, the input is left alone
    before = view.clone()
    torch.testing.assert_close(core.add_up_projection(view, z.transpose(0, 1), up), expected.transpose(0, 1))
    assert torch.equal(view, before)
    torch.testing.assert_close(core.add_up_projection(out.double(), z, up), expected.double())  # dtype mismatch


def test_autocast_bf16_forward_backward():
    """Under autocast the up-projection is added out of place (autocast casts the addmm operands)."""
    torch.manual_seed(0)
    mha = BlockLoRAMultiheadAttention(nn.MultiheadAttention(32, 4, batch_first=True),
                                      AdapterConfig(n_blocks=4, dropout=0.25), "qkvo").train()
    lin = BlockLoRALinear(nn.Linear(32, 16), AdapterConfig(r=2, n_blocks=4, dropout=0.25)).train()
    x = torch.randn(2, 5, 32, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = lin(mha(x, x, x, need_weights=False)[0])
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert x.grad is not None and mha.lora_A["q"].grad is not None and lin.lora_A.grad is not None
