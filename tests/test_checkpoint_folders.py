"""Every real checkpoint folder loads and runs: zeroshot, a 2-step train, predict and export.

The files of tests/fixtures/checkpoint_configs (config.json, preprocessor_config.json and the tokenizer settings of
openai/clip-vit-base-patch32, openai/clip-vit-large-patch14, google/siglip-so400m-patch14-384 and
OFA-Sys/chinese-clip-vit-base-patch16; provenance in its SOURCES.md) are copied into a model folder whose weights
are random (from the real config.json, with fewer layers and narrower towers: the loader reads neither; the image
size, patch size, position tables, vocabulary sizes and activations stay as published). Vocabularies are not in the
fixtures: CLIP's BPE comes from open_clip's packaged copy (the same vocabulary), Chinese-CLIP's BERT vocabulary is a
small one with the real special-token ids, and SigLIP's sentencepiece model, which cannot be had offline, is
replaced by a word-level tokenizer passed with --tokenizer (its tokens are not tested; everything else is).
Also here: a checkpoint whose shapes do not fit the model name is refused, naming both and the name that fits.
"""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

from blocklora.backbones import load_backbone
from blocklora.cli.main import main
from blocklora.errors import BackboneError
from families import WORDS, save_tokenizer
from gen_data import make_folder_dataset
from photos import photos

pytestmark = pytest.mark.usefixtures("one_thread")
FIXTURES = Path(__file__).parent / "fixtures" / "checkpoint_configs"
FOLDERS = sorted(p.name for p in FIXTURES.iterdir() if p.is_dir())
# what the loader does not read: depth and widths (the probe, the sites and the adapters work at any of them)
SHRINK = dict(num_hidden_layers=1, hidden_size=32, intermediate_size=64, num_attention_heads=2)


def _shrunk(config: dict) -> dict:
    config = copy.deepcopy(config)
    for tower in ("text_config", "vision_config", "text_config_dict", "vision_config_dict"):
        if tower.endswith("_config") or config.get(tower):
            config.setdefault(tower, {}).update(SHRINK)
            config[tower].pop("projection_dim", None)
    if "projection_dim" in config:
        config["projection_dim"] = 16
    return config


def _clip_bpe(folder: Path) -> None:
    """OpenAI's BPE vocabulary and merges in CLIPTokenizer's files, from open_clip's packaged copy."""
    from open_clip.tokenizer import SimpleTokenizer

    tok = SimpleTokenizer()
    renames = {"<start_of_text>": "<|startoftext|>", "<end_of_text>": "<|endoftext|>"}
    (folder / "vocab.json").write_text(json.dumps({renames.get(k, k): v for k, v in tok.encoder.items()}))
    merges = sorted(tok.bpe_ranks.items(), key=lambda kv: kv[1])
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m, _ in merges) + "\n")


