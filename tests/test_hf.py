"""transformers CLIPModel: PEFT's LoRA (sound on separate Linears) as an oracle for n_blocks=1 and for Block-LoRA
as LoRA with a tiled A. (Its export into the stock class is in the contract matrix, test_contract.py.)"""

from __future__ import annotations

import pytest
import torch

import blocklora
from blocklora import AdapterConfig, inject
from conftest import hf_features, make_hf, randomize_adapters

peft = pytest.importorskip("peft")


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
    for a, b in zip(hf_features(ours), hf_features(theirs)):
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
    for a, b in zip(hf_features(ours), hf_features(theirs)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
