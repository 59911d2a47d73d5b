"""inject(): placement, trainable set, validation before mutation, counts, merge, training touches only adapters."""

from __future__ import annotations

import copy

import pytest
import torch

import blocklora
from blocklora import AdapterConfig, ConfigError, inject
from blocklora.adapters.config import resolve_blocks
from conftest import example_inputs, make_hf, make_openclip, randomize_adapters


def _params(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_defaults_are_the_reference_recipe():
    cfg = AdapterConfig()
    assert (cfg.method, cfg.r, cfg.n_blocks, cfg.alpha, cfg.dropout) == ("block_lora", 2, 8, 1.0, 0.25)
    assert cfg.towers == ("vision", "text") and cfg.projections == ("q", "k", "v") and cfg.blocks == "all"
    assert AdapterConfig(method="lora").n_blocks == 1
    assert AdapterConfig.from_dict(cfg.to_dict()) == cfg
    assert AdapterConfig(projections="qkv").projections == ("q", "k", "v")
    assert AdapterConfig(blocks="8-11,0").blocks == (0, 8, 9, 10, 11)


@pytest.mark.parametrize(("depth", "name", "expected"), [
    (12, "bottom", [0, 1, 2, 3]), (12, "mid", [4, 5, 6, 7]), (12, "up", [8, 9, 10, 11]),
    (12, "half-up", [6, 7, 8, 9, 10, 11]), (12, "half-bottom", [0, 1, 2, 3, 4, 5]), (12, "top3", [9, 10, 11]),
    (24, "bottom", list(range(8))), (24, "mid", list(range(8, 16))), (24, "up", list(range(16, 24))),
    (24, "half-up", list(range(12, 24))), (24, "top3", [21, 22, 23]), (24, "all", list(range(24))),
])
def test_named_block_ranges_match_clip_lora(depth, name, expected):
    assert resolve_blocks(name, depth) == expected


def test_resolve_negative_and_out_of_range():
    assert resolve_blocks((-1, 0), 12) == [0, 11]
    with pytest.raises(ConfigError, match="out of range"):
        resolve_blocks((12,), 12)


@pytest.mark.parametrize("make", [make_openclip, make_hf])
def test_only_adapters_trainable_and_names(make):
    model = make()
    names = inject(model, AdapterConfig(blocks="1-2", towers="vision"))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A" in n or ".lora_B" in n for n in trainable)
    assert all(".1." in n or ".2." in n for n in names)
    assert len(names) == (2 if make is make_openclip else 6)  # one fused module per block, or 3 Linears


@pytest.mark.parametrize("make", [make_openclip, make_hf])
@pytest.mark.parametrize("bad", [
    dict(n_blocks=5), dict(projections="qx"), dict(blocks=(7,)), dict(towers=("audio",)),
])
def test_bad_configs_fail_clearly_and_leave_model_untouched(make, bad):
    model = make()
    before = _params(model)
    grads = [p.requires_grad for p in model.parameters()]
    with pytest.raises(ConfigError) as err:
        inject(model, AdapterConfig(**bad))
    msg = str(err.value)
    assert "\n" not in msg and len(msg) < 300
    after = _params(model)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert grads == [p.requires_grad for p in model.parameters()]
    assert not list(blocklora.adapter_layers(model))


def test_error_messages_name_the_problem():
    with pytest.raises(ConfigError, match="n_blocks=5 does not divide .*width of visual.transformer.resblocks.0"):
        inject(make_openclip(), AdapterConfig(n_blocks=5))
    with pytest.raises(ConfigError, match="unknown projection 'x'"):
        AdapterConfig(projections="q,x")
    with pytest.raises(ConfigError, match="method 'lora' means n_blocks=1"):
        AdapterConfig(method="lora", n_blocks=4)
    with pytest.raises(ConfigError, match="no tower selected"):
        AdapterConfig(towers="")
    model = make_openclip()
    inject(model)
    with pytest.raises(ConfigError, match="already carries"):
        inject(model)


@pytest.mark.parametrize("make", [make_openclip, make_hf])
def test_training_changes_only_adapter_tensors(make):
    model = make()
    inject(model, AdapterConfig(n_blocks=4, projections="qkvo"))
    model.train()
    before = _params(model)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    images, tokens = example_inputs()
    for _ in range(3):
        if make is make_openclip:
            img, txt = model.encode_image(images), model.encode_text(tokens)
        else:
            img = model.get_image_features(pixel_values=images)
            txt = model.get_text_features(input_ids=tokens)
            img, txt = (getattr(t, "pooler_output", t) for t in (img, txt))
        loss = (img.mean(0) - txt.mean(0)).pow(2).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = _params(model)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {k for k in before if ".lora_" in k}  # every adapter tensor moved, nothing else


def test_params_counts_vit_b16():
    import open_clip

    model = open_clip.create_model("ViT-B-16", pretrained=None)
    inject(model, AdapterConfig())
    assert blocklora.count_trainable(model) == 103_680
    model = open_clip.create_model("ViT-B-16", pretrained=None)
    inject(model, AdapterConfig(method="lora"))
    assert blocklora.count_trainable(model) == 184_320


@pytest.mark.parametrize("n", [1, 2, 4, 8, 16])
def test_param_count_formula(n):
    model = make_openclip()  # vision width 64, text width 48, 3 blocks each
    inject(model, AdapterConfig(n_blocks=n, r=3, projections="qkvo"))
    expected = sum(3 * 4 * (3 * w // n + 3 * w) for w in (64, 48))
    assert blocklora.count_trainable(model) == expected


@pytest.mark.parametrize("make", [make_openclip, make_hf])
def test_merge_equals_unmerged_and_unmerge_restores(make):
    model = make()
    original = _params(model)
    inject(model, AdapterConfig(n_blocks=4, projections="qkvo"))
    randomize_adapters(model)
    images, tokens = example_inputs()

    def feats():
        with torch.no_grad():
            if make is make_openclip:
                return model.encode_image(images), model.encode_text(tokens)
            return (model.get_image_features(pixel_values=images).pooler_output,
                    model.get_text_features(input_ids=tokens).pooler_output)

    unmerged = feats()
    blocklora.merge(model)
    for a, b in zip(feats(), unmerged):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    blocklora.unmerge(model)
    restored = {k: v for k, v in _params(model).items() if ".lora_" not in k}
    assert restored.keys() == original.keys()
    for k in original:
        torch.testing.assert_close(restored[k], original[k], rtol=0, atol=1e-6)


def test_adapters_disabled_gives_frozen_model():
    model = make_openclip()
    images, _ = example_inputs()
    with torch.no_grad():
        ref = model.encode_image(images)
    inject(model)
    randomize_adapters(model)
    with torch.no_grad(), blocklora.adapters_disabled(model):
        torch.testing.assert_close(model.encode_image(images), ref, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        assert not torch.allclose(model.encode_image(images), ref, atol=1e-3)


def test_merged_state_dict_loads_into_stock_model():
    model = make_openclip()
    inject(model, AdapterConfig(projections="qkvo"))
    randomize_adapters(model)
    images, tokens = example_inputs()
    with torch.no_grad():
        expected = model.encode_image(images), model.encode_text(tokens)
    stock = make_openclip(seed=5)
    stock.load_state_dict(blocklora.merged_state_dict(model), strict=True)
    with torch.no_grad():
        torch.testing.assert_close(stock.encode_image(images), expected[0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(stock.encode_text(tokens), expected[1], rtol=1e-5, atol=1e-5)
    copy.deepcopy(model)  # adapted models stay deep-copyable
