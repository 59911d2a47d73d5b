"""q, k and v Linears of one attention (transformers CLIP, MiniLM) fold their common input once (SharedFold).

Pinned: the three share one dropout mask and one folded tensor, exactly as the fused open_clip attention does;
outputs and gradients equal the unshared computation wherever masks cannot differ; another input tensor is folded
again; cost reports count one fold per attention.
"""

from __future__ import annotations

import torch

from blocklora import AdapterConfig, inject
from blocklora.adapters import layers as layers_mod
from blocklora.adapters.inject import adapter_layers
from blocklora.adapters.report import adapter_cost
from conftest import make_hf, randomize_adapters


def _attention(model, i=0):
    return model.vision_model.encoder.layers[i].self_attn


def _features(out) -> torch.Tensor:
    """transformers 5 returns an output object from get_*_features, 4.x a tensor."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def _count_folds(monkeypatch) -> list[int]:
    calls = [0]
    real = layers_mod.fold_dropout

    def counting(*args, **kwargs):
        calls[0] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(layers_mod, "fold_dropout", counting)
    return calls


def test_q_k_v_share_one_mask_and_one_fold(monkeypatch):
    model = make_hf()
    inject(model, AdapterConfig(dropout=0.5, n_blocks=4, projections="qkvo"))
    randomize_adapters(model)
    attn = _attention(model)
    q, k, v, o = attn.q_proj, attn.k_proj, attn.v_proj, attn.out_proj
    assert q.shared_fold is k.shared_fold is v.shared_fold is not None and o.shared_fold is None
    d = q.in_features  # the cost report counts the group's fold once (o folds its own input)
    assert adapter_cost(model)["towers"]["vision"]["adds_per_token"] == len(model.vision_model.encoder.layers) * 2 * (
        d - d // 4)
    assert _attention(model, 1).q_proj.shared_fold is not q.shared_fold  # one group per attention
    calls = _count_folds(monkeypatch)
    model.train()
    x = torch.randn(2, 5, q.in_features, dtype=torch.float64)
    for layer in (q, k, v):
        layer.double()
    outs = [layer(x) for layer in (q, k, v)]
    assert calls[0] == 1
    h = q.shared_fold._h  # fold(drop(x)): (2, 5, d/n)
    assert h.shape == (2, 5, q.in_features // 4)
    assert not torch.allclose(h, x.unflatten(-1, (4, -1)).sum(-2))  # dropout was on: this is fold(drop(x))
    for layer, out in zip((q, k, v), outs):
        base = torch.nn.functional.linear(x, layer.weight, layer.bias)
        expected = base + layer._scale * (h @ layer.lora_A.T) @ layer.lora_B.T
        torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    # a different tensor (the next step, a recomputed activation) is folded again, with a fresh mask
    q(x.clone())
    assert calls[0] == 2


def test_shared_fold_changes_cost_not_results_without_dropout():
    torch.manual_seed(0)
    model = make_hf()
    inject(model, AdapterConfig(dropout=0.0, projections="qkv"))
    randomize_adapters(model)
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    ids = torch.randint(1, 500, (3, 7), generator=torch.Generator().manual_seed(2))

    def run():
        model.zero_grad(set_to_none=True)
        model.train()
        img = _features(model.get_image_features(pixel_values=images))
        txt = _features(model.get_text_features(input_ids=ids))
        ((img ** 2).sum() + (txt ** 2).sum()).backward()
        return img.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    shared_out, shared_grads = run()
    for _, layer in adapter_layers(model):
        layer.shared_fold = None
    plain_out, plain_grads = run()
    torch.testing.assert_close(shared_out, plain_out, rtol=0, atol=0)
    scale = max(g.abs().max() for g in plain_grads.values())
    # the vision q/k gradients are substantial (the text tower's are ~0: it pools a token that attends to itself)
    assert plain_grads["vision_model.encoder.layers.0.self_attn.q_proj.lora_A"].abs().max() > 1e-4 * scale
    for name in plain_grads:  # h's gradient is now the sum of three products: equal up to float rounding
        torch.testing.assert_close(shared_grads[name], plain_grads[name], rtol=1e-5, atol=1e-6 * scale, msg=name)


def test_cost_report_counts_one_fold_per_attention():
    model = make_hf()
    inject(model, AdapterConfig(n_blocks=8, projections="qkv"))
    cost = adapter_cost(model)
    vision = model.config.vision_config.hidden_size
    text = model.config.text_config.hidden_size
    assert cost["towers"]["vision"]["adds_per_token"] == 3 * (vision - vision // 8)
    assert cost["towers"]["text"]["adds_per_token"] == 3 * (text - text // 8)


def test_a_used_model_deep_copies_and_pickles_with_its_groups():
    import copy
    import io

    model = make_hf()
    inject(model, AdapterConfig(dropout=0.25, projections="qkv"))
    model.train()
    _features(model.get_image_features(pixel_values=torch.randn(2, 3, 32, 32))).sum().backward()
    assert _attention(model).q_proj.shared_fold._h is not None  # a non-leaf tensor with a graph is cached
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    for other in (copy.deepcopy(model), torch.load(buf, weights_only=False)):
        attn = _attention(other)
        assert attn.q_proj.shared_fold is attn.k_proj.shared_fold is attn.v_proj.shared_fold
        assert attn.q_proj.shared_fold is not _attention(model).q_proj.shared_fold
        assert attn.q_proj.shared_fold._h is None


def test_in_the_whole_model_each_attention_folds_once(monkeypatch):
    model = make_hf()
    inject(model, AdapterConfig(projections="qkvo"))
    model.train()
    calls = _count_folds(monkeypatch)
    model.get_image_features(pixel_values=torch.randn(2, 3, 32, 32))
    assert calls[0] == 2 * len(model.vision_model.encoder.layers)  # q/k/v once, o once (its input differs)
