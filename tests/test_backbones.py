"""Model families beyond OpenAI-style CLIP: SigLIP / SigLIP 2, PE-Core, EVA-02, MobileCLIP, and the transformers
types (CLIP, MetaCLIP 2, SigLIP, Chinese-CLIP, AltCLIP) chosen by config.model_type.

Loading (the right class, nothing random, refusals), each model's own preprocessing and text padding, tokenizers
offline, `params` on the real architectures, logit scale auto, SigLIP's sigmoid loss and probabilities, and a
2-step `train` on every family's tiny model.
"""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from blocklora.backbones import hf, load_backbone
from blocklora.backbones.network import hub_reachable
from blocklora.backbones.openclip_sources import load_tokenizer, preprocess_for
from blocklora.cli.main import main
from blocklora.errors import BackboneError
from families import FAMILIES, register, save_hf_checkpoint, save_tokenizer
from gen_data import make_folder_dataset

pytestmark = pytest.mark.usefixtures("one_thread")

OPEN_CLIP_TINY = {"siglip": "tiny-siglip-test", "pe_core": "tiny-pe-test", "eva02": "tiny-eva02-test",
                  "mobileclip": "tiny-mobileclip-test"}
HF_TINY = ("hf_metaclip_2", "hf_siglip", "hf_chinese_clip", "hf_altclip")


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """No hub: what this machine and an air-gapped cluster see (and an empty HF cache)."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    hub_reachable.cache_clear()
    yield
    hub_reachable.cache_clear()


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_folder_dataset(tmp_path_factory.mktemp("data"), n_classes=3, train_per_class=2, test_per_class=2)


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    return save_tokenizer(tmp_path_factory.mktemp("tokenizer"))


def _train(args, data, out, capsys) -> dict:
    code = main(["train", *args, "--dataset", "folder", "--root", str(data), "--shots", "1", "--iters", "2",
                 "--batch-size", "3", "--workers", "0", "--output", str(out)])
    assert code == 0, capsys.readouterr().err
    return json.loads((out / "results.json").read_text())


# -- params on the real architectures, offline ----------------------------------------------------------------------
# (model, vision: (adapted matrices' input width, output width, count), text: (width, layers)) for q, k, v, r=2, n=8
REAL = {
    "ViT-B-16-SigLIP": ((768, 768, 12 * 3), (768, 12)),
    "ViT-B-16-SigLIP2": ((768, 768, 12 * 3), (768, 12)),
    "PE-Core-B-16": ((768, 768, 12 * 3), (1024, 24)),
    "EVA02-B-16": ((768, 768, 12 * 3), (512, 12)),
    "MobileCLIP2-S0": ((512, 512, 2 * 3), (512, 12)),  # FastViT: attention only in its last stage (2 blocks)
}


@pytest.mark.slow
@pytest.mark.parametrize("model", list(REAL))
def test_params_offline_with_both_towers_adapted(model, offline, capsys):
    """No weights, no tokenizer, no network: the counts are r * d_in / n + r * d_out per adapted matrix."""
    assert main(["params", "--model", model, "--pretrained", "none", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    (d_in, d_out, count), (width, layers) = REAL[model]
    vision = count * (2 * d_in // 8 + 2 * d_out)
    text = layers * 3 * (2 * width // 8 + 2 * width)
    assert report["towers"]["vision"]["params"] == vision and report["towers"]["text"]["params"] == text
    assert report["trainable_params"] == vision + text


# -- tokenizers ------------------------------------------------------------------------------------------------------
def test_a_hub_tokenizer_offline_fails_at_once_naming_it_and_the_fix(monkeypatch, tmp_path):
    """No network (and no HF_HUB_OFFLINE): one connection attempt, no download retries, one line with the fix."""
    import socket

    attempts = []

    def unreachable(host, *args, **kwargs):  # every TCP client (socket, urllib3, httpx) resolves the host first
        attempts.append(host)
        raise socket.gaierror(-2, "Name or service not known")

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setattr(socket, "getaddrinfo", unreachable)
    hub_reachable.cache_clear()
    try:
        with pytest.raises(BackboneError) as err:
            load_tokenizer("ViT-B-16-SigLIP")
    finally:
        hub_reachable.cache_clear()
    message = str(err.value)
    # hub_reachable's probe, then the local cache only (huggingface_hub may add its own once-a-day registry request,
    # which gives up at the first failure): no download, no retries
    assert attempts[0] == "huggingface.co" and len(attempts) <= 2
    assert "\n" not in message and "timm/ViT-B-16-SigLIP" in message and "--tokenizer DIR" in message
    with pytest.raises(BackboneError, match="ships with open_clip: drop --tokenizer"):
        load_tokenizer("ViT-B-16", "/some/dir")


def test_train_without_the_tokenizer_is_one_line_and_writes_nothing(offline, data, tmp_path, capsys):
    register()
    out = tmp_path / "run"
    code = main(["train", "--model", "tiny-siglip-test", "--pretrained", "none", "--dataset", "folder", "--root",
                 str(data), "--iters", "2", "--workers", "0", "--output", str(out)])
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert code == 2 and len(err) == 1 and "blocklora-test/none" in err[0] and "--tokenizer" in err[0]
    assert "free space" not in err[0] and not out.exists()


def test_siglip_with_a_local_tokenizer_pads_to_its_fixed_length(offline, tokenizer_dir):
    register()
    b = load_backbone("tiny-siglip-test", "none", tokenizer=str(tokenizer_dir))
    tokens = b.tokenize(["a photo of a cat.", "sky"])
    assert tokens.shape == (2, 16)  # SigLIP pools its LAST position: padded to the context length
    assert b.preprocess.mean == (0.48145466, 0.4578275, 0.40821073)  # no tag: the tiny config has none
    hfb = hf.load(str(save_hf_checkpoint("hf_siglip", tokenizer_dir.parent / "hf_siglip")))
    tokens = hfb.tokenize(["a photo of a cat.", "sky"])
    assert list(tokens) == ["input_ids"] and tokens["input_ids"].shape == (2, 16)  # max_position_embeddings


# -- transformers families by model type -----------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["hf_chinese_clip", "hf_altclip", "hf_siglip", "hf_metaclip_2"])
def test_each_checkpoint_loads_into_its_own_class_with_every_weight(family, tmp_path):
    """Chinese-CLIP used to load as a CLIPModel: its BERT text tower dropped, a random CLIP one in its place."""
    path = save_hf_checkpoint(family, tmp_path / family)
    b = load_backbone(f"hf:{path}")
    stock = FAMILIES[family].build(0)
    assert type(b.model) is type(stock)
    saved = stock.state_dict()
    assert all(torch.equal(v, saved[k]) for k, v in b.model.state_dict().items())
    placement = b.placement()
    assert {t: len(s) for t, s in placement.sites.items()} == {"vision": 2, "text": 2}


def test_refused_model_types_and_incomplete_checkpoints(tmp_path):
    from safetensors.torch import load_file, save_file
    from transformers import BertConfig, BertModel, Siglip2Config, Siglip2Model

    naflex = tmp_path / "naflex"
    Siglip2Model(Siglip2Config(text_config=dict(hidden_size=32, intermediate_size=64, num_attention_heads=4,
                                                num_hidden_layers=1, vocab_size=64),
                               vision_config=dict(hidden_size=32, intermediate_size=64, num_attention_heads=4,
                                                  num_hidden_layers=1, num_patches=16))).save_pretrained(naflex)
    with pytest.raises(BackboneError, match="SigLIP 2 NaFlex .* use a fixed-resolution SigLIP 2 checkpoint"):
        load_backbone(f"hf:{naflex}")
    bert = tmp_path / "bert"
    BertModel(BertConfig(hidden_size=32, num_attention_heads=4, num_hidden_layers=1, intermediate_size=64,
                         vocab_size=64)).save_pretrained(bert)
    with pytest.raises(BackboneError, match="a transformers 'bert' model: blocklora adapts the dual encoders clip, "):
        load_backbone(f"hf:{bert}")
    partial = save_hf_checkpoint("hf_chinese_clip", tmp_path / "partial")
    weights = load_file(str(partial / "model.safetensors"))
    save_file({k: v for k, v in weights.items() if not k.startswith("text_model.encoder")},
              str(partial / "model.safetensors"))
    with pytest.raises(BackboneError, match=r"not a complete ChineseCLIPModel checkpoint: \d+ weights are missing"):
        load_backbone(f"hf:{partial}")


# -- each model's own preprocessing ----------------------------------------------------------------------------------
class _Visual:
    image_size = 224
    preprocess_cfg: dict = {}


class _Model:
    visual = _Visual()


@pytest.mark.parametrize(("name", "tag", "expected"), [
    ("ViT-B-16-SigLIP", None, ((0.5,) * 3, (0.5,) * 3, "bicubic", "squash")),
    ("PE-Core-B-16", None, ((0.5,) * 3, (0.5,) * 3, "bilinear", "squash")),
    ("MobileCLIP2-S0", None, ((0.0,) * 3, (1.0,) * 3, "bilinear", "shortest")),
    ("ViT-B-16", "openai", ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711), "bicubic",
                            "shortest")),
])
def test_open_clip_preprocessing_comes_from_the_pretrained_config(name, tag, expected):
    """A tag's own config when the weights come from a tag; for a file or random weights, what all tags agree on."""
    import open_clip

    declared = open_clip.get_pretrained_cfg(name, tag) if tag else {}
    p = preprocess_for(name, _Model(), declared, f"{name}/{tag}" if tag else None, has_weights=False)
    assert (p.mean, p.std, p.interpolation, p.resize_mode) == expected and name in p.source


