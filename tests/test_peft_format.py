"""PEFT's LoRA format both ways, with the installed peft as the oracle: an exported blocklora adapter loaded by
PeftModel.from_pretrained gives blocklora's features; a PEFT adapter read back gives PEFT's; misfits are refused."""

from __future__ import annotations

import json
import math
import re
import resource
import shutil
import signal
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

import blocklora
from blocklora import AdapterConfig, inject
from blocklora.cli.main import main
from blocklora.errors import AdapterMismatchError, BlockLoRAError
from blocklora.interop.peft import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    load_peft_adapter,
    peft_refusal,
    read_peft_adapter,
    read_record,
    write_peft_adapter,
)
from conftest import example_inputs, hf_features, make_hf, make_openclip, randomize_adapters

peft = pytest.importorskip("peft")


def _max_diff(a, b) -> float:
    return max(float((x - y).abs().max()) for x, y in zip(a, b))


CONFIGS = {
    "block_lora": AdapterConfig(n_blocks=8, r=2, alpha=1.0, dropout=0.25, projections="qkvo"),
    "lora": AdapterConfig(method="lora", r=4, alpha=2.0, dropout=0.0, projections="qkvo"),
    "block_lora_mean_standard": AdapterConfig(n_blocks=4, r=3, alpha=3.0, fold="mean", scaling="standard",
                                              projections="qkvo"),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_export_loads_in_peft_with_the_same_features(name, tmp_path):
    ours = make_hf().eval()
    inject(ours, CONFIGS[name])
    randomize_adapters(ours, std=0.1)
    write_peft_adapter(ours, tmp_path / "peft", base_model="tiny")
    config = json.loads((tmp_path / "peft" / CONFIG_FILE).read_text())
    assert config["peft_type"] == "LORA" and len(config["target_modules"]) == 2 * 3 * 4  # two towers, 3 layers, qkvo
    theirs = peft.PeftModel.from_pretrained(make_hf().eval(), str(tmp_path / "peft")).eval()
    wrapped = [m for m in theirs.modules() if isinstance(m, peft.tuners.lora.LoraLayer)]
    assert len(wrapped) == 24
    layer = next(m for m in wrapped)
    assert layer.scaling["default"] == next(blocklora.adapter_layers(ours))[1]._scale or name.endswith("standard")
    frozen = hf_features(make_hf().eval())
    mine, peft_feats = hf_features(ours), hf_features(theirs)
    assert _max_diff(mine, frozen) > 1e-2  # the adapters change the features
    assert _max_diff(mine, peft_feats) < 1e-5, _max_diff(mine, peft_feats)
    # and back: the PEFT folder read by blocklora gives the same model (as plain LoRA)
    back = make_hf().eval()
    cfg = load_peft_adapter(back, tmp_path / "peft")
    assert cfg.method == "lora" and cfg.projections == ("q", "k", "v", "o") and cfg.r == CONFIGS[name].r
    assert _max_diff(hf_features(back), mine) < 1e-5


def test_block_lora_init_from_its_peft_export_is_exact(tmp_path):
    """Read with the run's own Block-LoRA config, the tiled A folds back to the one shared block, bit for bit."""
    cfg = CONFIGS["block_lora"]
    ours = make_hf()
    inject(ours, cfg)
    randomize_adapters(ours, std=0.1)
    write_peft_adapter(ours, tmp_path / "peft")
    got_cfg, tensors = read_peft_adapter(tmp_path / "peft", make_hf(), cfg)
    assert got_cfg == cfg
    expected = blocklora.adapter_state_dict(ours)
    assert set(tensors) == set(expected)
    for key, value in expected.items():
        assert torch.equal(tensors[key], value), key


def test_peft_trained_adapter_evaluates_in_blocklora(tmp_path):
    """An adapter PEFT made itself (its own keys, rank_pattern, rslora) gives PEFT's features in blocklora."""
    theirs = peft.get_peft_model(make_hf(), peft.LoraConfig(r=4, lora_alpha=8, use_rslora=True,
                                                            target_modules=["q_proj", "v_proj"],
                                                            rank_pattern={}, alpha_pattern={}))
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn_like(p) * 0.1)
    theirs.save_pretrained(str(tmp_path / "peft"))
    ours = make_hf()
    cfg = load_peft_adapter(ours, tmp_path / "peft")
    assert cfg.projections == ("q", "v") and cfg.towers == ("vision", "text") and cfg.scaling == "rslora"
    assert _max_diff(hf_features(ours), hf_features(theirs.eval())) < 1e-5
    # a Block-LoRA run cannot start from a LoRA whose A is not n equal blocks: refused by module
    with pytest.raises(AdapterMismatchError, match="not 8 equal blocks"):
        read_peft_adapter(tmp_path / "peft", make_hf(), AdapterConfig(r=4, projections="qv"))
    # nor a run placed elsewhere
    with pytest.raises(AdapterMismatchError, match="missing .*k_proj"):
        read_peft_adapter(tmp_path / "peft", make_hf(), AdapterConfig(method="lora", r=4, projections="qkv"))


