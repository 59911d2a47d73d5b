"""PEFT's LoRA format both ways, with the installed peft as the oracle: an exported blocklora adapter loaded by
PeftModel.from_pretrained gives blocklora's features; a PEFT adapter read back gives PEFT's; misfits are refused."""

from __future__ import annotations

import json

import pytest
import torch

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
    assert "PEFT LoRA adapter written" in capsys.readouterr().out
    config = json.loads((tmp_path / "peft" / CONFIG_FILE).read_text())
    assert config["base_model_name_or_path"] == str(model_dir)
    from transformers import CLIPModel

    theirs = peft.PeftModel.from_pretrained(CLIPModel.from_pretrained(str(model_dir)), str(tmp_path / "peft"))
    backbone, _, _ = blocklora.pipeline.trained.load_trained(run / "adapter", device="cpu")
    images, _ = example_inputs()
    with torch.no_grad():
        mine = backbone.encode_images(images)
        img = theirs.eval().get_image_features(pixel_values=images)
    assert float((mine - getattr(img, "pooler_output", img)).abs().max()) < 1e-5
    # a second export onto it needs --overwrite, and then replaces only what it wrote
    assert main(["export", "--format", "peft", "--adapter", str(run / "adapter"), "--output",
                 str(tmp_path / "peft")]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["export", "--format", "peft", "--adapter", str(run / "adapter"), "--output",
                 str(tmp_path / "peft"), "--overwrite"]) == 0
    # eval reads the PEFT folder on the same backbone
    capsys.readouterr()
    assert main(["eval", "--peft-adapter", str(tmp_path / "peft"), "--model", f"hf:{model_dir}", "--dataset",
                 "folder", "--root", str(data), "--workers", "0", "--json"]) == 0
    peft_eval = json.loads(capsys.readouterr().out)
    assert main(["eval", "--adapter", str(run / "adapter"), "--dataset", "folder", "--root", str(data), "--workers",
                 "0", "--json"]) == 0
    own_eval = json.loads(capsys.readouterr().out)
    assert peft_eval["top1"] == own_eval["top1"] and peft_eval["n"] == own_eval["n"]


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
