"""BlockLoRALinear against explicit formulas (float64)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from blocklora import AdapterConfig, BlockLoRALinear, ConfigError
from blocklora.adapters.core import delta_weight, draw_seed, dropout_mask, fold


def _layer(d_in=48, d_out=40, n=4, r=3, dropout=0.0, **kw):
    torch.manual_seed(0)
    base = nn.Linear(d_in, d_out).double()
    layer = BlockLoRALinear(base, AdapterConfig(r=r, n_blocks=n, alpha=1.5, dropout=dropout, **kw))
    with torch.no_grad():
        layer.lora_B.normal_()
    return base, layer


@pytest.mark.parametrize("n", [1, 2, 3, 4, 8, 16])
def test_forward_equals_explicit_formula(n):
    base, layer = _layer(n=n, d_in=48)
    x = torch.randn(5, 7, 48, dtype=torch.float64)
    a_tiled = torch.cat([layer.lora_A] * n, dim=1)  # [A, A, ..., A]: (r, d_in)
    s = 1.5 / math.sqrt(3)
    expected = x @ base.weight.T + base.bias + s * x @ (layer.lora_B @ a_tiled).T
    torch.testing.assert_close(layer(x), expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(layer.delta_weight(), s * layer.lora_B @ a_tiled, rtol=1e-12, atol=1e-12)
    assert layer.lora_A.shape == (3, 48 // n) and layer.lora_B.shape == (40, 3)


def test_fold_sums_chunks():
    x = torch.arange(24.0).reshape(2, 12)
    torch.testing.assert_close(fold(x, 3), x[:, 0:4] + x[:, 4:8] + x[:, 8:12])
    assert fold(x, 1) is x


def test_n1_is_plain_lora():
    base, layer = _layer(n=1)
    x = torch.randn(6, 48, dtype=torch.float64)
    s = 1.5 / math.sqrt(3)
    lora = base(x) + s * (x @ layer.lora_A.T) @ layer.lora_B.T
    torch.testing.assert_close(layer(x), lora, rtol=1e-12, atol=1e-12)


def test_standard_scaling_and_mean_fold():
    base, layer = _layer(n=4, scaling="standard", fold="mean")
    assert layer.scaling == pytest.approx(1.5 / 3)
    x = torch.randn(6, 48, dtype=torch.float64)
    mean_fold = x.reshape(6, 4, 12).mean(1)
    expected = base(x) + (1.5 / 3) * (mean_fold @ layer.lora_A.T) @ layer.lora_B.T
    torch.testing.assert_close(layer(x), expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(layer.delta_weight() @ x.T, (expected - base(x)).T, rtol=1e-10, atol=1e-12)


def test_zero_b_is_bit_identical_to_base():
    torch.manual_seed(0)
    base = nn.Linear(32, 16)
    layer = BlockLoRALinear(base, AdapterConfig(r=2, n_blocks=8, dropout=0.25)).train()
    x = torch.randn(4, 32)
    assert torch.equal(layer(x), base(x))
    assert torch.count_nonzero(layer.lora_B) == 0 and torch.count_nonzero(layer.lora_A) > 0


def test_init_bounds():
    base = nn.Linear(768, 768)
    torch.manual_seed(0)
    a = BlockLoRALinear(base, AdapterConfig(r=2, n_blocks=8)).lora_A
    full = BlockLoRALinear(base, AdapterConfig(r=2, n_blocks=8, a_init="kaiming_full")).lora_A
    assert a.abs().max() <= 1 / math.sqrt(96) and a.abs().max() > 0.9 / math.sqrt(96)
    assert full.abs().max() <= 1 / math.sqrt(768) and full.abs().max() > 0.9 / math.sqrt(768)


def test_dropout_only_on_adapter_path():
    base, layer = _layer(n=4, dropout=0.5)
    layer.train()
    x = torch.randn(200, 48, dtype=torch.float64)
    torch.manual_seed(3)
    out = layer(x)
    torch.manual_seed(3)
    mask = dropout_mask(x.shape, 0.5, draw_seed(), x.device) / 0.5  # the layer's mask: same seed draw
    s = 1.5 / math.sqrt(3)
    expected = base(x) + s * (fold(x * mask, 4) @ layer.lora_A.T) @ layer.lora_B.T
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    layer.eval()
    assert not torch.allclose(layer(x), out)


def test_training_never_builds_the_dense_update(monkeypatch):
    import blocklora.adapters.layers as layers

    _, layer = _layer(n=4, dropout=0.25)
    layer.train()

    def boom(*a, **k):
        raise AssertionError("dense update built in forward")

    monkeypatch.setattr(layers, "delta_weight", boom)
    layer(torch.randn(3, 48, dtype=torch.float64)).sum().backward()
    assert layer.lora_A.grad is not None and layer.lora_B.grad is not None


def test_merge_unmerge():
    base, layer = _layer(n=4)
    w0 = base.weight.detach().clone()
    x = torch.randn(5, 48, dtype=torch.float64)
    y = layer(x)
    layer.merge()
    torch.testing.assert_close(layer(x), y, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(base.weight, w0 + layer.delta_weight())
    layer.unmerge()
    torch.testing.assert_close(base.weight, w0, rtol=0, atol=1e-14)


@pytest.mark.parametrize("n", [5, 7, 64])
def test_bad_n_blocks_is_clear(n):
    with pytest.raises(ConfigError, match=f"n_blocks={n} does not divide in_features"):
        BlockLoRALinear(nn.Linear(48, 8), AdapterConfig(n_blocks=n))


def test_delta_weight_function_matches_repeat():
    a, b = torch.randn(2, 5), torch.randn(7, 2)
    torch.testing.assert_close(delta_weight(a, b, 3, 0.5), 0.5 * b @ torch.cat([a, a, a], 1))