def _bert_vocab(folder: Path) -> None:
    """A BERT vocab.txt with Chinese-CLIP's special-token ids ([PAD] 0, [UNK] 100, [CLS] 101, [SEP] 102, [MASK]
    103), then the test prompts' words and a few Chinese characters."""
    tokens = ["[PAD]", *(f"[unused{i}]" for i in range(1, 100)), "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tokens += [w for w in dict.fromkeys(WORDS) if w not in tokens] + ["的", "一", "猫", "狗"]
    (folder / "vocab.txt").write_text("\n".join(tokens) + "\n")


def build_folder(name: str, dest: Path) -> tuple[Path, list[str]]:
    """The model folder of fixture `name` (random weights from its real config.json, its real preprocessor and
    tokenizer settings) and the extra CLI arguments it needs."""
    import transformers

    real = FIXTURES / name
    config = json.loads((real / "config.json").read_text())
    cls = getattr(transformers, config["architectures"][0])
    dest.mkdir(parents=True)
    (dest / "config.json").write_text(json.dumps(_shrunk(config)))
    torch.manual_seed(0)
    cls(cls.config_class.from_pretrained(dest)).save_pretrained(dest)
    for f in ("preprocessor_config.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(real / f, dest / f)
    extra: list[str] = []
    if config["model_type"] == "clip":
        _clip_bpe(dest)
    elif config["model_type"] == "chinese_clip":
        _bert_vocab(dest)
    else:  # SiglipTokenizer: spiece.model (and the sentencepiece package) cannot be had offline
        extra = ["--tokenizer", str(save_tokenizer(dest.parent / "tokenizer"))]
    return dest, extra


@pytest.mark.parametrize("name", FOLDERS)
def test_real_checkpoint_folder_runs_every_command(name, tmp_path, capsys):
    from transformers import AutoImageProcessor

    folder, extra = build_folder(name, tmp_path / name)
    real = json.loads((FIXTURES / name / "config.json").read_text())
    size = int(real["vision_config"].get("image_size", 224))
    data = make_folder_dataset(tmp_path / "data", n_classes=3, train_per_class=1, test_per_class=1)
    model = ["--model", f"hf:{folder}", *extra]
    common = ["--dataset", "folder", "--root", str(data), "--workers", "0"]

    assert main(["zeroshot", *model, *common, "--no-cache", "--json"]) == 0, capsys.readouterr().err
    zeroshot = json.loads(capsys.readouterr().out)
    assert 0 <= zeroshot["top1"] <= 100

    out = tmp_path / "run"
    assert main(["train", *model, *common, "--shots", "1", "--iters", "2", "--batch-size", "3", "--output",
                 str(out)]) == 0, capsys.readouterr().err
    results = json.loads((out / "results.json").read_text())
    backbone = results["backbone"]
    assert results["iters"] == 2 and backbone["image_size"] == size
    assert backbone["preprocess"]["source"] == str(folder / "preprocessor_config.json")
    oracle = AutoImageProcessor.from_pretrained(folder)
    settings = {k: v for k, v in backbone["preprocess"]["settings"].items() if k != "image_processor_class"}
    assert settings == json.loads(oracle.to_json_string())  # the processor's own reading of the real file

    # predict: a photo stored sideways with an EXIF Orientation tag scores as the upright photo
    photo = photos()["landscape"]
    photo.save(tmp_path / "upright.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    photo.transpose(Image.Transpose.ROTATE_90).save(tmp_path / "sideways.png", exif=exif)
    capsys.readouterr()
    assert main(["predict", "--adapter", str(out / "adapter"), str(tmp_path / "upright.png"),
                 str(tmp_path / "sideways.png"), "--json"]) == 0, capsys.readouterr().err
    upright, sideways = json.loads(capsys.readouterr().out)
    assert upright["top"] == sideways["top"]

    export = tmp_path / "export"
    assert main(["export", "--adapter", str(out / "adapter"), "--output", str(export)]) == 0, capsys.readouterr().err
    stock = type(load_backbone(f"hf:{folder}", tokenizer=extra[1] if extra else None).model)
    reloaded, info = stock.from_pretrained(export, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    exported = AutoImageProcessor.from_pretrained(export)  # the export carries the real processor file
    image = photos()["portrait"]
    torch.testing.assert_close(exported(images=[image], return_tensors="pt")["pixel_values"],
                               oracle(images=[image], return_tensors="pt")["pixel_values"], rtol=0, atol=0)


def test_clip_large_tokens_equal_open_clips(tmp_path):
    """openai/clip-vit-large-patch14's own tokenizer_config.json (tokenizer_class CLIPTokenizer) with OpenAI's BPE
    gives open_clip's tokens for the same prompts (lower-cased, cleaned, truncated at 77)."""
    import open_clip

    folder, _ = build_folder("openai__clip-vit-large-patch14", tmp_path / "m")
    prompts = ["a photo of a Red Apple.", "A  PHOTO of a café!", "word " * 90]
    tokens = load_backbone(f"hf:{folder}").tokenize(prompts)
    for row, mask, expected in zip(tokens["input_ids"], tokens["attention_mask"], open_clip.tokenize(prompts)):
        n = int(mask.sum())
        assert row[:n].tolist() == expected[:n].tolist() and int(expected[n:].abs().sum()) == 0


# -- a checkpoint and a model name that disagree ---------------------------------------------------------------------
def _tiny_clip_state(**changes) -> dict:
    """tiny-clip's state dict at another image size / context length (open_clip.CLIP, as tiny-clip is built)."""
    import open_clip

    from blocklora.backbones.openclip import TINY_CLIP

    cfg = copy.deepcopy(TINY_CLIP)
    for key, value in changes.items():
        tower, field = key.split("__")
        cfg[tower][field] = value
    torch.manual_seed(1)
    return {k: v.contiguous() for k, v in open_clip.CLIP(**cfg).state_dict().items()}, cfg


def test_a_checkpoint_of_another_size_is_refused_naming_both_and_the_name_that_fits(tmp_path, capsys):
    """open_clip's load_checkpoint would interpolate the position tables (64 px weights run at 32 px, a 16-token
    text table stretched to 77) and the run would record the name's size. Refused, in one line, before anything is
    written; a model config of the checkpoint's shape is named."""
    import open_clip
    from safetensors.torch import save_file

    data = make_folder_dataset(tmp_path / "data", n_classes=2, train_per_class=1, test_per_class=1)
    state, cfg = _tiny_clip_state(vision_cfg__image_size=64)
    save_file(state, str(tmp_path / "tiny-64px.safetensors"))
    out = tmp_path / "run"
    code = main(["train", "--model", "tiny-clip", "--pretrained", str(tmp_path / "tiny-64px.safetensors"),
                 "--dataset", "folder", "--root", str(data), "--workers", "0", "--iters", "1", "--output", str(out)])
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 2 and len(err) == 1 and not out.exists()
    assert "image size 64 px (8x8 patches of 8 px) in the checkpoint, 32 px (4x4 patches of 8 px) in tiny-clip" \
        in err[0] and "interpolate" in err[0]

    configs = tmp_path / "configs"  # an open_clip model config with the checkpoint's shape: the error names it
    configs.mkdir()
    (configs / "tiny-clip-64-test.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(configs)
    with pytest.raises(BackboneError, match="use --model tiny-clip-64-test, whose config has the checkpoint's"):
        load_backbone("tiny-clip", str(tmp_path / "tiny-64px.safetensors"))
    assert load_backbone("tiny-clip-64-test", str(tmp_path / "tiny-64px.safetensors")).image_size == 64

    state, _ = _tiny_clip_state(text_cfg__context_length=16)
    torch.save({"state_dict": state}, tmp_path / "ctx16.pt")
    with pytest.raises(BackboneError, match="context length 16 tokens in the checkpoint, 77 tokens in tiny-clip"):
        load_backbone("tiny-clip", str(tmp_path / "ctx16.pt"))
    state, _ = _tiny_clip_state(vision_cfg__width=32)
    save_file(state, str(tmp_path / "narrow.safetensors"))
    with pytest.raises(BackboneError, match="vision width 32 in the checkpoint, 64 in tiny-clip"):
        load_backbone("tiny-clip", str(tmp_path / "narrow.safetensors"))


@pytest.mark.parametrize(("field", "value", "needle"), [
    ("image_size", 64, "model_cfg.vision_cfg.image_size is 64, but the weights beside it (open_clip_model.safetensors) "
                       "have image size 32 px (4x4 patches of 8 px): visual.positional_embedding has shape (17, 64)"),
    ("image_size", None, "image_size is not set (open_clip's default 224), but"),
    ("patch_size", 16, "patch_size is 16, but the weights beside it (open_clip_model.safetensors) have patch size "
                       "8 px"),
    ("image_size", "big", "model_cfg.vision_cfg.image_size must be an integer >= 1, got 'big'")])
def test_an_open_clip_folder_whose_model_cfg_does_not_describe_its_weights_is_refused(field, value, needle, tmp_path):
    """open_clip builds a model folder's model from its open_clip_config.json model_cfg (and would interpolate the
    weights' position tables to another image_size); blocklora builds --model NAME, whose shapes the weights have, and
    would run a folder that says another model. Refused, naming the file, the field and the weights' shape."""
    from safetensors.torch import save_file

    state, cfg = _tiny_clip_state()
    folder = tmp_path / "tiny-clip-folder"
    folder.mkdir()
    save_file(state, str(folder / "open_clip_model.safetensors"))
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg}))
    assert load_backbone("tiny-clip", str(folder)).image_size == 32  # as written, it describes its weights
    if value is None:
        del cfg["vision_cfg"][field]
    else:
        cfg["vision_cfg"][field] = value
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg}))
    with pytest.raises(BackboneError) as err:
        load_backbone("tiny-clip", str(folder))
    assert str(err.value).startswith(f"{folder / 'open_clip_config.json'}: ") and needle in str(err.value)
    assert "\n" not in str(err.value)


