"""The reference recipe, difference by difference: the last partial batch, dropout masks, the frozen weights' dtype.

`--method lora` reproduces CLIP-LoRA on each point; each choice is a config key (docs/recipe.md)."""

from __future__ import annotations

import json

import pytest
import torch

from blocklora import AdapterConfig, inject
from blocklora.backbones import load_backbone
from blocklora.cli.main import main
from blocklora.config.run_config import RunConfig
from blocklora.engine.runtime import make_runtime
from blocklora.engine.stream import StepBatches
from conftest import make_hf, make_openclip
from gen_data import make_folder_dataset


def test_method_defaults_and_explicit_keys():
    lora = RunConfig().with_overrides(["adapter.method=lora", "adapter.n_blocks=1"]).resolved()
    assert (lora.train.drop_last, lora.adapter.dropout_mask, lora.train.frozen_dtype) == \
        (False, "per_projection", "autocast")
    block = RunConfig().resolved()
    assert (block.train.drop_last, block.adapter.dropout_mask, block.train.frozen_dtype) == (True, "shared", "fp32")
    mixed = RunConfig().with_overrides(["adapter.method=lora", "adapter.n_blocks=1", "train.drop_last=true",
                                        "adapter.dropout_mask=shared", "train.frozen_dtype=fp32"]).resolved()
    assert (mixed.train.drop_last, mixed.adapter.dropout_mask, mixed.train.frozen_dtype) == (True, "shared", "fp32")
    assert mixed.resolved() == mixed  # resolving is idempotent


@pytest.mark.parametrize(("drop_last", "sizes"), [(False, [32, 15, 32, 15]), (True, [32, 32, 32, 32])])
def test_the_last_partial_batch(drop_last, sizes):
    """DTD 1-shot: 47 images, batch 32. CLIP-LoRA keeps the 15 (drop_last=False): every epoch sees every image."""
    s = StepBatches(47, 32, seed=3, start=0, total=4, drop_last=drop_last)
    batches = list(s)
    assert [len(b) for b in batches] == sizes == [s.global_size(t) for t in range(4)]
    if not drop_last:
        assert sorted(i for b in batches[:2] for i, _ in b) == list(range(47))
        assert sorted(i for b in batches[2:] for i, _ in b) == list(range(47))


def _qkv_adapter_outputs(model, layer_path: str, dropout_mask: str, training: bool):
    """The q, k and v adapter contributions of one attention whose three adapters are identical."""
    cfg = AdapterConfig(method="lora", dropout=0.5, dropout_mask=dropout_mask)
    inject(model, cfg)
    layer = model.get_submodule(layer_path)
    torch.manual_seed(0)
    with torch.no_grad():
        a, b = torch.randn(2, 64), torch.randn(64, 2)
        for p in "qkv":
            layer.lora_A[p].copy_(a)
            layer.lora_B[p].copy_(b)
    layer.train(training)
    x = torch.randn(2, 5, 64)
    with torch.no_grad():
        base = torch.nn.functional.linear(x, layer.in_proj_weight, layer.in_proj_bias)
        return (layer._qkv(x) - base).chunk(3, dim=-1)


@pytest.mark.parametrize("training", [True, False])
def test_one_dropout_mask_per_projection_or_one_shared(training):
    q, k, v = _qkv_adapter_outputs(make_openclip(), "visual.transformer.resblocks.0.attn", "per_projection", training)
    if training:  # CLIP-LoRA: an nn.Dropout in each of q, k and v
        assert not torch.allclose(q, k) and not torch.allclose(k, v)
    else:  # no dropout out of training: the same update either way
        torch.testing.assert_close(q, k)
    q, k, v = _qkv_adapter_outputs(make_openclip(), "visual.transformer.resblocks.0.attn", "shared", training)
    torch.testing.assert_close(q, k)
    torch.testing.assert_close(k, v)


def test_separate_linears_draw_their_own_masks():
    model = make_hf()
    inject(model, AdapterConfig(method="lora", dropout=0.5, dropout_mask="per_projection"))
    attn = model.vision_model.encoder.layers[0].self_attn
    torch.manual_seed(0)
    with torch.no_grad():
        for lin in (attn.q_proj, attn.k_proj):
            lin.lora_A.copy_(torch.ones_like(lin.lora_A))
            lin.lora_B.copy_(torch.ones_like(lin.lora_B))
    attn.train()
    x = torch.randn(2, 5, 64)
    with torch.no_grad():
        dq = attn.q_proj(x) - torch.nn.functional.linear(x, attn.q_proj.weight, attn.q_proj.bias)
        dk = attn.k_proj(x) - torch.nn.functional.linear(x, attn.k_proj.weight, attn.k_proj.bias)
    assert not torch.allclose(dq, dk)


def test_half_frozen_weights_run_half_residual_streams_with_fp32_adapters():
    """CLIP-LoRA's GPU precision (fp16 weights, fp16 residual streams), checked on the CPU with bf16 autocast."""
    rt = make_runtime("cpu", "bf16")
    backbone = load_backbone("tiny-clip", "none")
    backbone.cast_frozen(rt.frozen_dtype("autocast"))
    inject(backbone.model, AdapterConfig(method="lora"))
    model = backbone.model
    assert model.visual.transformer.resblocks[0].ln_1.weight.dtype == torch.float32  # norms stay fp32
    assert model.visual.conv1.weight.dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for p in model.parameters() if p.requires_grad)
    streams = []
    for tower in (model.visual.transformer, model.transformer):
        tower.resblocks[-1].register_forward_hook(lambda m, i, o: streams.append(o.dtype))
    with rt.autocast():
        img = backbone.encode_images(torch.randn(2, 3, 32, 32))
        txt = backbone.encode_prompts(["a photo of a cat.", "a photo of a dog."])
        (img.float().sum() + txt.float().sum()).backward()
    assert streams == [torch.bfloat16, torch.bfloat16]
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)


def test_lora_run_records_its_recipe(tmp_path):
    data = make_folder_dataset(tmp_path / "data", n_classes=3, train_per_class=3, test_per_class=2)
    out = tmp_path / "run"
    assert main(["train", "--model", "tiny-clip", "--pretrained", "none", "--dataset", "folder", "--root", str(data),
                 "--method", "lora", "--shots", "3", "--batch-size", "4", "--iters", "4", "--workers", "0",
                 "--precision", "bf16", "--device", "cpu", "--no-zero-shot", "--output", str(out)]) == 0
    r = json.loads((out / "results.json").read_text())
    assert (r["config"]["train"]["drop_last"], r["config"]["adapter"]["dropout_mask"]) == (False, "per_projection")
    assert r["precision"] == "bf16" and r["backbone"]["weights_dtype"] == "bfloat16+float32"
    assert r["config"]["train"]["frozen_dtype"] == "autocast" and r["iters"] == 4
    assert all(json.loads(line)["loss"] == json.loads(line)["loss"] for line in (out / "metrics.jsonl").open())