def test_an_older_pefts_adapter_model_bin_is_read_as_peft_reads_it(tmp_path):
    """PEFT before safetensors saved adapter_model.bin (safe_serialization=False still does): read with torch's
    weights_only loader, as PEFT's load_peft_weights does, it gives PEFT's features; a pickle that would run code
    is refused, naming the file."""
    theirs = peft.get_peft_model(make_hf(), peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"],
                                                            init_lora_weights=False))
    theirs.save_pretrained(str(tmp_path / "peft"), safe_serialization=False)
    assert not (tmp_path / "peft" / WEIGHTS_FILE).exists() and (tmp_path / "peft" / "adapter_model.bin").is_file()
    ours = make_hf()
    load_peft_adapter(ours, tmp_path / "peft")
    assert _max_diff(hf_features(ours), hf_features(theirs.eval())) < 1e-5

    class RunsCode:
        def __reduce__(self):
            return (print, ("this ran",))

    torch.save({"base_model.model.x.lora_A.weight": RunsCode()}, tmp_path / "peft" / "adapter_model.bin")
    with pytest.raises(AdapterMismatchError, match=r"cannot read .*adapter_model.bin: .*weights_only loader"):
        read_peft_adapter(tmp_path / "peft", make_hf())


# rank_pattern / alpha_pattern keys in every form PEFT takes; the oracle is PEFT's own model built from them
PATTERNS = {
    "suffix": ({}, {"q_proj": 16}),
    "dotted suffix": ({}, {"layers.0.self_attn.q_proj": 16}),
    "full name": ({}, {"vision_model.encoder.layers.1.self_attn.v_proj": 0.5}),
    "regex alternation": ({}, {"(q|v)_proj": 16}),
    "anchored regex": ({}, {"^text_model.*": 3, "k_proj": 7}),
    "first key wins": ({}, {"v_proj": 6, ".*_proj": 2}),
    "first key wins, reversed": ({}, {".*_proj": 2, "v_proj": 6}),
    "one rank for all, per-tower alpha": ({".*": 2}, {r"text_model\..*": 5,
                                                      r"vision_model\.encoder\.layers\.[02]\..*": 3}),
}


@pytest.mark.parametrize("name", list(PATTERNS))
def test_pattern_keys_are_matched_as_peft_matches_them(name, tmp_path):
    """A PEFT adapter with rank_pattern / alpha_pattern keys (plain names, suffixes, regular expressions, several
    matching keys: the first in the file wins) read by blocklora gives the features PEFT's own loader gives."""
    rank_pattern, alpha_pattern = PATTERNS[name]
    r = 4 if rank_pattern else 2
    trained = peft.get_peft_model(make_hf(), peft.LoraConfig(
        r=r, lora_alpha=4, target_modules=["q_proj", "k_proj", "v_proj"], lora_dropout=0.0, init_lora_weights=False,
        rank_pattern=rank_pattern, alpha_pattern=alpha_pattern))
    trained.save_pretrained(str(tmp_path / "peft"))
    # PEFT writes its config with sorted keys; the patterns go back in their own order (the order decides)
    config_path = tmp_path / "peft" / CONFIG_FILE
    config_path.write_text(json.dumps({**json.loads(config_path.read_text()), "rank_pattern": rank_pattern,
                                       "alpha_pattern": alpha_pattern}))
    theirs = peft.PeftModel.from_pretrained(make_hf(), str(tmp_path / "peft")).eval()
    scalings = {float(m.scaling["default"]) for m in theirs.modules() if isinstance(m, peft.tuners.lora.LoraLayer)}
    assert scalings != {4 / r}  # the patterns change the scaling of some modules
    ours = make_hf()
    cfg = load_peft_adapter(ours, tmp_path / "peft")
    assert cfg.r == 2
    diff = _max_diff(hf_features(ours), hf_features(theirs))
    assert diff < 1e-5, diff