def test_transformers_weights_and_processor_that_disagree_with_config_are_refused(tmp_path):
    from conftest import make_hf_dir

    folder = make_hf_dir(tmp_path / "m")  # 32 px weights and processor
    processor = json.loads((folder / "preprocessor_config.json").read_text())
    processor["crop_size"] = {"height": 40, "width": 40}
    (folder / "preprocessor_config.json").write_text(json.dumps(processor))
    with pytest.raises(BackboneError, match=r"gives 40x40 images, but the vision tower takes 32x32"):
        load_backbone(f"hf:{folder}")
    config = json.loads((folder / "config.json").read_text())
    config["vision_config"]["image_size"] = 40
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(BackboneError, match=r"the weights are for 32 px images \(4x4 patches of 8 px\), config.json "
                                            r"says image_size 40"):
        load_backbone(f"hf:{folder}")


@pytest.mark.parametrize(("field", "value", "needle"), [
    ("image_size", "32", "Field 'image_size' with value '32'"), ("patch_size", 0, "ZeroDivisionError"),
    ("num_attention_heads", 5, "not a multiple of the number of attention heads"), (None, [], "'vision_config'"),
    ("num_hidden_layers", 1, "weights have no place in the CLIPModel .*layers.1")])  # transformers drops them
def test_transformers_config_values_transformers_refuses_are_one_line(field, value, needle, tmp_path):
    """config.json values transformers' typed configs refuse, or cannot build a model from, are one error naming
    the folder and transformers' reason, not its traceback; a config with fewer layers than the weights (which
    transformers loads by dropping the rest, with a warning) is refused the same way."""
    from conftest import make_hf_dir

    folder = make_hf_dir(tmp_path / "m")
    config = json.loads((folder / "config.json").read_text())
    if field is None:
        config["vision_config"] = value
    else:
        config["vision_config"][field] = value
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(BackboneError, match=needle) as err:
        load_backbone(f"hf:{folder}")
    assert str(folder) in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize(("field", "value"), [("pad_token", 5), ("eos_token", [1]), ("added_tokens_decoder", "x")])
