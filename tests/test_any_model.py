"""Block-LoRA on any PyTorch model: adapters placed by name and type (AdapterConfig.target_modules, PEFT's rules).

Real model classes with random weights and tiny configs: timm ViT and Swin (fused qkv Linears), transformers ViT and
DINOv2 (separate query / key / value), torchvision's VisionTransformer (nn.MultiheadAttention), a timm ConvNeXt's MLP
Linears, GPT-2 (transformers' Conv1D) and an nn.Sequential of Linears. Each: fresh adapters leave the outputs as
they were, merged == unmerged, a few steps lower a loss, the adapter file round trip. The name rules are checked
against PEFT's own check_target_module_exists; the Linear targets' PEFT export is loaded by PEFT itself.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from torch import nn

import blocklora
from blocklora import AdapterConfig, AdapterMismatchError, ConfigError
from conftest import randomize_adapters

REPO = Path(__file__).resolve().parent.parent


def _timm_vit():
    import timm

    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=2,
                             num_classes=5)


def _timm_swin():
    from timm.models.swin_transformer import SwinTransformer

    return SwinTransformer(img_size=32, patch_size=4, window_size=4, embed_dim=16, depths=(1, 1), num_heads=(1, 2),
                           num_classes=5)


def _hf_vit():
    from transformers import ViTConfig, ViTModel

    return ViTModel(ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                              image_size=32, patch_size=8), add_pooling_layer=False)


def _hf_dinov2():
    from transformers import Dinov2Config, Dinov2Model

    return Dinov2Model(Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, mlp_ratio=2,
                                    image_size=32, patch_size=8))


def _torchvision_vit():
    from torchvision.models.vision_transformer import VisionTransformer

    model = VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64,
                              num_classes=5)
    nn.init.normal_(model.heads.head.weight, std=0.2)  # torchvision starts the head at zero: outputs would be 0
    return model


def _convnext():
    from timm.models.convnext import ConvNeXt

    # layer scale 1 (timm's default 1e-6 would hide what the MLPs add, adapted or not)
    return ConvNeXt(depths=(1, 1, 1, 1), dims=(8, 8, 16, 16), num_classes=5, ls_init_value=1.0)


def _gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    return GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=64, n_positions=16, resid_pdrop=0,
                                      embd_pdrop=0, attn_pdrop=0))


def _sequential():
    return nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 8))


IMAGES = (2, 3, 32, 32)
# name -> (builder, AdapterConfig fields, input shape (token ids for GPT-2), exported to PEFT)
CASES = {
    "timm_vit": (_timm_vit, dict(target_modules=["attn.qkv", "attn.proj"], fused={"qkv": "qkv"}), IMAGES, False),
    "timm_swin": (_timm_swin, dict(target_modules=r".*\.attn\.(qkv|proj)", fused={"qkv": "qkv"}), IMAGES, False),
    # transformers 5 names: layers.{i}.attention.q_proj (ViT), encoder.layer.{i}.attention.q_proj (DINOv2); PEFT's
    # default index rule needs a name before "layers", so ViT's block index needs layers_pattern
    "hf_vit": (_hf_vit, dict(target_modules=["q_proj", "k_proj", "v_proj"], layers_pattern="layers", layers=[1]),
               IMAGES, True),
    "hf_dinov2": (_hf_dinov2, dict(target_modules=["q_proj", "v_proj", "mlp.fc2"], layers=[0, 1]), IMAGES, True),
    "torchvision_vit": (_torchvision_vit, dict(target_types=[nn.MultiheadAttention], projections="qkvo"), IMAGES,
                        False),
    "convnext_mlp": (_convnext, dict(target_modules=["mlp.fc1", "mlp.fc2"]), IMAGES, True),
    "gpt2": (_gpt2, dict(target_modules=["c_attn", "attn.c_proj"]), ("ids", 2, 8), True),
    "sequential": (_sequential, dict(target_types=[nn.Linear]), (4, 16), True),
}
# torchvision's encoder calls nn.MultiheadAttention, whose stock kernel blocklora's replacement (SDPA) reproduces
# to float rounding, not to the bit; every other case wraps the very product the stock module computes
EXACT = {name: name != "torchvision_vit" for name in CASES}


def _build(name: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return CASES[name][0]().eval()


def _input(name: str) -> torch.Tensor:
    shape = CASES[name][2]
    g = torch.Generator().manual_seed(3)
    if shape[0] == "ids":
        return torch.randint(0, 64, shape[1:], generator=g)
    return torch.randn(shape, generator=g)


def _out(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    y = model(x)
    if isinstance(y, torch.Tensor):
        return y
    return y.logits if hasattr(y, "logits") else y.last_hidden_state


def _cfg(name: str, **over) -> AdapterConfig:
    return AdapterConfig(**{"n_blocks": 4, "dropout": 0.0, **CASES[name][1], **over})


@pytest.mark.parametrize("name", list(CASES))
def test_the_adapter_contract_on_any_model(name, tmp_path):
    model, x = _build(name), _input(name)
    with torch.no_grad():
        stock = _out(model, x)
    names = blocklora.inject(model, _cfg(name), probe=lambda: model(x))  # every adapter proven on the path
    assert names and blocklora.count_trainable(model) == sum(v.numel() for v in blocklora.adapter_state_dict(
        model).values())
    with torch.no_grad():
        fresh = _out(model, x)
    if EXACT[name]:
        assert torch.equal(fresh, stock)
    else:
        torch.testing.assert_close(fresh, stock, rtol=0, atol=1e-6)

    randomize_adapters(model)
    with torch.no_grad():
        adapted = _out(model, x)
    assert not torch.allclose(adapted, stock)
    blocklora.save_adapter(model, tmp_path / "adapter")
    with safe_open(tmp_path / "adapter" / "blocklora_adapter.safetensors", "pt") as f:  # the file says where
        recorded = json.loads(f.metadata()["targeting"])
    assert recorded.items() <= _cfg(name).to_dict().items() and recorded.keys() & {"target_modules", "target_types"}
    loaded = _build(name)
    assert blocklora.load_adapter(loaded, tmp_path / "adapter") == _cfg(name)
    with torch.no_grad():
        assert torch.equal(_out(loaded, x), adapted)

    with torch.no_grad():
        blocklora.merge(model)
        torch.testing.assert_close(_out(model, x), adapted, rtol=1e-5, atol=1e-5)
        blocklora.unmerge(model)
        torch.testing.assert_close(_out(model, x), adapted, rtol=1e-5, atol=1e-5)
        stock_model = _build(name)
        stock_model.load_state_dict(blocklora.merged_state_dict(model))  # a stock state dict: strict load
        torch.testing.assert_close(_out(stock_model, x), adapted, rtol=1e-5, atol=1e-5)

    # a few steps on the adapters alone lower a loss; the frozen weights do not move
    frozen = {k: v.clone() for k, v in model.state_dict().items() if ".lora_" not in k}
    target = torch.randn(adapted.shape, generator=torch.Generator().manual_seed(5))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    losses = []
    for _ in range(3):
        loss = (_out(model, x) - target).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0], losses
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in frozen.items())


@pytest.mark.parametrize("name", [n for n, case in CASES.items() if case[3]])
def test_peft_loads_the_export_of_linear_targets(name, tmp_path):
    """PEFT's own PeftModel.from_pretrained reads the export and computes what blocklora computes."""
    from peft import PeftModel

    from blocklora.interop.peft import write_peft_adapter

    model, x = _build(name), _input(name)
    blocklora.inject(model, _cfg(name))
    randomize_adapters(model)
    with torch.no_grad():
        ours = _out(model, x)
    write_peft_adapter(model, tmp_path / "peft")
    peft_model = PeftModel.from_pretrained(_build(name), str(tmp_path / "peft")).eval()
    with torch.no_grad():
        torch.testing.assert_close(_out(peft_model, x), ours, rtol=1e-5, atol=1e-5)