@pytest.mark.parametrize("init", ["pissa"])  # (the other such initializations: CONFIG_DAMAGE)
def test_adapters_on_a_residual_base_are_refused_and_their_conversion_gives_pefts_model(init, tmp_path):
    """PiSSA and OLoRA adapters hold only on W - scaling * B0 @ A0, which PEFT recomputes when it loads them: read
    as plain factors on the unchanged base they would compute another model. Refused by name, with PEFT's own way
    out; the converted file (path_initial_model_for_weight_conversion: a plain LoRA of twice the rank) gives the
    trained PEFT model's features in blocklora."""
    trained = peft.get_peft_model(make_hf(), peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"],
                                                             init_lora_weights=init))
    trained.peft_config["default"].init_lora_weights = True  # PEFT's recipe: the initial factors, saved as plain
    trained.save_pretrained(str(tmp_path / "initial"))
    trained.peft_config["default"].init_lora_weights = init
    with torch.no_grad():
        for name, p in trained.named_parameters():
            if "lora_" in name:
                p.add_(torch.randn_like(p) * 0.1)
    trained.save_pretrained(str(tmp_path / "raw"))
    with pytest.raises(AdapterMismatchError, match=rf"init_lora_weights '{init}' .*path_initial_model_for_weight_"):
        read_peft_adapter(tmp_path / "raw", make_hf())
    trained.save_pretrained(str(tmp_path / "converted"),
                            path_initial_model_for_weight_conversion=str(tmp_path / "initial"))
    ours = make_hf()
    assert load_peft_adapter(ours, tmp_path / "converted").r == 4
    diff = _max_diff(hf_features(ours), hf_features(trained.eval()))
    assert diff < 1e-5, diff


def test_pattern_key_is_pefts_rule():
    """pattern_key / module_value against peft.utils.other.get_pattern_key on every module name of a CLIP."""
    from peft.utils.other import get_pattern_key

    from blocklora.interop.peft import module_value

    names = [n for n, _ in make_hf().named_modules() if n]
    patterns = [{"q_proj": 1}, {"proj": 2}, {"self_attn.q_proj": 3, "q_proj": 4}, {"(q|v)_proj": 5},
                {r"layers\.1\..*": 6, "out_proj": 7}, {"^vision_model.*": 8}, {"model.encoder": 9},
                {"_proj": 10}, {"layers.1": 11}, {"text_model.encoder.layers.0.self_attn.q_proj": 12}]
    for pattern in patterns:
        for module in names:
            assert module_value(pattern, module, -1) == pattern.get(get_pattern_key(pattern, module), -1), \
                (pattern, module)


def test_modules_of_different_ranks_are_refused_by_name(tmp_path):
    theirs = peft.get_peft_model(make_hf(), peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"],
                                                            rank_pattern={"(.*)v_proj": 4}))
    theirs.save_pretrained(str(tmp_path / "peft"))
    with pytest.raises(AdapterMismatchError, match=r"different ranks .*q_proj: 2, .*v_proj: 4"):
        read_peft_adapter(tmp_path / "peft", make_hf())
    with pytest.raises(AdapterMismatchError, match=r"v_proj has rank 4 \(rank_pattern\['\(\.\*\)v_proj'\] 4\)"):
        read_peft_adapter(tmp_path / "peft", make_hf(), AdapterConfig(method="lora", r=2, projections="qv"))