def test_damaged_tokenizer_config_is_one_line(field, value, tmp_path):
    from conftest import make_hf_dir

    folder = make_hf_dir(tmp_path / "m")
    config = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**config, field: value}))
    with pytest.raises(BackboneError, match="cannot load the tokenizer of") as err:
        load_backbone(f"hf:{folder}").tokenize(["a photo of a cat."])
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("sharded", [False, True])
def test_pytorch_model_bin_folders_load_and_other_shapes_are_refused_by_name(sharded, tmp_path):
    """Older hub snapshots hold pytorch_model.bin (or its shards and index) instead of safetensors: such a folder
    loads, and weights of another shape than its config.json are the same one-line refusal as for safetensors
    (transformers' own would print a table, then point at ignore_mismatched_sizes)."""
    from safetensors.torch import load_file

    from conftest import make_hf_dir

    folder = make_hf_dir(tmp_path / "m")
    state = load_file(folder / "model.safetensors")
    (folder / "model.safetensors").unlink()
    if sharded:
        keys = sorted(state)
        shards = {"pytorch_model-00001-of-00002.bin": keys[::2], "pytorch_model-00002-of-00002.bin": keys[1::2]}
        for name, part in shards.items():
            torch.save({k: state[k] for k in part}, folder / name)
        (folder / "pytorch_model.bin.index.json").write_text(json.dumps(
            {"metadata": {}, "weight_map": {k: name for name, part in shards.items() for k in part}}))
    else:
        torch.save(state, folder / "pytorch_model.bin")
    loaded = load_backbone(f"hf:{folder}").model.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in state.items() if k in loaded)
    config = json.loads((folder / "config.json").read_text())
    config["text_config"]["max_position_embeddings"] = 40
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(BackboneError, match=r"position_embedding.weight: \(77, 48\) in the weights, \(40, 48\) .*the "
                                            r"weights hold 77 text positions, config.json says 40"):
        load_backbone(f"hf:{folder}")