@functools.cache
def _named(name: str) -> nn.Module:
    """One model per class for the name-rule checks, which only read its module tree."""
    return _build(name)


PEFT_SPECS = [
    dict(target_modules=["qkv"]), dict(target_modules=["attn.proj", "fc2"]), dict(target_modules=["proj"]),
    dict(target_modules=r".*blocks\.1\..*(qkv|fc1)"), dict(target_modules=r"qkv"), dict(target_modules=["blocks.0"]),
    dict(target_modules=["fc1"], layers_to_transform=[1]), dict(target_modules=["qkv"], layers_to_transform=0),
    dict(target_modules=["qkv", "proj"], layers_to_transform=[0], layers_pattern="blocks"),
    dict(target_modules=["qkv"], layers_to_transform=[1], layers_pattern=["stages", "blocks"]),
]


@pytest.mark.parametrize("spec", PEFT_SPECS, ids=str)
@pytest.mark.parametrize("name", ["timm_vit", "timm_swin", "hf_dinov2"])
def test_name_rules_are_peft_s(name, spec):
    """Which modules a target_modules / layers_to_transform / layers_pattern spec selects: PEFT's own
    check_target_module_exists is the oracle, over every module name of real models."""
    from peft import LoraConfig
    from peft.tuners.tuners_utils import check_target_module_exists

    from blocklora.adapters.targeting import match

    model = _named(name)
    peft_cfg = LoraConfig(**spec)
    expected = [n for n, _ in model.named_modules() if n and check_target_module_exists(peft_cfg, n)]
    cfg = AdapterConfig(**spec, n_blocks=1)
    if not expected:
        with pytest.raises(ConfigError, match="matched no module of this|have no block index by|selects none of the "
                                                 "block indices"):
            match(model, cfg)
        return
    try:
        got = [t.path for t in match(model, cfg)]
    except ConfigError as e:  # a selected module blocklora cannot adapt (patch_embed.proj: a 4x4 conv) is refused
        assert "cannot adapt" in str(e) and str(e).split()[2].rstrip(":") in expected, e
        return
    assert got == expected