# adapter_config.json damaged field by field, every wrong type and range: (fields set, what the error names)
CONFIG_DAMAGE = {
    "config a list": ([1, 2], "not a PEFT LoRA adapter"), "peft_type number": ({"peft_type": 5}, "peft_type 5"),
    "r missing": ({"r": None}, "r must be an integer >= 1, got None"), "r text": ({"r": "2"}, "r must be"),
    "r zero": ({"r": 0}, "r must be"), "r fraction": ({"r": 2.5}, "r must be"), "r bool": ({"r": True}, "r must be"),
    "alpha missing": ({"lora_alpha": None}, "lora_alpha must be"), "alpha text": ({"lora_alpha": "abc"}, "lora_alpha"),
    "alpha zero": ({"lora_alpha": 0}, "lora_alpha must be a finite number > 0"),
    "alpha negative": ({"lora_alpha": -1}, "lora_alpha"), "alpha NaN": ({"lora_alpha": math.nan}, "lora_alpha"),
    "alpha infinite": ({"lora_alpha": math.inf}, "lora_alpha"), "alpha bool": ({"lora_alpha": True}, "lora_alpha"),
    "alpha list": ({"lora_alpha": [1]}, "lora_alpha"),
    "alpha huge": ({"lora_alpha": 1e308}, "lora_alpha must be a finite number > 0 and <= 10000, got 1e\\+308"),
    "rslora text": ({"use_rslora": "yes"}, "use_rslora must be true or false"),
    "rslora number": ({"use_rslora": 1}, "use_rslora"),
    "dropout text": ({"lora_dropout": "0.1"}, "lora_dropout"), "dropout one": ({"lora_dropout": 1.0}, "lora_dropout"),
    "dropout negative": ({"lora_dropout": -0.1}, "lora_dropout"),
    "dropout NaN": ({"lora_dropout": math.nan}, "lora_dropout"),
    "bias": ({"bias": "all"}, "trains biases"), "bias number": ({"bias": 5}, "trains biases"),
    "DoRA": ({"use_dora": True}, "uses use_dora"), "DoRA text": ({"use_dora": "false"}, "uses use_dora"),
    **{f"init {v}": ({"init_lora_weights": v}, f"init_lora_weights '{v}' \\({m}\\) rewrites the base weights")
       for v, m in (("pissa", "PiSSA"), ("pissa_niter_4", "PiSSA"), ("olora", "OLoRA"), ("corda", "CorDA"),
                    ("loftq", "LoftQ"), ("lora_ga", "LoRA-GA"))},
    "init unknown": ({"init_lora_weights": "spectral"}, "init_lora_weights 'spectral' is not an initialization"),
    "init number": ({"init_lora_weights": 2}, "init_lora_weights must be true, false or"),
    "modules to save": ({"modules_to_save": ["visual_projection"]}, "uses modules_to_save"),
    "modules to save text": ({"modules_to_save": "x"}, "uses modules_to_save"),
    "activated LoRA": ({"alora_invocation_tokens": [5, 7]}, "uses alora_invocation_tokens \\(Activated LoRA"),
    "layer replication": ({"layer_replication": [[0, 2], [1, 3]]}, "uses layer_replication"),
    "base model number": ({"base_model_name_or_path": 5}, "base_model_name_or_path must be"),
    "rank_pattern list": ({"rank_pattern": [1, 2]}, "rank_pattern must be a mapping"),
    "rank_pattern text": ({"rank_pattern": "q_proj"}, "rank_pattern must be a mapping"),
    "rank_pattern bad regex": ({"rank_pattern": {"[": 2}}, "rank_pattern key '\\[' is not a regular expression"),
    "rank_pattern value text": ({"rank_pattern": {"q_proj": "2"}}, "rank_pattern\\['q_proj'\\] must be an integer"),
    "rank_pattern value zero": ({"rank_pattern": {"q_proj": 0}}, "rank_pattern"),
    "rank_pattern value fraction": ({"rank_pattern": {"q_proj": 1.5}}, "rank_pattern"),
    "rank_pattern value null": ({"rank_pattern": {"q_proj": None}}, "rank_pattern"),
    "rank_pattern value bool": ({"rank_pattern": {"q_proj": True}}, "rank_pattern"),
    "alpha_pattern list": ({"alpha_pattern": [1]}, "alpha_pattern must be a mapping"),
    "alpha_pattern bad regex": ({"alpha_pattern": {"(q": 1}}, "alpha_pattern key '\\(q' is not a regular expression"),
    "alpha_pattern value text": ({"alpha_pattern": {"q_proj": "abc"}}, "alpha_pattern\\['q_proj'\\] must be a fin"),
    "alpha_pattern value zero": ({"alpha_pattern": {"q_proj": 0}}, "alpha_pattern"),
    "alpha_pattern value negative": ({"alpha_pattern": {"q_proj": -2}}, "alpha_pattern"),
    "alpha_pattern value NaN": ({"alpha_pattern": {"q_proj": math.nan}}, "alpha_pattern"),
    "alpha_pattern value infinite": ({"alpha_pattern": {"q_proj": math.inf}}, "alpha_pattern"),
    "alpha_pattern value null": ({"alpha_pattern": {"q_proj": None}}, "alpha_pattern"),
    "alpha_pattern value list": ({"alpha_pattern": {"q_proj": [1]}}, "alpha_pattern"),
    "alpha_pattern value huge": ({"alpha_pattern": {"(q|v)_proj": 1e308}},
                                 "alpha_pattern\\['\\(q\\|v\\)_proj'\\] must be a finite number > 0 and <= 10000"),
    "targets one projection": ({"target_modules": ["q_proj"]}, "does not target .*v_proj .*PEFT would ignore"),
    "targets none": ({"target_modules": []}, "does not target"),
    "targets a regex of q only": ({"target_modules": ".*q_proj"}, "does not target .*v_proj"),
    "excludes v": ({"exclude_modules": ["v_proj"]}, "does not target .*v_proj"),
    "layers_to_transform narrows": ({"target_modules": ["q_proj", "v_proj"], "layers_to_transform": [0]},
                                    "does not target .*layers.1"),
    "targets number": ({"target_modules": 5}, "target_modules must be module names"),
    "targets bad regex": ({"target_modules": "("}, "target_modules '\\(' is not a regular expression"),
    "layers_to_transform text": ({"layers_to_transform": "0"}, "layers_to_transform must be layer indices"),
    "exclude number": ({"exclude_modules": 5}, "exclude_modules must be"),
    "nested too deep": ("[" * 100_000 + "]" * 100_000, "cannot read"),
    "not JSON": ("{'r': 2", "cannot read"),
}


