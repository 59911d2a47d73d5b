"""The MLP activation is resolved once, recorded, and reproduced by every reload (backbones/activation.py).

A small open_clip architecture (tiny-clip, and a registered tiny name with its -quickgelu twin) with random weights
saved to files whose names say nothing, or say "openai"."""

from __future__ import annotations

import json
import logging

import open_clip
import pytest
import torch
from safetensors.torch import load_file, save_file

from blocklora import AdapterMismatchError, load_adapter
from blocklora.backbones import load_backbone
from blocklora.backbones.activation import EXPORT_KEY, mlp_activation, weights_evidence
from blocklora.cli.main import main
from blocklora.pipeline.run import load_trained
from gen_data import make_folder_dataset

TINY = {"embed_dim": 32, "vision_cfg": {"image_size": 32, "layers": 1, "width": 64, "patch_size": 16},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}


@pytest.fixture(scope="module")
def tiny_names(tmp_path_factory):
    """An open_clip model name and its -quickgelu twin, registered from JSON files (as open_clip ships them)."""
    folder = tmp_path_factory.mktemp("configs")
    (folder / "TinyQG-test.json").write_text(json.dumps(TINY))
    (folder / "TinyQG-test-quickgelu.json").write_text(json.dumps({**TINY, "quick_gelu": True}))
    open_clip.add_model_config(folder)
    return "TinyQG-test", "TinyQG-test-quickgelu"


def act(backbone) -> str:
    return mlp_activation(backbone.model)


def test_the_flag_is_honoured_on_every_path(tiny_names, tmp_path):
    plain, quick = tiny_names
    assert act(load_backbone(plain, "none")) == "gelu"
    assert act(load_backbone(quick, "none")) == "quick_gelu"
    assert act(load_backbone(quick, "none", "no")) == "gelu"  # the flag beats the name
    assert act(load_backbone(plain, "none", "yes")) == "quick_gelu"
    assert act(load_backbone("tiny-clip", "none", "yes")) == "quick_gelu"
    weights = tmp_path / "w.safetensors"
    save_file(dict(load_backbone(plain, "none").model.state_dict()), str(weights))
    assert act(load_backbone(plain, str(weights))) == "gelu"  # a file that says nothing: the architecture's default
    assert act(load_backbone(plain, str(weights), "yes")) == "quick_gelu"
    assert act(load_backbone(quick, str(weights), "no")) == "gelu"


def test_evidence_from_tags_exports_and_the_hub_cache(tmp_path, caplog):
    assert weights_evidence("ViT-B-32", "openai").quick_gelu is True  # open_clip's pretrained config of the tag
    assert weights_evidence("ViT-B-16", "laion2b_s34b_b88k").quick_gelu is False
    hub = tmp_path / "models--timm--vit_base_patch32_clip_224.openai" / "snapshots" / "0" / "open_clip_model.bin"
    hub.parent.mkdir(parents=True)
    hub.write_bytes(b"")
    assert weights_evidence("ViT-B-32", str(hub)).quick_gelu is True  # the cache path names the tag's repository
    marked = tmp_path / "w.safetensors"
    save_file({"x": torch.zeros(1)}, str(marked), metadata={EXPORT_KEY: "false"})
    assert weights_evidence("ViT-B-32", str(marked)).quick_gelu is False
    guessed = tmp_path / "ViT-B-32-openai.safetensors"
    save_file({"x": torch.zeros(1)}, str(guessed))
    assert weights_evidence("ViT-B-32", str(guessed)) is None  # a file name is no evidence, only a guess:
    from blocklora.backbones.activation import resolve

    with caplog.at_level(logging.WARNING):
        assert resolve("ViT-B-32", str(guessed)).quick_gelu is True
        assert resolve("ViT-B-32", "openai", "no").quick_gelu is False  # an explicit ablation, with a warning
    assert "guessing QuickGELU" in caplog.text and "features will differ" in caplog.text


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """tiny-clip weights in a file named like OpenAI's, trained one step with the guessed QuickGELU."""
    tmp = tmp_path_factory.mktemp("qg")
    data = make_folder_dataset(tmp / "data", n_classes=2, train_per_class=2, test_per_class=2)
    weights = tmp / "tiny-openai.safetensors"
    save_file(dict(load_backbone("tiny-clip", "none").model.state_dict()), str(weights))
    out = tmp / "run"
    assert main(["train", "--model", "tiny-clip", "--pretrained", str(weights), "--dataset", "folder", "--root",
                 str(data), "--shots", "1", "--iters", "2", "--batch-size", "2", "--workers", "0", "--lr", "1e-2",
                 "--no-zero-shot", "--output", str(out)]) == 0
    return tmp, weights, out