def test_errors_name_the_problem_and_leave_the_model_untouched():
    model, x = _build("timm_vit"), _input("timm_vit")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    types = [type(m) for m in model.modules()]

    def untouched():
        assert [type(m) for m in model.modules()] == types and blocklora.adapter_config(model) is None
        assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items()) and all(
            p.requires_grad for p in model.parameters())

    with pytest.raises(ConfigError, match=r"target_modules=\('attention',\) matched no module of this "
                                          r"VisionTransformer: its adaptable modules are named like patch_embed.proj"):
        blocklora.inject(model, AdapterConfig(target_modules=["attention"]))
    untouched()
    # the Linears match and would fit; the patch embedding (an 8x8 convolution) does not: nothing is changed
    with pytest.raises(ConfigError, match=r"cannot adapt patch_embed.proj: only 1x1.*\(Conv2d\)"):
        blocklora.inject(model, AdapterConfig(target_modules=["fc1", "proj"], n_blocks=1))
    untouched()
    with pytest.raises(ConfigError, match=r"cannot adapt blocks.0.norm1: it is a timm.layers.norm."
                                          r"LayerNorm; blocklora adapts nn.Linear"):
        blocklora.inject(model, AdapterConfig(target_modules=r"blocks\.0\.(norm1|attn\.qkv)"))
    untouched()
    with pytest.raises(ConfigError, match="n_blocks=5 does not divide in_features"):
        blocklora.inject(model, AdapterConfig(target_modules=["qkv"], n_blocks=5))
    untouched()
    with pytest.raises(ConfigError, match="blocks.0.attn.qkv lies inside blocks.0.attn"):
        blocklora.inject(model, AdapterConfig(target_modules=["attn", "qkv"], n_blocks=1, target_types=None))
    untouched()
    with pytest.raises(ConfigError, match="layers .layers_to_transform. cannot be used when target_modules is a "
                                          "regular expression"):
        AdapterConfig(target_modules=r".*qkv", layers=[0])
    with pytest.raises(ConfigError, match="fused names 'to_qkv'"):
        blocklora.inject(model, AdapterConfig(target_modules=["qkv"], fused={"to_qkv": "qkv"}))
    untouched()
    with pytest.raises(ConfigError, match="row blocks k,v are not supported"):
        AdapterConfig(target_modules=["qkv"], fused={"qkv": "kv"})
    # a baseline method would otherwise get LoRA layers (its n_blocks is 1)
    with pytest.raises(ConfigError, match="method 'probe' injects no adapter: .*inject.. takes block_lora or lora"):
        blocklora.inject(model, AdapterConfig(method="probe", target_modules=["qkv"]))
    untouched()
    # CLIP-LoRA's named layer ranges count the blocks the names select (here 2): "top" is block 1. As in PEFT, a
    # top-level "blocks.{i}" needs layers_pattern (PEFT's default rule wants a name before the layers' name)
    cfg = AdapterConfig(target_modules=["qkv"], layers="top", layers_pattern="blocks")
    assert [t.path for t in blocklora.plan(model, cfg)] == ["blocks.1.attn.qkv"]
    with pytest.raises(ConfigError, match=r"layers=\(1,\): the modules matched \(e.g. blocks.0.attn.qkv\) have no "
                                          "block index by PEFT's default rule"):
        blocklora.plan(model, AdapterConfig(target_modules=["qkv"], layers=[1]))
    blocklora.inject(model, AdapterConfig(target_modules=["qkv"], fused={"qkv": "qkv"}), probe=lambda: model(x))
    assert isinstance(model.blocks[0].attn.qkv, blocklora.BlockLoRAFusedQKV)


