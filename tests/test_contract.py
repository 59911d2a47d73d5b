"""The adapter contract, one matrix over (model family x adapter layer kind x config), as PEFT's custom-model tests.

For every tiny family (tests/families.py) and config:
  - an untrained adapter is the identity, and every adapter is on the forward path (inject's probe);
  - the merged model equals the unmerged one, and unmerge restores the frozen weights;
  - save / load gives identical outputs;
  - the merged export loads into the stock model, in a process where blocklora cannot be imported, and gives the
    same outputs;
  - training changes every adapter tensor and nothing else;
  - trainable parameters = sum over adapted matrices of r * d_in / n + r * d_out, as the cost report says.
The layer kinds each family uses are pinned by LAYER_KINDS.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import blocklora
from blocklora import AdapterConfig, inject
from blocklora.adapters.fused import BlockLoRAFusedQKV, BlockLoRAMultiheadAttention
from blocklora.adapters.layers import BlockLoRAConv1x1, BlockLoRALinear
from blocklora.adapters.report import adapter_cost
from conftest import randomize_adapters
from families import FAMILIES, Unavailable

pytestmark = pytest.mark.usefixtures("one_thread")

CONFIGS = {
    "block_lora-qkvo": AdapterConfig(n_blocks=4, projections="qkvo", dropout=0.25),
    "lora-qv-top": AdapterConfig(method="lora", projections="qv", layers="top", dropout=0.0),
}
CASES = [(f, c) for f in FAMILIES for c in CONFIGS]
LAYER_KINDS = {  # family -> the layer classes its towers get with q, k, v, o (vision + text)
    "open_clip": {BlockLoRAMultiheadAttention}, "openai_seq_first": {BlockLoRAMultiheadAttention},
    "openai_clip_package": {BlockLoRAMultiheadAttention},
    "siglip": {BlockLoRAFusedQKV, BlockLoRALinear, BlockLoRAMultiheadAttention},
    "pe_core": {BlockLoRAFusedQKV, BlockLoRALinear, BlockLoRAMultiheadAttention},
    "mobileclip": {BlockLoRAFusedQKV, BlockLoRALinear, BlockLoRAMultiheadAttention},
    "eva02": {BlockLoRALinear, BlockLoRAMultiheadAttention},
    "hf_clip": {BlockLoRALinear}, "hf_metaclip_2": {BlockLoRALinear}, "hf_siglip": {BlockLoRALinear},
    "hf_chinese_clip": {BlockLoRALinear}, "hf_altclip": {BlockLoRALinear},
    "effnet_minilm": {BlockLoRAConv1x1, BlockLoRALinear},
}
_built: dict[str, torch.nn.Module] = {}


def fresh(family: str) -> torch.nn.Module:
    """A new copy of the family's tiny model (built once per session)."""
    if family not in _built:
        try:
            _built[family] = FAMILIES[family].build(0)
        except Unavailable as e:
            pytest.skip(str(e))
    return copy.deepcopy(_built[family])


def features(family: str, model: torch.nn.Module, seed: int = 0):
    with torch.no_grad():
        return FAMILIES[family].features(model, FAMILIES[family].inputs(seed))


def adapted(family: str, config: str, trained: bool = True) -> torch.nn.Module:
    """The family's model with the config's adapters, every one proven on the forward path by the probe."""
    model = fresh(family)
    f = FAMILIES[family]
    inject(model, CONFIGS[config], probe=lambda: f.features(model, f.inputs(1, n_img=1, n_txt=1)))
    if trained:
        randomize_adapters(model)
    return model


def train_adapters(model: torch.nn.Module) -> None:
    """The trainer's modes: the frozen model in eval (BatchNorm statistics, its own dropout), adapters training."""
    model.eval()
    for _, layer in blocklora.adapter_layers(model):
        layer.train()


def assert_close(a, b, tol: float = 1e-5) -> None:
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=tol, atol=tol)


@pytest.mark.parametrize(("family", "config"), CASES)
def test_untrained_adapter_is_the_identity(family, config):
    model = fresh(family)
    reference = features(family, model)
    model = adapted(family, config, trained=False)
    train_adapters(model)  # adapter dropout on: B = 0 still makes the update zero
    assert_close(features(family, model), reference)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_layer_kinds(family):
    model = adapted(family, "block_lora-qkvo")
    assert {type(layer) for _, layer in blocklora.adapter_layers(model)} == LAYER_KINDS[family]
    assert {layer.tower for _, layer in blocklora.adapter_layers(model)} == {"vision", "text"}