def test_squash_and_shortest_side_transforms():
    """SigLIP squashes the whole image to size x size; CLIP resizes the short side and crops the centre."""
    from blocklora.backbones.preprocess import Preprocess

    image = Image.new("RGB", (64, 32), (0, 0, 0))
    image.paste((255, 255, 255), (0, 0, 12, 32))  # a white band on the left
    squash = Preprocess(16, (0.0,) * 3, (1.0,) * 3, "bilinear", "squash").eval_transform()(image)
    crop = Preprocess(16, (0.0,) * 3, (1.0,) * 3, "bilinear", "shortest").eval_transform()(image)
    assert squash.shape == crop.shape == (3, 16, 16)
    assert squash[:, :, :2].min() > 0.9 and crop.max() < 0.01  # the band survives the squash, the crop cuts it


def test_hf_preprocessing_comes_from_the_processor_config(tmp_path):
    siglip = hf.load(str(save_hf_checkpoint("hf_siglip", tmp_path / "s")))
    clip = hf.load(str(save_hf_checkpoint("hf_metaclip_2", tmp_path / "m")))
    assert (siglip.preprocess.mean, siglip.preprocess.resize_mode) == ((0.5,) * 3, "squash")
    assert clip.preprocess.resize_mode == "shortest" and "preprocessor_config.json" in clip.preprocess.source


