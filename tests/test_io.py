"""Adapter files: what they record, refusal of adapters that do not fit, files of earlier versions, atomic writes.

The save / load round trip of every family is in the contract matrix (test_contract.py).
"""

from __future__ import annotations

import json

import pytest
import torch

import blocklora
from blocklora import AdapterConfig, AdapterMismatchError, inject, load_adapter, save_adapter
from blocklora.adapters.io import CONFIG_FILE, WEIGHTS_FILE
from blocklora.ownership import MARKER
from conftest import make_hf, make_openclip, randomize_adapters


def test_the_file_records_config_identity_and_version(tmp_path):
    model = make_openclip()
    inject(model, AdapterConfig(n_blocks=4, projections="qkvo", layers="1-2"))
    save_adapter(model, tmp_path / "a", backbone="tiny")
    meta = json.loads((tmp_path / "a" / CONFIG_FILE).read_text())
    assert meta["config"]["n_blocks"] == 4 and meta["config"]["layers"] == [1, 2]
    assert meta["backbone"] == {"class": "CLIP", "name": "tiny", "fingerprint": blocklora.fingerprint(make_openclip()),
                                "activation": "gelu"}
    assert meta["blocklora_version"] == blocklora.__version__
    assert meta["trainable_params"] == blocklora.count_trainable(model)


def test_an_adapter_written_by_an_earlier_version_loads(tmp_path):
    """Earlier versions wrote `blocks` (now `layers`) and an empty `extra`: the file still loads, same tensors."""
    model = make_openclip()
    inject(model, AdapterConfig(layers="1-2"))
    randomize_adapters(model)
    save_adapter(model, tmp_path / "a")
    path = tmp_path / "a" / CONFIG_FILE
    meta = json.loads(path.read_text())
    meta["config"]["blocks"] = meta["config"].pop("layers")
    meta["config"]["extra"] = {}
    path.write_text(json.dumps(meta))
    fresh = make_openclip()
    assert load_adapter(fresh, tmp_path / "a").layers == (1, 2)
    for k, v in blocklora.adapter_state_dict(model).items():
        assert torch.equal(v, fresh.get_parameter(k))


def test_keys_are_real_module_names(tmp_path):
    from safetensors.torch import load_file

    model = make_openclip()
    inject(model, AdapterConfig(layers=(0,), towers="vision", projections="qv"))
    save_adapter(model, tmp_path / "a")
    keys = set(load_file(tmp_path / "a" / WEIGHTS_FILE))
    assert keys == {f"visual.transformer.resblocks.0.attn.lora_{m}.{p}" for m in "AB" for p in "qv"}


def test_refuses_other_weights_unless_forced(tmp_path):
    model = make_openclip()
    inject(model)
    save_adapter(model, tmp_path / "a")
    other = make_openclip(seed=9)
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(AdapterMismatchError, match="other frozen weights"):
        load_adapter(other, tmp_path / "a")
    assert not list(blocklora.adapter_layers(other))
    assert all(torch.equal(before[k], v) for k, v in other.state_dict().items())
    load_adapter(other, tmp_path / "a", force=True)
    assert list(blocklora.adapter_layers(other))


def test_refuses_other_architecture(tmp_path):
    model = make_openclip()
    inject(model)
    save_adapter(model, tmp_path / "a")
    with pytest.raises(AdapterMismatchError, match="does not fit this model"):
        load_adapter(make_hf(), tmp_path / "a", force=True)


def test_refuses_tampered_shapes(tmp_path):
    from safetensors.torch import load_file, save_file

    model = make_openclip()
    inject(model)
    save_adapter(model, tmp_path / "a")
    tensors = load_file(tmp_path / "a" / WEIGHTS_FILE)
    name = sorted(tensors)[0]
    tensors[name] = torch.zeros(3, 3)
    save_file(tensors, tmp_path / "a" / WEIGHTS_FILE)
    with pytest.raises(AdapterMismatchError, match=f"{name} has shape"):
        load_adapter(make_openclip(), tmp_path / "a")
    del tensors[name]
    save_file(tensors, tmp_path / "a" / WEIGHTS_FILE)
    with pytest.raises(AdapterMismatchError, match=f"missing {name}"):
        load_adapter(make_openclip(), tmp_path / "a")


def test_missing_and_foreign_directories(tmp_path):
    with pytest.raises(AdapterMismatchError, match="is missing"):
        load_adapter(make_openclip(), tmp_path)
    (tmp_path / "adapter_config.json").write_text("{}")
    with pytest.raises(AdapterMismatchError, match="PEFT adapter"):
        load_adapter(make_openclip(), tmp_path)


def test_save_refuses_overwrite_and_leaves_no_temp(tmp_path):
    model = make_openclip()
    inject(model)
    save_adapter(model, tmp_path / "a")
    with pytest.raises(blocklora.BlockLoRAError, match="already exists"):
        save_adapter(model, tmp_path / "a")
    save_adapter(model, tmp_path / "a", overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == [MARKER, CONFIG_FILE, WEIGHTS_FILE]


def test_fingerprint_is_dtype_independent_and_weight_sensitive():
    a = make_openclip()
    fp = blocklora.fingerprint(a)
    assert blocklora.fingerprint(make_openclip().half()) == fp
    with torch.no_grad():
        a.visual.conv1.weight[0, 0, 0, 0] += 1.0
    assert blocklora.fingerprint(a) != fp