@pytest.fixture(scope="module")
def peft_dir(tmp_path_factory):
    model = make_hf()
    inject(model, AdapterConfig(method="lora", r=2, projections="qv"))
    randomize_adapters(model)
    path = tmp_path_factory.mktemp("peft") / "peft"
    write_peft_adapter(model, path)
    return path


@pytest.mark.parametrize("damage", list(CONFIG_DAMAGE))
def test_damaged_config_fields_are_one_error_naming_the_field(damage, peft_dir, tmp_path):
    fields, needle = CONFIG_DAMAGE[damage]
    damaged = tmp_path / "peft"
    shutil.copytree(peft_dir, damaged)
    config = json.loads((peft_dir / CONFIG_FILE).read_text())
    text = fields if isinstance(fields, str) else json.dumps(fields if isinstance(fields, list) else
                                                             {**config, **fields})
    (damaged / CONFIG_FILE).write_text(text)
    with pytest.raises(AdapterMismatchError, match=needle) as e:
        read_peft_adapter(damaged, make_hf())
    assert "\n" not in str(e.value) and str(damaged) in str(e.value)


def test_integer_factors_are_a_dtype_error_naming_the_tensor(peft_dir, tmp_path):
    shutil.copytree(peft_dir, tmp_path / "p")
    tensors = load_file(peft_dir / WEIGHTS_FILE)
    key = sorted(tensors)[0]
    save_file({**tensors, key: (100 * tensors[key]).long()}, tmp_path / "p" / WEIGHTS_FILE)
    with pytest.raises(AdapterMismatchError, match=rf"{WEIGHTS_FILE}: {re.escape(key)} holds int64 values, where a "
                                                   "LoRA factor is floating point"):
        read_peft_adapter(tmp_path / "p", make_hf())


@pytest.mark.parametrize("targets", [
    {"target_modules": ["q_proj", "v_proj"]}, {"target_modules": ".*(q|v)_proj"}, {"target_modules": "all-linear"},
    {"target_modules": ["q_proj", "v_proj"], "layers_to_transform": [0, 1, 2]},
    {"target_modules": ["q_proj", "v_proj"], "layers_to_transform": [1]},
    {"target_modules": ["q_proj", "v_proj", "k_proj"], "exclude_modules": ["k_proj"]},
    {"target_modules": ["q_proj", "v_proj"], "exclude_modules": ".*text_model.*"}])