def test_modules_the_model_never_calls_and_other_architectures_are_refused(tmp_path):
    vit = _build("torchvision_vit")
    with pytest.raises(ConfigError, match="MultiheadAttention encoder.layers.encoder_layer_0.self_attention reads "
                                          "its weight without calling it; target the attention itself"):
        blocklora.inject(vit, AdapterConfig(target_types=[nn.Linear], n_blocks=1))
    gpt2 = _build("gpt2")
    with pytest.raises(ConfigError, match="cannot adapt transformer.h.0.attn.c_attn: fused q/k/v row blocks need an "
                                          "nn.Linear .*, it is a Conv1D; adapt it as one matrix"):
        blocklora.inject(gpt2, AdapterConfig(target_modules=["c_attn"], fused={"c_attn": "qkv"}))
    model = _build("sequential")
    blocklora.inject(model, _cfg("sequential"))
    blocklora.save_adapter(model, tmp_path / "a")
    other = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 4))  # another head: same class, other shape
    with pytest.raises(AdapterMismatchError, match=r"2.lora_B has shape \(8, 2\), the model needs \(4, 2\)"):
        blocklora.load_adapter(other, tmp_path / "a", force=True)
    with pytest.raises(AdapterMismatchError, match="was trained on a Sequential, this model is a ModuleList: its "
                                                   "targeting .* belongs to another architecture"):
        blocklora.load_adapter(nn.ModuleList([nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 8)]), tmp_path / "a",
                               force=True)
    assert not any(".lora_" in k for k in other.state_dict())


