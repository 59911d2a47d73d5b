"""transformers CLIPModel: PEFT's LoRA (sound on separate Linears) as an oracle for n_blocks=1, and HF export."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import blocklora
from blocklora import AdapterConfig, inject
from conftest import example_inputs, make_hf, randomize_adapters

peft = pytest.importorskip("peft")


def _feats(model):
    images, tokens = example_inputs()
    with torch.no_grad():
        img = model.get_image_features(pixel_values=images)
        txt = model.get_text_features(input_ids=tokens)
    return getattr(img, "pooler_output", img), getattr(txt, "pooler_output", txt)


@pytest.mark.parametrize("scaling", ["rslora", "standard"])
def test_n1_equals_peft_lora(scaling):
    ours = make_hf()
    inject(ours, AdapterConfig(method="lora", r=4, alpha=2.0, dropout=0.0, scaling=scaling, projections="qkvo"))
    randomize_adapters(ours, std=0.1)
    cfg = peft.LoraConfig(r=4, lora_alpha=2.0, lora_dropout=0.0, use_rslora=scaling == "rslora",
                          target_modules=["q_proj", "k_proj", "v_proj", "out_proj"])
    theirs = peft.get_peft_model(make_hf(), cfg)
    with torch.no_grad():
        for name, layer in blocklora.adapter_layers(ours):
            target = theirs.base_model.model.get_submodule(name)
            target.lora_A["default"].weight.copy_(layer.lora_A)
            target.lora_B["default"].weight.copy_(layer.lora_B)
    for a, b in zip(_feats(ours), _feats(theirs)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert blocklora.count_trainable(ours) == sum(p.numel() for p in theirs.parameters() if p.requires_grad)


def test_block_lora_equals_peft_lora_with_tiled_a():
    """Block-LoRA is LoRA whose A is [A_s, ..., A_s]: PEFT with that A must agree."""
    ours = make_hf()
    inject(ours, AdapterConfig(n_blocks=4, dropout=0.0))
    randomize_adapters(ours, std=0.1)
    theirs = peft.get_peft_model(make_hf(), peft.LoraConfig(r=2, lora_alpha=1.0, use_rslora=True,
                                                             target_modules=["q_proj", "k_proj", "v_proj"]))
    with torch.no_grad():
        for name, layer in blocklora.adapter_layers(ours):
            target = theirs.base_model.model.get_submodule(name)
            target.lora_A["default"].weight.copy_(layer.lora_A.repeat(1, 4))
            target.lora_B["default"].weight.copy_(layer.lora_B)
    for a, b in zip(_feats(ours), _feats(theirs)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_merged_export_loads_into_stock_transformers_without_blocklora(tmp_path):
    model = make_hf()
    inject(model, AdapterConfig(projections="qkvo"))
    randomize_adapters(model)
    expected = _feats(model)
    model.save_pretrained(tmp_path / "merged", state_dict=blocklora.merged_state_dict(model))
    torch.save([t for t in expected], tmp_path / "expected.pt")
    code = f"""
import sys, torch
sys.modules['blocklora'] = None  # importing blocklora would fail: the export must not need it
from transformers import CLIPModel
m = CLIPModel.from_pretrained({str(tmp_path / 'merged')!r}, local_files_only=True).eval()
g = torch.Generator().manual_seed(0)
images = torch.randn(3, 3, 32, 32, generator=g)
tokens = torch.randint(1, 511, (4, 16), generator=g)
for i in range(4):
    tokens[i, 3 + i] = 511; tokens[i, 4 + i:] = 0
with torch.no_grad():
    img = m.get_image_features(pixel_values=images); txt = m.get_text_features(input_ids=tokens)
img, txt = getattr(img, 'pooler_output', img), getattr(txt, 'pooler_output', txt)
e = torch.load({str(tmp_path / 'expected.pt')!r})
torch.testing.assert_close(img, e[0], rtol=1e-5, atol=1e-5)
torch.testing.assert_close(txt, e[1], rtol=1e-5, atol=1e-5)
print('ok')
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().endswith("ok")