def test_modules_are_read_as_peft_targets_them(targets, peft_dir, tmp_path):
    """PEFT gives LoRA layers to the modules its target fields name (and ignores the factors of any other): the
    adapter loads exactly when PEFT's own model has a LoRA layer on every module the weights hold."""
    from peft import PeftModel

    config = json.loads((peft_dir / CONFIG_FILE).read_text())
    shutil.copytree(peft_dir, tmp_path / "p")
    (tmp_path / "p" / CONFIG_FILE).write_text(json.dumps({**config, **targets}))
    held = {k.removeprefix("base_model.model.").rsplit(".lora_", 1)[0] for k in load_file(peft_dir / WEIGHTS_FILE)}
    peft_model = PeftModel.from_pretrained(make_hf(), tmp_path / "p")
    lora = {n.removeprefix("base_model.model.") for n, m in peft_model.named_modules() if hasattr(m, "lora_A")}
    if held <= lora:
        read_peft_adapter(tmp_path / "p", make_hf())
    else:
        with pytest.raises(AdapterMismatchError, match="PEFT would ignore their factors"):
            read_peft_adapter(tmp_path / "p", make_hf())


def test_initializations_that_leave_the_base_alone_are_read(peft_dir, tmp_path):
    """The factors alone are the update for these init_lora_weights (PEFT 0.21's that do not touch the base)."""
    config = json.loads((peft_dir / CONFIG_FILE).read_text())
    expected = read_peft_adapter(peft_dir, make_hf())[1]
    for init in (True, False, None, "gaussian", "eva", "orthogonal", "mica"):
        shutil.rmtree(tmp_path / "p", ignore_errors=True)
        shutil.copytree(peft_dir, tmp_path / "p")
        (tmp_path / "p" / CONFIG_FILE).write_text(json.dumps({**config, "init_lora_weights": init}))
        _, tensors = read_peft_adapter(tmp_path / "p", make_hf())
        assert all(torch.equal(tensors[k], expected[k]) for k in expected), init


def test_damaged_export_record_is_one_error_line(peft_dir, tmp_path, capsys):
    """The record an export keeps in the weights' header (model, pretrained, template) is checked when eval reads
    it: a damaged one is one error line, before any model is loaded."""
    from safetensors.torch import load_file, save_file

    for record, needle in (('{"model": 5}', "names model 5"), ('{"pretrained": [1]}', "names pretrained"),
                           ('{"template": "no slot"}', "template 'no slot' has no '{}'"),
                           ("[1]", "not a JSON object"), ("{", "not a JSON object")):
        shutil.rmtree(tmp_path / "r", ignore_errors=True)
        shutil.copytree(peft_dir, tmp_path / "r")
        weights = tmp_path / "r" / WEIGHTS_FILE
        save_file(load_file(weights), weights, metadata={"format": "pt", "blocklora": record})
        with pytest.raises(AdapterMismatchError, match=needle):
            read_record(tmp_path / "r")
        code = main(["eval", "--peft-adapter", str(tmp_path / "r"), "--dataset", "folder", "--root", str(tmp_path),
                     "--workers", "0"])
        err = capsys.readouterr().err
        assert code == 2 and err.count("error:") == 1 and needle.split("'")[0] in err and "Traceback" not in err


def test_misfits_are_refused_by_name(tmp_path):
    ours = make_hf()
    inject(ours, AdapterConfig(method="lora", r=2))
    write_peft_adapter(ours, tmp_path / "peft")
    from transformers import CLIPConfig, CLIPModel

    wider = CLIPModel(CLIPConfig(text_config=dict(hidden_size=64, intermediate_size=96, num_attention_heads=4,
                                                  num_hidden_layers=3, vocab_size=512, max_position_embeddings=16),
                                 vision_config=dict(hidden_size=64, intermediate_size=128, num_attention_heads=4,
                                                    num_hidden_layers=3, image_size=32, patch_size=8),
                                 projection_dim=32))
    with pytest.raises(AdapterMismatchError, match=r"text_model.*has lora_A \(2, 48\)"):
        load_peft_adapter(wider, tmp_path / "peft")
    (tmp_path / "peft" / CONFIG_FILE).write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 1,
                                                             "use_dora": True}))
    with pytest.raises(AdapterMismatchError, match="use_dora"):
        load_peft_adapter(make_hf(), tmp_path / "peft")
    (tmp_path / "peft" / CONFIG_FILE).write_text(json.dumps({"peft_type": "IA3"}))
    with pytest.raises(AdapterMismatchError, match="not a PEFT LoRA adapter"):
        load_peft_adapter(make_hf(), tmp_path / "peft")