def test_the_readme_example_runs_as_written(tmp_path, monkeypatch):
    """README's "Block-LoRA on any PyTorch model" snippet, executed exactly as printed (in a scratch folder)."""
    text = (REPO / "README.md").read_text()
    section = text.split("## Block-LoRA on any PyTorch model", 1)[1].split("\n## ", 1)[0]
    snippet = section.split("```python\n", 1)[1].split("```", 1)[0]
    assert "clip" not in snippet.lower() and len(snippet.strip().splitlines()) <= 13
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    torch.manual_seed(0)
    exec(compile(snippet, "README.md", "exec"), scope)  # noqa: S102 - the README's own code
    model = scope["model"]
    from blocklora.adapters.inject import is_merged

    assert is_merged(model) and blocklora.adapter_config(model).fused == (("qkv", ("q", "k", "v")),)
    assert (tmp_path / "vit_adapter" / "blocklora_adapter.safetensors").is_file()
    assert isinstance(model.blocks[0].attn.qkv, blocklora.BlockLoRAFusedQKV)
    blocklora.unmerge(model)  # the frozen weights back, to float rounding: a fresh model loads the adapter
    fresh = scope["timm"].create_model("vit_tiny_patch16_224", num_classes=10, img_size=64)
    fresh.load_state_dict({k: v for k, v in model.state_dict().items() if ".lora_" not in k}, strict=False)
    blocklora.load_adapter(fresh, tmp_path / "vit_adapter", force=True)
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(fresh.eval()(images), model.eval()(images), rtol=1e-4, atol=1e-5)