@pytest.mark.parametrize(("family", "config"), CASES)
def test_merged_equals_unmerged_and_unmerge_restores(family, config):
    frozen = {k: v.clone() for k, v in fresh(family).state_dict().items()}
    model = adapted(family, config)
    unmerged = features(family, model)
    assert not all(torch.allclose(a, b, atol=1e-4) for a, b in zip(unmerged, features(family, fresh(family))))
    blocklora.merge(model)
    assert_close(features(family, model), unmerged, 2e-5)
    blocklora.unmerge(model)
    restored = {k: v for k, v in model.state_dict().items() if ".lora_" not in k}
    assert restored.keys() == frozen.keys()
    for key, value in frozen.items():
        torch.testing.assert_close(restored[key], value, rtol=0, atol=1e-6)


@pytest.mark.parametrize(("family", "config"), CASES)
def test_save_load_round_trip(family, config, tmp_path):
    model = adapted(family, config)
    blocklora.save_adapter(model, tmp_path / "adapter", backbone=family)
    other = fresh(family)
    assert blocklora.load_adapter(other, tmp_path / "adapter") == CONFIGS[config]
    for a, b in zip(features(family, other), features(family, model)):
        assert torch.equal(a, b)


@pytest.mark.parametrize(("family", "config"), CASES)
def test_training_touches_only_adapter_tensors(family, config):
    model = adapted(family, config, trained=False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    train_adapters(model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    f = FAMILIES[family]
    for step in range(3):
        img, txt = f.features(model, f.inputs(step))
        loss = img.float().pow(2).mean() + txt.float().pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    changed = {k for k, v in model.state_dict().items() if not torch.equal(before[k], v)}
    assert changed == {k for k in before if ".lora_" in k}


@pytest.mark.parametrize(("family", "config"), CASES)
def test_parameter_count_formula(family, config):
    """r * d_in / n + r * d_out per adapted matrix, from the frozen weights' shapes."""
    cfg = CONFIGS[config]
    model = adapted(family, config, trained=False)
    expected = 0
    for _, layer in blocklora.adapter_layers(model):
        if isinstance(layer, BlockLoRAMultiheadAttention):
            d_in = layer.in_proj_weight.shape[1]
            matrices = [(d_in, d_in)] * len(layer.projections)
        elif isinstance(layer, BlockLoRAFusedQKV):
            matrices = [(layer.weight.shape[1], layer.weight.shape[0] // 3)] * len(layer.projections)
        else:  # a Linear or a 1x1 convolution
            matrices = [(layer.weight.shape[1], layer.weight.shape[0])]
        expected += sum(cfg.r * d_in // cfg.n_blocks + cfg.r * d_out for d_in, d_out in matrices)
    assert blocklora.count_trainable(model) == expected == adapter_cost(model)["total"]["params"]


@pytest.fixture(scope="session")
def stock_reloads(tmp_path_factory):
    """Every case's merged export, reloaded in ONE process that cannot import blocklora; its outputs per case."""
    folder = tmp_path_factory.mktemp("exports")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    cases = {}
    for family, config in CASES:
        try:
            model = adapted(family, config)
        except pytest.skip.Exception:
            continue
        model.eval()
        path = folder / (f"{family}-{config}" + ("" if FAMILIES[family].library == "transformers" else ".safetensors"))
        FAMILIES[family].save_stock(blocklora.merged_state_dict(model), model, path)
        cases[f"{family}/{config}"] = {"family": family, "path": str(path)}
        torch.save(features(family, model), folder / f"{family}-{config}.expected.pt")
    (folder / "cases.json").write_text(json.dumps(cases))
    code = f"""
import json, sys, torch
sys.modules['blocklora'] = None  # the exports must load with the stock libraries alone
sys.path.insert(0, {str(Path(__file__).parent)!r})
from families import FAMILIES, Unavailable
out = {{}}
for key, case in json.loads(open({str(folder / 'cases.json')!r}).read()).items():
    f = FAMILIES[case['family']]
    model = f.load_stock(__import__('pathlib').Path(case['path']))
    with torch.no_grad():
        out[key] = [t.tolist() for t in f.features(model, f.inputs(0))]
json.dump(out, open({str(folder / 'outputs.json')!r}, 'w'))
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    torch.set_num_threads(threads)
    assert done.returncode == 0, done.stderr[-3000:]
    outputs = json.loads((folder / "outputs.json").read_text())
    return {key: ([torch.tensor(t) for t in outputs[key]],
                  torch.load(folder / f"{c['family']}-{key.split('/')[1]}.expected.pt")) for key, c in cases.items()}


@pytest.mark.parametrize(("family", "config"), CASES)
def test_merged_export_loads_into_the_stock_model_without_blocklora(family, config, stock_reloads):
    if f"{family}/{config}" not in stock_reloads:
        fresh(family)  # skips with the reason
    stock, expected = stock_reloads[f"{family}/{config}"]
    assert_close(stock, expected, 2e-5)
