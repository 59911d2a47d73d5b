"""inject(): configuration, placement, validation before mutation, the probe that refuses bypassed layers.

The adapter contract (identity, merge, round trip, export, training touches only adapters, counts) is one matrix
over every family: test_contract.py.
"""

from __future__ import annotations

import pytest
import torch

import blocklora
from blocklora import AdapterConfig, ConfigError, inject
from blocklora.adapters.config import resolve_layers
from conftest import example_inputs, make_hf, make_openclip, randomize_adapters


def _params(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_defaults_are_the_reference_recipe():
    cfg = AdapterConfig()
    assert (cfg.method, cfg.r, cfg.n_blocks, cfg.alpha, cfg.dropout) == ("block_lora", 2, 8, 1.0, 0.25)
    assert cfg.towers == ("vision", "text") and cfg.projections == ("q", "k", "v") and cfg.layers == "all"
    assert AdapterConfig(method="lora").n_blocks == 1
    assert AdapterConfig.from_dict(cfg.to_dict()) == cfg
    assert AdapterConfig(projections="qkv").projections == ("q", "k", "v")
    assert AdapterConfig(layers="8-11,0").layers == (0, 8, 9, 10, 11)


def test_former_names_are_still_read():
    """`blocks` (now `layers`) in code, overrides and the config.json of adapters written by earlier versions."""
    from blocklora.config.run_config import RunConfig

    assert AdapterConfig(blocks="up") == AdapterConfig(layers="up")
    old = {**AdapterConfig().to_dict(), "blocks": [0, 2], "extra": {}}
    del old["layers"]
    assert AdapterConfig.from_dict(old).layers == (0, 2)
    assert RunConfig().with_overrides(["adapter.blocks=top3"]).adapter.layers == "top3"
    assert RunConfig().with_overrides(["blocks=1-2"]).adapter.layers == (1, 2)
    with pytest.raises(ConfigError, match="disagree"):
        AdapterConfig(layers="up", blocks="top")
    with pytest.raises(ConfigError, match="'extra' is not supported"):
        AdapterConfig.from_dict({"extra": {"x": 1}})


@pytest.mark.parametrize(("depth", "name", "expected"), [
    (12, "bottom", [0, 1, 2, 3]), (12, "mid", [4, 5, 6, 7]), (12, "up", [8, 9, 10, 11]),
    (12, "half-up", [6, 7, 8, 9, 10, 11]), (12, "half-bottom", [0, 1, 2, 3, 4, 5]), (12, "top3", [9, 10, 11]),
    (24, "bottom", list(range(8))), (24, "mid", list(range(8, 16))), (24, "up", list(range(16, 24))),
    (24, "half-up", list(range(12, 24))), (24, "top3", [21, 22, 23]), (24, "all", list(range(24))),
])
def test_named_layer_ranges_match_clip_lora(depth, name, expected):
    assert resolve_layers(name, depth) == expected


def test_resolve_negative_and_out_of_range():
    assert resolve_layers((-1, 0), 12) == [0, 11]
    with pytest.raises(ConfigError, match="out of range"):
        resolve_layers((12,), 12)


@pytest.mark.parametrize("make", [make_openclip, make_hf])
def test_only_adapters_trainable_and_names(make):
    model = make()
    names = inject(model, AdapterConfig(layers="1-2", towers="vision"))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A" in n or ".lora_B" in n for n in trainable)
    assert all(".1." in n or ".2." in n for n in names)
    assert len(names) == (2 if make is make_openclip else 6)  # one fused module per block, or 3 Linears


@pytest.mark.parametrize("make", [make_openclip, make_hf])
@pytest.mark.parametrize("bad", [
    dict(n_blocks=5), dict(projections="qx"), dict(layers=(7,)), dict(towers=("audio",)),
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
    with pytest.raises(ConfigError, match="cannot adapt visual.transformer.resblocks.0.attn: n_blocks=5 does not"):
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


def _open_clip(name: str):
    import open_clip

    from families import register

    register()
    return open_clip.create_model(name).eval()


def _probe(model, size: int):
    tokens = torch.zeros(1, 16, dtype=torch.long)
    tokens[0, :3] = torch.tensor([5, 6, 127])
    return lambda: (model.encode_image(torch.zeros(1, 3, size, size)), model.encode_text(tokens))


@pytest.mark.parametrize(("name", "size", "message"), [
    # EVA-01 style: EvaAttention with q/v biases calls F.linear(x, self.qkv.weight, ...), never self.qkv(x)
    ("tiny-eva01-test", 32, r"visual.trunk.blocks.0.attn.qkv is never called: EvaAttention \(visual.trunk.blocks.0"),
    # CLIP's RN50: AttentionPool2d hands q_proj/k_proj/v_proj's weights to F.multi_head_attention_forward
    ("tiny-rn50-test", 64, r"visual.attnpool.\w_proj is never called: AttentionPool2d \(visual.attnpool\)"),
])
def test_probe_refuses_layers_the_model_bypasses(name, size, message):
    model = _open_clip(name)
    before = _params(model)
    flags = [p.requires_grad for p in model.parameters()]
    with pytest.raises(ConfigError, match=message) as err:
        inject(model, AdapterConfig(n_blocks=4), probe=_probe(model, size))
    assert "--towers text" in str(err.value) and "\n" not in str(err.value)
    assert not list(blocklora.adapter_layers(model)) and blocklora.adapter_config(model) is None
    assert _params(model).keys() == before.keys() and all(torch.equal(v, before[k]) for k, v in _params(model).items())
    assert flags == [p.requires_grad for p in model.parameters()]
    assert len(inject(model, AdapterConfig(n_blocks=4, towers="text"), probe=_probe(model, size))) == 2


def test_a_tower_without_attention_is_refused_by_its_class():
    model = _open_clip("tiny-convnext-test")
    with pytest.raises(ConfigError, match=r"vision tower of this open_clip model \(TimmModel around a timm ConvNeXt\) "
                                          r"has no attention blocks .* choose towers from text"):
        inject(model, AdapterConfig(n_blocks=4))
    assert len(inject(model, AdapterConfig(n_blocks=4, towers="text"))) == 2


class _Toy(torch.nn.Module):
    """A model no family knows: two timm-style attention blocks (a fused qkv Linear and an output Linear)."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = torch.nn.ModuleList(torch.nn.ModuleDict({"qkv": torch.nn.Linear(16, 48),
                                                               "proj": torch.nn.Linear(16, 16)}) for _ in range(2))

    def forward(self, x):
        for block in self.blocks:
            q, k, v = block["qkv"](x).chunk(3, -1)
            x = x + block["proj"](torch.softmax(q @ k.transpose(-1, -2), -1) @ v)
        return x


def test_a_placement_can_be_handed_to_inject():
    from blocklora import Placement, Site

    model = _Toy()
    with pytest.raises(ConfigError, match="does not know where attention lives in a _Toy: known families are"):
        inject(model)
    sites = tuple(Site("vision", i, f"blocks.{i}", "linears", (("q", "qkv"), ("k", "qkv"), ("v", "qkv"),
                                                                ("o", "proj"))) for i in range(2))
    placement = Placement("toy", {"vision": sites})
    x = torch.randn(2, 5, 16)
    with torch.no_grad():
        ref = model(x)
    names = inject(model, AdapterConfig(n_blocks=4, towers="vision", projections="qkvo"), placement,
                   probe=lambda: model(x))
    assert names == ["blocks.0.qkv", "blocks.0.proj", "blocks.1.qkv", "blocks.1.proj"]
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref)
    assert blocklora.count_trainable(model) == 2 * (3 * (2 * 16 // 4 + 2 * 16) + (2 * 16 // 4 + 2 * 16))