# -- logits, the sigmoid loss and predict ----------------------------------------------------------------------------
def test_sigmoid_loss_and_probabilities_are_siglips():
    from blocklora.engine.logits import Logits

    cosines, labels = torch.rand(4, 5) * 2 - 1, torch.tensor([0, 3, 3, 1])
    sigmoid, softmax = Logits(10.0, -2.0, "sigmoid"), Logits(10.0)
    z = -torch.ones(4, 5)
    z[torch.arange(4), labels] = 1
    expected = -torch.nn.functional.logsigmoid(z * (10 * cosines - 2)).sum()  # SigLIP, eq. 1
    torch.testing.assert_close(sigmoid.loss(sigmoid(cosines), labels), expected)
    torch.testing.assert_close(sigmoid.probabilities(sigmoid(cosines)), torch.sigmoid(10 * cosines - 2))
    torch.testing.assert_close(softmax.loss(softmax(cosines), labels),
                               torch.nn.functional.cross_entropy(10 * cosines, labels, reduction="sum"))
    assert torch.allclose(softmax.probabilities(softmax(cosines)).sum(-1), torch.ones(4))


def test_siglip_trains_with_its_own_scale_and_sigmoid_and_predict_says_so(data, tokenizer_dir, tmp_path, capsys):
    register()
    out = tmp_path / "run"
    results = _train(["--model", "tiny-siglip-test", "--pretrained", "none", "--tokenizer", str(tokenizer_dir),
                      "train.logit_scale=auto", "train.loss=sigmoid"], data, out, capsys)
    model = load_backbone("tiny-siglip-test", "none").model
    assert results["logits"] == {"scale": pytest.approx(float(model.logit_scale.detach().exp()), rel=1e-5),
                                 "bias": pytest.approx(-10.0), "kind": "sigmoid"}
    assert results["backbone"]["preprocess"]["source"].startswith("open_clip's default for tiny-siglip-test")
    image = next((data / "test").rglob("*.png"))
    capsys.readouterr()
    assert main(["predict", "--adapter", str(out / "adapter"), str(image), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)  # one JSON array
    assert rows[0]["probabilities"] == "sigmoid"  # each class on its own: sigma(scale * cos - 10) is tiny here
    assert sum(t["prob"] for t in rows[0]["top"]) < 0.5


def test_logit_scale_auto_and_sigmoid_need_what_the_model_has(data, tmp_path, capsys):
    code = main(["train", "--model", "tiny-clip", "--pretrained", "none", "--dataset", "folder", "--root", str(data),
                 "--workers", "0", "--output", str(tmp_path / "a"), "train.loss=sigmoid"])
    assert code == 2 and "needs its learned logit bias" in capsys.readouterr().err
    results = _train(["--model", "tiny-clip", "--pretrained", "none", "train.logit_scale=auto"], data, tmp_path / "b",
                     capsys)
    assert results["logits"]["scale"] == pytest.approx(1 / 0.07, rel=1e-5)  # CLIP's initial exp(logit_scale)
    assert results["logits"]["kind"] == "softmax"


# -- a 2-step train on every family ----------------------------------------------------------------------------------
@pytest.mark.parametrize("family", [*OPEN_CLIP_TINY, *HF_TINY])
def test_two_step_train(family, data, tokenizer_dir, tmp_path, capsys):
    register()
    if family in OPEN_CLIP_TINY:
        args = ["--model", OPEN_CLIP_TINY[family], "--pretrained", "none"]
        if family == "siglip":
            args += ["--tokenizer", str(tokenizer_dir)]
    else:
        args = ["--model", f"hf:{save_hf_checkpoint(family, tmp_path / family)}"]
    results = _train(args, data, tmp_path / "run", capsys)
    assert results["iters"] == 2 and results["trainable_params"] > 0 and 0 <= results["top1"] <= 100
    assert results["adapted_modules"] > 0 and results["backbone"]["preprocess"]["size"] > 0


def test_an_open_clip_text_tower_from_the_hub_out_of_reach_is_one_error(monkeypatch, tmp_path):
    """open_clip builds a transformers text tower (text_cfg.hf_model_name: XLM-R) from its hub config; with no
    network and an empty Hugging Face cache that is one error naming the model and how to get the config (it was
    transformers' two-line connection error, with a hint about free space)."""
    import huggingface_hub.constants
    import open_clip

    real = open_clip.get_model_config("xlm-roberta-base-ViT-B-32")  # its text_cfg, on a tiny vision tower
    tiny = {**real, "vision_cfg": dict(image_size=32, patch_size=8, width=64, layers=1, head_width=16)}
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "tiny-xlmr-test.json").write_text(json.dumps(tiny))
    open_clip.add_model_config(tmp_path / "configs")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(BackboneError) as err:
        load_backbone("tiny-xlmr-test", "none", tokenizer=str(tmp_path))
    message = str(err.value)
    assert "\n" not in message and "text tower is the transformers model xlm-roberta-base" in message
    assert "AutoConfig.from_pretrained('xlm-roberta-base')" in message