def _word_tokenizer(folder: Path, pad: bool = True) -> str:
    """A word-level tokenizer of another model: the prompt words at ids from 60000 (beyond a 49408-token CLIP)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, "[PAD]": 1, **{w: 60000 + i for i, w in enumerate(("a", "photo", "of", "red", "apple"))}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", **({"pad_token": "[PAD]"} if pad else {})
                            ).save_pretrained(folder)
    return str(folder)


def test_a_tokenizer_of_another_model_is_refused_by_name(tmp_path):
    """A tokenizer whose ids the text tower's embedding does not hold (torch: "index out of range in self"), or
    without a padding token (the model's own processor refuses it too), is one error naming both, in both
    families."""
    from conftest import make_hf_dir
    from families import register

    folder = make_hf_dir(tmp_path / "clip")
    other, no_pad = _word_tokenizer(tmp_path / "other"), _word_tokenizer(tmp_path / "nopad", pad=False)
    with pytest.raises(BackboneError, match=r"gives token id 600\d\d, but the text tower's vocabulary has 49408 "
                                            r"tokens .*another model's"):
        load_backbone(f"hf:{folder}", tokenizer=other).tokenize(["a photo of a red apple."])
    with pytest.raises(BackboneError, match=r"\(.*nopad\) has no padding token"):
        load_backbone(f"hf:{folder}", tokenizer=no_pad, text=True)
    register()  # tiny-siglip-test: an open_clip model whose tokenizer comes from a hub, 128 tokens
    with pytest.raises(BackboneError, match=r"gives token id 600\d\d, but the text tower's vocabulary has 128"):
        load_backbone("tiny-siglip-test", None, tokenizer=other).tokenize(["a photo of a red apple."])
    with pytest.raises(BackboneError, match="has no padding token"):
        load_backbone("tiny-siglip-test", None, tokenizer=no_pad, text=True)


def test_a_hub_id_in_the_hugging_face_cache_loads_offline(tmp_path, monkeypatch, capsys):
    """`--model hf:org/name` on a machine without network, the checkpoint downloaded before into the Hugging Face
    cache (models--org--name/snapshots/REV, refs/main): read from the cache, as transformers does, through every
    command; its weights' shapes are checked as a folder's; a hub id not in the cache is one error line."""
    import huggingface_hub.constants

    from blocklora.backbones.network import hub_reachable
    from conftest import make_hf_dir

    cache = tmp_path / "hub"
    repo = cache / "models--acme--tiny-clip"
    make_hf_dir(repo / "snapshots" / "0123abcd")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123abcd")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    hub_reachable.cache_clear()
    try:
        data = make_folder_dataset(tmp_path / "data", n_classes=2, train_per_class=1, test_per_class=1)
        common = ["--dataset", "folder", "--root", str(data), "--workers", "0"]
        out = tmp_path / "run"
        assert main(["train", "--model", "hf:acme/tiny-clip", *common, "--shots", "1", "--iters", "1", "--output",
                     str(out)]) == 0, capsys.readouterr().err
        assert json.loads((out / "results.json").read_text())["backbone"]["name"] == "hf:acme/tiny-clip"
        assert main(["export", "--adapter", str(out / "adapter"), "--output", str(tmp_path / "export")]) == 0
        assert (tmp_path / "export" / "preprocessor_config.json").is_file()
        capsys.readouterr()
        assert main(["zeroshot", "--model", "hf:acme/other", *common]) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and "acme/other" in err and "not in the Hugging Face cache" in err
        config = json.loads((repo / "snapshots" / "0123abcd" / "config.json").read_text())
        config["text_config"]["max_position_embeddings"] = 40
        (repo / "snapshots" / "0123abcd" / "config.json").write_text(json.dumps(config))
        with pytest.raises(BackboneError, match=r"^acme/tiny-clip: the weights do not fit its config.json .*77 text"):
            load_backbone("hf:acme/tiny-clip")
    finally:
        hub_reachable.cache_clear()


def test_an_open_clip_model_folder_given_as_a_model_name_says_the_flags_that_load_it(tmp_path, capsys):
    """A hub repository's open_clip files (open_clip_config.json + weights, no blocklora record) passed as open_clip
    writes it (--model local-dir:DIR) or as a transformers folder (hf:DIR): one error naming the model whose config
    the folder holds and the --pretrained flag; those flags then load it."""
    import open_clip
    from safetensors.torch import save_file

    from families import register

    register()
    folder = tmp_path / "ViT-tiny-SigLIP"
    folder.mkdir()
    model = open_clip.create_model("tiny-siglip-test")
    (folder / "open_clip_config.json").write_text(json.dumps({
        "model_cfg": open_clip.get_model_config("tiny-siglip-test"),
        "preprocess_cfg": {"mean": [0.5] * 3, "std": [0.5] * 3, "interpolation": "bicubic", "resize_mode": "squash"}}))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "open_clip_model.safetensors"))
    data = make_folder_dataset(tmp_path / "data", n_classes=2, train_per_class=1, test_per_class=1)
    for given in (f"local-dir:{folder}", f"hf:{folder}"):
        code = main(["zeroshot", "--model", given, "--dataset", "folder", "--root", str(data), "--workers", "0"])
        err = capsys.readouterr().err.strip()
        assert code == 2 and "\n" not in err
        assert f"open_clip model folder (open_clip_config.json): pass --model tiny-siglip-test --pretrained {folder}" \
            in err
    loaded = load_backbone("tiny-siglip-test", str(folder))
    assert loaded.preprocess.resize_mode == "squash" and loaded.preprocess.source.endswith("open_clip_config.json")