def test_the_resolved_value_is_recorded(quick_run):
    _, _, out = quick_run
    results = json.loads((out / "results.json").read_text())
    assert results["backbone"]["quick_gelu"] is True and results["backbone"]["activation"] == "quick_gelu"
    assert results["config"]["quick_gelu"] == "auto"  # the request stays what was asked
    meta = json.loads((out / "adapter" / "blocklora_adapter.json").read_text())
    assert meta["run"]["quick_gelu"] == "yes" and meta["backbone"]["activation"] == "quick_gelu"
    assert json.loads((out / "config.json").read_text())["quick_gelu"] is True


def test_reloads_use_the_record_whatever_the_file_name(quick_run):
    tmp, weights, out = quick_run
    renamed = tmp / "weights.safetensors"  # the same tensors under a name that says nothing
    renamed.write_bytes(weights.read_bytes())
    for pretrained in (None, str(renamed)):
        backbone, _, _ = load_trained(out / "adapter", pretrained=pretrained, device="cpu")
        assert act(backbone) == "quick_gelu"


@pytest.mark.parametrize("suffix", [".safetensors", ".pt", ""])
def test_every_export_carries_its_activation(quick_run, suffix, capsys):
    tmp, _, out = quick_run
    target = tmp / f"merged{suffix or '_dir'}"
    assert main(["export", "--adapter", str(out / "adapter"), "--output", str(target)]) == 0
    # tiny-clip is no open_clip name: a file's hint points to the folder form, whose snippet runs (test_first_hour)
    printed = capsys.readouterr().out
    assert ("export to a folder" in printed) if suffix else "create_model('local-dir:" in printed
    trained, _, _ = load_trained(out / "adapter", device="cpu")
    exported = load_backbone("tiny-clip", str(target))  # auto: the export's own record decides
    assert act(exported) == "quick_gelu"
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(exported.encode_images(x), trained.encode_images(x), rtol=1e-4, atol=1e-5)
    if not suffix:  # open_clip's local-dir format: stock open_clip builds QuickGELU from the folder alone
        stock = open_clip.create_model(f"local-dir:{target}")
        assert mlp_activation(stock) == "quick_gelu"
        with torch.no_grad():
            torch.testing.assert_close(stock.encode_image(x), trained.encode_images(x), rtol=1e-4, atol=1e-5)


def test_a_reload_that_would_change_the_activation_is_an_error(quick_run):
    tmp, weights, out = quick_run
    relabelled = tmp / "gelu-labelled.safetensors"  # the same tensors (same fingerprint), recorded as GELU
    save_file(load_file(str(weights)), str(relabelled), metadata={EXPORT_KEY: "false"})
    with pytest.raises(AdapterMismatchError, match="trained with QuickGELU"):
        load_trained(out / "adapter", pretrained=str(relabelled), device="cpu")
    gelu = load_backbone("tiny-clip", str(weights), "no")  # Python API: the fingerprint matches, the MLPs do not
    with pytest.raises(AdapterMismatchError, match="quick_gelu in its MLPs"):
        load_adapter(gelu.model, out / "adapter")
    load_adapter(gelu.model, out / "adapter", force=True)


def test_resume_keeps_the_recorded_activation(quick_run, tmp_path):
    """A resumed run reuses config.json's activation; weights that now say otherwise stop it before any work."""
    tmp, weights, out = quick_run
    data = tmp / "data"
    args = ["train", "--model", "tiny-clip", "--dataset", "folder", "--root", str(data), "--shots", "1", "--iters",
            "2", "--batch-size", "2", "--workers", "0", "--no-zero-shot", "--resume"]
    moved = tmp_path / "weights.safetensors"  # the run's request names this path; first the weights as trained
    moved.write_bytes(weights.read_bytes())
    for label, expected in (("true", 0), ("false", 2)):
        run = tmp_path / f"run-{label}"
        assert main([*args, "--pretrained", str(moved), "--output", str(run), "--quick-gelu", "yes"]) == 0
        (run / "results.json").unlink()  # as if interrupted before the end
        save_file(load_file(str(weights)), str(moved), metadata={EXPORT_KEY: label})
        assert main([*args, "--pretrained", str(moved), "--output", str(run), "--quick-gelu", "yes"]) == expected
        save_file(load_file(str(weights)), str(moved))