def test_open_clip_attention_is_refused_with_the_reason(tmp_path):
    model = make_openclip()
    inject(model, AdapterConfig())
    why = peft_refusal(model)
    assert why and "nn.MultiheadAttention" in why and "twice" in why
    with pytest.raises(BlockLoRAError, match="cannot export in PEFT's format"):
        write_peft_adapter(model, tmp_path / "peft")
    assert not (tmp_path / "peft").exists()


def test_file_size_ratio_is_the_tiling(tmp_path):
    """Block-LoRA's A is stored n times in the PEFT file: the size ratio is (r d_in + r d_out) / (r d_in/n + ...)."""
    ours = make_hf()
    inject(ours, AdapterConfig(n_blocks=8, projections="qkvo"))
    blocklora.save_adapter(ours, tmp_path / "ours")
    write_peft_adapter(ours, tmp_path / "peft")
    own = (tmp_path / "ours" / "blocklora_adapter.safetensors").stat().st_size
    exported = (tmp_path / "peft" / WEIGHTS_FILE).stat().st_size
    d = {"vision": 64, "text": 48}
    params = sum(2 * d[t] // 8 + 2 * d[t] for t in d) * 3 * 4
    tiled = sum(2 * d[t] + 2 * d[t] for t in d) * 3 * 4
    assert blocklora.count_trainable(ours) == params
    # float32 tensors plus a header each: the ratio of the files is that of the tensors, up to the headers
    assert abs(exported / own - tiled / params) < 0.15 * tiled / params


def test_cli_export_format_peft(tmp_path, capsys):
    """`blocklora export --format peft` on a trained transformers run; open_clip runs refuse on one line."""
    from conftest import make_hf_dir
    from gen_data import make_folder_dataset

    data = make_folder_dataset(tmp_path / "data", n_classes=3, train_per_class=2, test_per_class=2)
    model_dir = make_hf_dir(tmp_path / "hf")
    run = tmp_path / "run"
    assert main(["train", "--model", f"hf:{model_dir}", "--dataset", "folder", "--root", str(data), "--shots", "1",
                 "--iters", "2", "--batch-size", "3", "--workers", "0", "--no-zero-shot", "--output", str(run)]) == 0
    capsys.readouterr()
    assert main(["export", "--format", "peft", "--adapter", str(run / "adapter"), "--output",
                 str(tmp_path / "peft")]) == 0
    printed = capsys.readouterr().out
    assert "PEFT LoRA adapter written" in printed
    config = json.loads((tmp_path / "peft" / CONFIG_FILE).read_text())
    assert config["base_model_name_or_path"] == str(model_dir)
    # the printed snippet runs as printed (issue 25): PEFT's own auto_mapping lets AutoPeftModel build the base
    hint = printed.split("load it with: ", 1)[1].strip()
    assert hint == f"import peft; model = peft.AutoPeftModel.from_pretrained({str(tmp_path / 'peft')!r})"
    assert config["auto_mapping"]["base_model_class"] == "CLIPModel"
    scope: dict = {}
    exec(hint, scope)  # noqa: S102
    auto = scope["model"].eval()
    card = (tmp_path / "peft" / "README.md").read_text()
    assert "K = 1 shots per class, seed 1" in card and "accuracy: top-1" in card and hint in card
    from transformers import CLIPModel

    theirs = peft.PeftModel.from_pretrained(CLIPModel.from_pretrained(str(model_dir)), str(tmp_path / "peft"))
    backbone, _, _ = blocklora.pipeline.trained.load_trained(run / "adapter", device="cpu")
    images, _ = example_inputs()
    with torch.no_grad():
        mine = backbone.encode_images(images)
        img = theirs.eval().get_image_features(pixel_values=images)
    assert float((mine - getattr(img, "pooler_output", img)).abs().max()) < 1e-5
    with torch.no_grad():
        auto_img = auto.get_image_features(pixel_values=images)
    assert float((mine - getattr(auto_img, "pooler_output", auto_img)).abs().max()) < 1e-5
    # the merged transformers export's snippet runs as printed too, and gives the same features
    capsys.readouterr()
    assert main(["export", "--adapter", str(run), "--output", str(tmp_path / "merged")]) == 0
    hint = capsys.readouterr().out.split("load it with: ", 1)[1].strip()
    exec(hint, scope)  # noqa: S102
    with torch.no_grad():
        merged = scope["model"].eval().get_image_features(pixel_values=images)
    assert float((mine - getattr(merged, "pooler_output", merged)).abs().max()) < 1e-5
    assert "## How to load it" in (tmp_path / "merged" / "README.md").read_text()
    # a second export onto it needs --overwrite, and then replaces only what it wrote
    assert main(["export", "--format", "peft", "--adapter", str(run / "adapter"), "--output",
                 str(tmp_path / "peft")]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["export", "--format", "peft", "--adapter", str(run / "adapter"), "--output",
                 str(tmp_path / "peft"), "--overwrite"]) == 0
    # a full disk (a file size limit here) is one error line, as for every other writer, and leaves nothing
    proc = subprocess.run([sys.executable, "-m", "blocklora", "export", "--format", "peft", "--adapter", str(run),
                           "--output", str(tmp_path / "full" / "peft")], capture_output=True, text=True,
                          preexec_fn=_file_size_limit)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 1 and len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert "File too large" in errors[0] and "disk full or not writable" in errors[0]
    assert not list((tmp_path / "full").iterdir())
    # eval reads the PEFT folder on the same backbone
    capsys.readouterr()
    assert main(["eval", "--peft-adapter", str(tmp_path / "peft"), "--model", f"hf:{model_dir}", "--dataset",
                 "folder", "--root", str(data), "--workers", "0", "--json"]) == 0
    peft_eval = json.loads(capsys.readouterr().out)
    assert main(["eval", "--adapter", str(run / "adapter"), "--dataset", "folder", "--root", str(data), "--workers",
                 "0", "--json"]) == 0
    own_eval = json.loads(capsys.readouterr().out)
    assert peft_eval["top1"] == own_eval["top1"] and peft_eval["n"] == own_eval["n"]


def _file_size_limit():
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead of killing
    resource.setrlimit(resource.RLIMIT_FSIZE, (4000, 4000))


def test_init_adapter_starts_a_run_from_a_peft_adapter(tmp_path):
    """--init-adapter: the prepared run's adapters hold the PEFT adapter's update; a misfit is refused first."""
    from blocklora.config.run_config import RunConfig
    from blocklora.pipeline.prepare import prepare
    from conftest import make_hf_dir
    from gen_data import make_folder_dataset

    data = make_folder_dataset(tmp_path / "data", n_classes=3, train_per_class=2, test_per_class=2)
    model_dir = make_hf_dir(tmp_path / "hf")
    src = make_hf_dir(tmp_path / "hf2")  # the same seed: the same weights
    from transformers import CLIPModel

    donor = CLIPModel.from_pretrained(str(src))
    inject(donor, AdapterConfig(n_blocks=4, r=2, projections="qv"))
    randomize_adapters(donor, std=0.1)
    write_peft_adapter(donor, tmp_path / "peft")
    base = ["model=hf:" + str(model_dir), "data.dataset=folder", f"data.root={data}", "data.shots=1",
            "train.iters=1", "data.workers=0"]
    cfg = RunConfig().with_overrides(base + ["adapter.n_blocks=4", "adapter.projections=q,v",
                                             f"train.init_adapter={tmp_path / 'peft'}"])
    p = prepare(cfg)
    got, expected = blocklora.adapter_state_dict(p.backbone.model), blocklora.adapter_state_dict(donor)
    assert set(got) == set(expected) and all(torch.equal(got[k], expected[k]) for k in expected)
    with pytest.raises(AdapterMismatchError, match="missing .*k_proj"):
        prepare(RunConfig().with_overrides(base + ["adapter.n_blocks=4",
                                                   f"train.init_adapter={tmp_path / 'peft'}"]))