class _Bypass(nn.Module):
    """Reads its Linear's weight without calling it (as nn.MultiheadAttention does with out_proj)."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x):
        return torch.nn.functional.linear(x, self.fc.weight, self.fc.bias)


def test_the_probe_refuses_an_adapter_the_model_never_calls_and_undoes_everything():
    torch.manual_seed(0)
    model, x = nn.Sequential(_Bypass(), nn.Linear(8, 8)).eval(), torch.randn(2, 8)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ConfigError, match=r"the adapter on 0.fc is never called: _Bypass \(0\) reads the weights of "
                                          "its fc without calling it.*; leave it out of target_modules"):
        blocklora.inject(model, AdapterConfig(target_types=[nn.Linear], n_blocks=1), probe=lambda: model(x))
    assert type(model[0].fc) is nn.Linear and type(model[1]) is nn.Linear and blocklora.adapter_config(model) is None
    assert model.state_dict().keys() == before.keys() and all(p.requires_grad for p in model.parameters())
    assert blocklora.inject(model, AdapterConfig(target_modules=["1"], n_blocks=1), probe=lambda: model(x)) == ["1"]


def test_the_former_names_are_the_same_objects():
    from blocklora.adapters import sites, targeting

    assert blocklora.Placement is blocklora.Targeting is sites.Placement is targeting.Targeting
    assert blocklora.register_finder is blocklora.register_targeting is sites.register_finder
    assert sites.find_placement is targeting.find_targeting and sites.Site is blocklora.Site


def test_a_family_targeting_and_its_names_give_the_same_adapters():
    """open_clip's ready-made targeting (q, k, v of every block of both towers) is the same data as naming its
    attention modules: the same adapter tensors, names and shapes."""
    from blocklora.adapters.inject import expected_shapes
    from conftest import make_openclip

    model = make_openclip()
    family = expected_shapes(model, AdapterConfig())
    by_name = expected_shapes(model, AdapterConfig(target_modules=r"(visual\.)?transformer\.resblocks\.\d+\.attn"))
    blocks = sum(name.endswith(".attn") and "resblocks" in name for name, _ in model.named_modules())
    assert family == by_name and len(family) == blocks * 3 * 2  # q, k, v x (A, B) per block of both towers


def test_shared_modules_and_tied_weights_are_refused():
    # A module under two names, or a head tied to the input embedding (GPT-2's lm_head): only the replaced name
    # would call the adapter and merge() writes into the shared tensor, so merged != unmerged. PEFT adapts one name
    # (model.named_modules() skips the other) and warns at most; here both names are refused, the model untouched.
    lin = nn.Linear(8, 8)
    shared = nn.Sequential(lin, nn.GELU(), lin)
    for names in (["0"], ["2"]):
        with pytest.raises(ConfigError, match=r"cannot adapt (0|2): its weight is also the model's (2|0).weight "
                                              r"\(a shared module or tied weight\)"):
            blocklora.inject(shared, AdapterConfig(target_modules=names, n_blocks=2))
        assert shared[0] is shared[2] is lin and lin.weight.requires_grad
    gpt2 = _build("gpt2")
    assert gpt2.lm_head.weight is gpt2.transformer.wte.weight
    with pytest.raises(ConfigError, match="cannot adapt lm_head: its weight is also the model's transformer.wte"):
        blocklora.inject(gpt2, AdapterConfig(target_modules=["lm_head", "c_attn"], n_blocks=1))
    assert blocklora.adapter_config(gpt2) is None and all(p.requires_grad for p in gpt2.parameters())


def test_without_a_probe_the_first_forward_refuses_an_adapter_its_parent_never_calls():
    # timm's BEiT and torchvision's Swin read qkv.weight with F.linear instead of calling qkv: an adapter there would
    # train nothing and only merge() would change the outputs. inject() cannot run a model it does not know how to
    # feed; the parent's first forward says so instead (once: the hooks remove themselves)
    import timm
    from torchvision.models.swin_transformer import SwinTransformer

    beit = timm.create_model("beit_base_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=1,
                             embed_dim=32, num_heads=2, num_classes=5)
    swin = SwinTransformer(patch_size=[4, 4], embed_dim=16, depths=[2], num_heads=[2], window_size=[4, 4],
                           num_classes=5)
    for model, where in ((beit, r"Attention \(blocks.0.attn\) reads the weights of its qkv"),
                         (swin, r"ShiftedWindowAttention \(features.1.0.attn\) reads the weights of its qkv")):
        blocklora.inject(model, AdapterConfig(target_modules=["qkv"], fused={"qkv": "qkv"}))
        with pytest.raises(ConfigError, match=f"is never called: {where} without calling it, so training would "
                                              "change nothing"):
            model(torch.randn(1, 3, 32, 32))
    model, x = _build("timm_vit"), _input("timm_vit")  # a parent that calls its adapters: no error, no hook left
    blocklora.inject(model, AdapterConfig(target_modules=["qkv", "attn.proj"], fused={"qkv": "qkv"}))
    model(x)
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


@pytest.mark.parametrize("batch_first", [True, False])
def test_torch_transformer_encoder_layers_keep_calling_their_adapted_attention(batch_first):
    # nn.TransformerEncoderLayer reads self_attn._qkv_same_embed_dim (an AttributeError on the adapted module) and,
    # in eval under no_grad, would run torch's fused kernel on in_proj_weight, bypassing the adapters
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=batch_first)
    model = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False).eval()
    x = torch.randn(2, 5, 8)
    with torch.no_grad():
        stock = model(x)  # the fused fast path
        blocklora.inject(model, AdapterConfig(target_modules=["self_attn"], n_blocks=2, projections="qkvo"))
        torch.testing.assert_close(model(x), stock, atol=1e-5, rtol=0)
        randomize_adapters(model, std=0.5)
        adapted = model(x)
        assert (adapted - stock).abs().max() > 0.1  # the adapters are used in eval too
        blocklora.merge(model)
        torch.testing.assert_close(model(x), adapted, atol=1e-5, rtol=0)


@pytest.mark.parametrize("wrap", [torch.compile, nn.DataParallel], ids=["compile", "data_parallel"])
def test_an_adapter_of_a_compiled_or_wrapped_model_is_the_plain_models(wrap, tmp_path):
    # the wrapper prefixes every name (_orig_mod., module.): saved as such, the adapter would not load into the plain
    # model (it was refused as "other frozen weights"); the adapter belongs to the model inside
    model, x = _build("sequential").eval(), _input("sequential")
    wrapped = wrap(model)
    assert blocklora.inject(wrapped, _cfg("sequential")) == ["0", "2"] and blocklora.adapter_config(wrapped)
    randomize_adapters(model)
    blocklora.save_adapter(wrapped, tmp_path / "a")
    assert set(blocklora.merged_state_dict(wrapped)) == set(_build("sequential").state_dict())
    for target in (_build("sequential").eval(), wrap(_build("sequential").eval())):
        blocklora.load_adapter(target, tmp_path / "a")
        torch.testing.assert_close(blocklora.adapters.inject.unwrap(target)(x), model(x))
