"""The checkpoint's own library is the oracle of its preprocessing and tokens.

transformers: the tensor blocklora feeds an hf: model equals AutoImageProcessor.from_pretrained(DIR)'s, to 1e-5, on
real photos of several sizes and aspect ratios (tests/photos.py), for a generated matrix of preprocessor_config.json
forms (legacy integer sizes, shortest_edge, height / width, shortest + longest edge, max height / width, resize then
crop to a smaller or larger size, no resize, no crop, every resample value, do_convert_rgb, any mean / std, rescale)
and processor classes (CLIP, SigLIP, Chinese-CLIP), and for every real file in tests/fixtures/checkpoint_configs;
forms that cannot feed a square model are refused in one line. open_clip: open_clip's image_transform_v2 for every
resize_mode, interpolation and fill, and open_clip's own reading of a model folder. Tokens: SigLIP 2 through
transformers as open_clip tokenizes the same weights; transformers CLIP as open_clip's tokenizer.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from blocklora.backbones import hf, load_backbone
from blocklora.backbones.openclip_sources import preprocess_for
from blocklora.errors import BackboneError
from photos import photos

pytestmark = pytest.mark.usefixtures("one_thread")
FIXTURES = Path(__file__).parent / "fixtures" / "checkpoint_configs"
OPENAI = {"image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711]}
CLIP = "CLIPImageProcessor"


def _form(kind: str = CLIP, **settings) -> dict:
    """A preprocessor_config.json as files hold it: the processor named by image_processor_type, or by the legacy
    feature_extractor_type when `kind` ends in FeatureExtractor."""
    key = "feature_extractor_type" if kind.endswith("FeatureExtractor") else "image_processor_type"
    return {key: kind, **settings}


CROP32 = {"height": 32, "width": 32}
# name -> (preprocessor_config.json, the model input side it gives). Every one is fed to a 32 px model.
FORMS = {
    "legacy int size 40, crop 32 (CLIPFeatureExtractor)": _form("CLIPFeatureExtractor", size=40, crop_size=32,
                                                                do_center_crop=True, resample=3, **OPENAI),
    "legacy int size = crop 32": _form("CLIPFeatureExtractor", size=32, crop_size=32, do_center_crop=True),
    "legacy int Chinese-CLIP 40, crop 32": _form("ChineseCLIPFeatureExtractor", size=40, crop_size=32,
                                                 do_center_crop=True),
    "legacy int SigLIP size 32, crop 32": _form("SiglipImageProcessor", size=32, crop_size=32, do_center_crop=True),
    "CLIPImageProcessorFast (saved by a 4.x fast processor)": _form("CLIPImageProcessorFast",
                                                                    size={"shortest_edge": 40}, crop_size=CROP32),
    "shortest_edge 40 > crop 32": _form(size={"shortest_edge": 40}, crop_size=CROP32),
    "shortest_edge 24 < crop 32 (pads)": _form(size={"shortest_edge": 24}, crop_size=CROP32),
    "shortest_edge = crop 32": _form(size={"shortest_edge": 32}, crop_size=CROP32),
    "shortest 32 + longest_edge 40, crop 32": _form(size={"shortest_edge": 32, "longest_edge": 40}, crop_size=CROP32),
    "max_height / max_width 40, crop 32": _form(size={"max_height": 40, "max_width": 40}, crop_size=CROP32),
    "height/width 40 + crop 32": _form(size={"height": 40, "width": 40}, crop_size=CROP32, do_center_crop=True),
    "height/width 24 + crop 32 (pads)": _form(size={"height": 24, "width": 24}, crop_size=CROP32),
    "height/width 32, no crop (SigLIP)": _form("SiglipImageProcessor", size={"height": 32, "width": 32}),
    "height/width 32, no crop (Chinese-CLIP)": _form("ChineseCLIPImageProcessor", size={"height": 32, "width": 32},
                                                     do_center_crop=False, crop_size=CROP32),
    "shortest_edge 40 + crop (Chinese-CLIP)": _form("ChineseCLIPImageProcessor", size={"shortest_edge": 40},
                                                    crop_size=CROP32, do_center_crop=True),
    "do_resize false, crop 32": _form(do_resize=False, crop_size=CROP32),
    "do_convert_rgb false": _form(size={"shortest_edge": 36}, crop_size=CROP32, do_convert_rgb=False),
    "scalar mean / std": _form(size={"shortest_edge": 36}, crop_size=CROP32, image_mean=0.5, image_std=0.25),
    "other mean / std": _form("SiglipImageProcessor", size={"height": 32, "width": 32}, image_mean=[0.1, 0.6, 0.3],
                              image_std=[0.9, 0.2, 0.4]),
    "do_normalize false": _form(size={"shortest_edge": 36}, crop_size=CROP32, do_normalize=False),
    "do_rescale false": _form(size={"shortest_edge": 36}, crop_size=CROP32, do_rescale=False, image_mean=[100] * 3,
                              image_std=[50] * 3),
    "rescale_factor 1/127.5": _form("SiglipImageProcessor", size={"height": 32, "width": 32},
                                    rescale_factor=1 / 127.5, image_mean=[1.0] * 3, image_std=[1.0] * 3),
    **{f"resample {code} ({name})": _form(size={"shortest_edge": 36}, crop_size=CROP32, resample=code)
       for code, name in enumerate(("nearest", "lanczos", "bilinear", "bicubic", "box", "hamming"))},
}
# name -> (preprocessor_config.json, what the one-line refusal says)
REFUSED = {
    "shortest_edge, no crop (aspect kept)": (_form(size={"shortest_edge": 32}, do_center_crop=False), "varying size"),
    "legacy int size, no crop": (_form("CLIPFeatureExtractor", size=32, do_center_crop=False), "varying size"),
    "no resize, no crop": (_form(do_resize=False, do_center_crop=False), "varying size"),
    "longest_edge alone (CLIP has no such resize)": (_form(size={"longest_edge": 40}, crop_size=CROP32),
                                                     "cannot process an image"),
    "non-square height/width": (_form("SiglipImageProcessor", size={"height": 32, "width": 40}), "32x40 images"),
    "crop 40 for a 32 px model": (_form(size={"shortest_edge": 40}, crop_size={"height": 40, "width": 40}),
                                  "gives 40x40 images, but the vision tower takes 32x32"),
    # values transformers applies as they are: every image the same, every pixel inf / NaN, gigabytes per image
    "rescale_factor 0": (_form(rescale_factor=0), "rescale_factor 0"),
    "a std of 0": (_form(image_std=[0.5, 0, 0.5]), "image_std [0.5, 0, 0.5]"),
    "a negative std": (_form(image_std=-0.5), "every channel's std must be a finite number > 0"),
    "shortest_edge 100000": (_form(size={"shortest_edge": 100_000}, crop_size=CROP32), "beyond 4096 px"),
    "crop 100000": (_form(size={"shortest_edge": 32}, crop_size={"height": 100_000, "width": 100_000}),
                    "beyond 4096 px"),
    # values of the wrong type, which transformers would apply as they are (a 1 px side, a truthy string) or fail on
    # deep in a resize with no field named: one check of every field blocklora reads (PROCESSOR_FIELDS)
    "size true": (_form(size=True, crop_size=CROP32), "size true in"),
    "size a string": (_form(size="32", crop_size=CROP32), 'size "32" in'),
    "size a list": (_form(size=[32, 32], crop_size=CROP32), "size [32, 32] in"),
    "size a boolean side": (_form(size={"shortest_edge": True}, crop_size=CROP32), "must be a positive integer"),
    "crop_size negative": (_form(size={"shortest_edge": 32}, crop_size={"height": -32, "width": -32}),
                           'crop_size {"height": -32, "width": -32} in'),
    "image_mean of 2": (_form(size={"shortest_edge": 32}, crop_size=CROP32, image_mean=[0.5, 0.5]),
                        "image_mean [0.5, 0.5] in"),
    "image_std of 4": (_form(size={"shortest_edge": 32}, crop_size=CROP32, image_std=[0.5] * 4), "image_std [0.5,"),
    "do_normalize a string": (_form(size={"shortest_edge": 32}, crop_size=CROP32, do_normalize="false"),
                              'do_normalize "false" in'),
    "resample a name": (_form(size={"shortest_edge": 32}, crop_size=CROP32, resample="bicubic"),
                        "PIL's resampling codes"),
    "rescale_factor a string": (_form(rescale_factor="0.5"), 'rescale_factor "0.5" in'),
}


def _oracle(folder: Path):
    """The checkpoint's own processor, as its users get it; transformers 5's default (torchvision) backend cannot
    resample with box or hamming, its PIL backend (what blocklora then uses) can."""
    from transformers import AutoImageProcessor

    processor = AutoImageProcessor.from_pretrained(folder)
    try:
        processor(images=[photos()["square"]], return_tensors="pt")
    except NotImplementedError:
        processor = AutoImageProcessor.from_pretrained(folder, backend="pil")
    return processor


def _write(tmp_path: Path, config: dict) -> Path:
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(config))
    return tmp_path


def _assert_feeds_what_the_processor_gives(transform, processor) -> None:
    for name, photo in photos().items():
        ours = transform(photo)
        theirs = processor(images=[photo], return_tensors="pt")["pixel_values"][0]
        assert ours.shape == theirs.shape, name
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5, msg=name)


@pytest.mark.parametrize("form", list(FORMS))
def test_hf_eval_tensor_equals_the_checkpoints_own_image_processor(form, tmp_path):
    folder = _write(tmp_path, FORMS[form])
    preprocess = hf.preprocess_of(str(folder), "clip", 32)
    oracle = _oracle(folder)
    assert preprocess.size == 32 and str(folder) in preprocess.source
    assert preprocess.settings["image_processor_class"] == type(oracle).__name__  # the class, and its backend
    _assert_feeds_what_the_processor_gives(preprocess.eval_transform(), oracle)


@pytest.mark.parametrize("form", ["legacy int size 40, crop 32 (CLIPFeatureExtractor)", "do_rescale false",
                                  "rescale_factor 1/127.5", "other mean / std", "resample 4 (box)"])
def test_hf_train_crop_is_rescaled_and_normalised_by_the_processor(form, tmp_path):
    """The training crop (already 32 x 32) gets the processor's own rescale and normalisation: with a crop of the
    whole square image and no flip it is exactly the processor's tensor for that image without its resize."""
    folder = _write(tmp_path, FORMS[form])
    preprocess = hf.preprocess_of(str(folder), "clip", 32)
    image = photos()["square"].resize((32, 32))
    ours = preprocess.train_transform(scale_min=1.0, flip=False)(image)
    theirs = _oracle(folder)(images=[image], do_resize=False, do_center_crop=False, return_tensors="pt")
    torch.testing.assert_close(ours, theirs["pixel_values"][0], rtol=0, atol=1e-5)


@pytest.mark.parametrize("form", list(REFUSED))
def test_hf_forms_that_cannot_feed_a_square_model_are_refused_in_one_line(form, tmp_path):
    config, needle = REFUSED[form]
    with pytest.raises(BackboneError) as err:
        hf.preprocess_of(str(_write(tmp_path, config)), "clip", 32)
    assert needle in str(err.value) and "\n" not in str(err.value)
    assert str(tmp_path / "preprocessor_config.json") in str(err.value)


def test_hf_processor_saved_by_transformers_5_is_found_where_transformers_finds_it(tmp_path):
    """transformers 5's processor save_pretrained writes processor_config.json with the image processor nested in
    it, and no preprocessor_config.json; transformers reads the nested one first even when both exist. blocklora
    finds it the same way (it used to fall back to the family's defaults: another resize and resample, silently), and
    an export carries both files, so the exported folder's processor is the checkpoint's."""
    from transformers import AutoImageProcessor, CLIPImageProcessor, CLIPProcessor, CLIPTokenizer

    from conftest import make_hf_dir

    folder = make_hf_dir(tmp_path / "m")
    (folder / "preprocessor_config.json").unlink()
    CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 40}, crop_size=CROP32, resample=2),
                  tokenizer=CLIPTokenizer.from_pretrained(folder)).save_pretrained(folder)
    assert not (folder / "preprocessor_config.json").exists()
    preprocess = hf.preprocess_of(str(folder), "clip", 32)
    assert preprocess.source == str(folder / "processor_config.json") and preprocess.interpolation == "bilinear"
    _assert_feeds_what_the_processor_gives(preprocess.eval_transform(), _oracle(folder))
    _write(folder, FORMS["legacy int size = crop 32"])  # an older file beside it: transformers reads the nested one
    _assert_feeds_what_the_processor_gives(hf.preprocess_of(str(folder), "clip", 32).eval_transform(), _oracle(folder))
    backbone = load_backbone(f"hf:{folder}")
    backbone.export(backbone.model.state_dict(), tmp_path / "export")
    _assert_feeds_what_the_processor_gives(preprocess.eval_transform(), AutoImageProcessor.from_pretrained(
        tmp_path / "export"))


@pytest.mark.parametrize("folder", sorted(p.name for p in FIXTURES.iterdir() if p.is_dir()))
def test_hf_real_checkpoint_files_equal_their_processor(folder, tmp_path):
    """Every real preprocessor_config.json (openai CLIP's legacy form, SigLIP's 384 squash, Chinese-CLIP's re-saved
    224 squash without crop), at its real size, through the model's own image size in its real config.json."""
    config = json.loads((FIXTURES / folder / "config.json").read_text())
    size = int(config.get("vision_config", {}).get("image_size", 224))  # Chinese-CLIP's re-saved file drops 224
    preprocess = hf.preprocess_of(str(FIXTURES / folder), config["model_type"], size)
    assert preprocess.size == size
    _assert_feeds_what_the_processor_gives(preprocess.eval_transform(), _oracle(FIXTURES / folder))


# -- open_clip -------------------------------------------------------------------------------------------------------
class _Visual:
    image_size = 32
    preprocess_cfg: dict = {}


class _Model:
    visual = _Visual()


OPEN_CLIP_FORMS = [dict(resize_mode=m, interpolation=i) for m in ("shortest", "squash", "longest")
                   for i in ("bicubic", "bilinear", "random")]
OPEN_CLIP_FORMS += [dict(resize_mode="longest", fill_color=255, mean=(0.5,) * 3, std=(0.5,) * 3),
                    dict(resize_mode="longest", fill_color=128, interpolation="bilinear", mean=(0.0,) * 3,
                         std=(1.0,) * 3),
                    dict(resize_mode="longest", fill_color=[255, 0, 128]),  # one fill per channel
                    dict(resize_mode="squash", mean=0.5, std=[0.25])]  # a scalar, a 1-element list (broadcast)


@pytest.mark.parametrize("cfg", OPEN_CLIP_FORMS, ids=lambda c: "-".join(str(v) for v in c.values()))
def test_open_clip_eval_transform_is_image_transform_v2(cfg):
    from open_clip.transform import PreprocessCfg, image_transform_v2

    preprocess = preprocess_for("tiny-clip", _Model(), cfg, "a folder's preprocess_cfg", has_weights=True)
    oracle = image_transform_v2(PreprocessCfg(size=32, **cfg), is_train=False)
    for name, photo in photos().items():
        torch.testing.assert_close(preprocess.eval_transform()(photo), oracle(photo), rtol=0, atol=1e-6, msg=name)


# preprocess_cfg values open_clip cannot apply (its transform fails or asserts): one line naming the value
OPEN_CLIP_REFUSED = {
    "mean text": (dict(mean="0.5"), 'mean "0.5" in a folder\'s preprocess_cfg: must be a number or a list of 1 or 3'),
    "mean of 2": (dict(mean=[0.5, 0.5]), "mean \\[0.5, 0.5\\] in"),
    "std null channel": (dict(std=[0.5, None, 0.5]), "std \\[0.5, null, 0.5\\] in"),
    "std zero": (dict(std=[0.0, 1.0, 1.0]), "every channel's std must be > 0"),
    "std NaN": (dict(std=float("nan")), "std NaN in"),
    "fill text": (dict(resize_mode="longest", fill_color="white"), 'fill_color "white" in'),
    "fill of 2": (dict(resize_mode="longest", fill_color=[1, 2]), "fill_color \\[1, 2\\] in"),
    "mode L": (dict(mode="L"), "says mode 'L': open_clip feeds its models RGB images"),
    "interpolation nearest": (dict(interpolation="nearest"), "unsupported preprocessing \\(nearest, shortest\\)"),
    "fill beyond 8 bits": (dict(resize_mode="longest", fill_color=300), "fill_color 300 in"),
    "fill negative": (dict(resize_mode="longest", fill_color=[0, -1, 0]), "fill_color \\[0, -1, 0\\] in"),
}


@pytest.mark.parametrize("form", list(OPEN_CLIP_REFUSED))
def test_open_clip_preprocess_cfg_it_cannot_apply_is_refused_in_one_line(form):
    cfg, needle = OPEN_CLIP_REFUSED[form]
    with pytest.raises(BackboneError, match=needle) as err:
        preprocess_for("tiny-clip", _Model(), cfg, "a folder's preprocess_cfg", has_weights=True)
    assert "\n" not in str(err.value)


def test_open_clip_model_folder_is_read_as_open_clip_reads_it(tmp_path, capsys):
    """A model folder (open_clip's local-dir) with resize_mode longest, a fill and bilinear interpolation: blocklora's
    tensor equals open_clip.create_model_and_transforms('local-dir:...')'s, and zero-shot runs on it."""
    import open_clip

    from blocklora.cli.main import main
    from gen_data import make_folder_dataset

    stock = load_backbone("tiny-clip", None)
    folder = tmp_path / "model"
    stock.export(stock.model.state_dict(), folder)
    config = json.loads((folder / "open_clip_config.json").read_text())
    config["preprocess_cfg"].update(resize_mode="longest", fill_color=200, interpolation="bilinear", mean=[0.4] * 3)
    (folder / "open_clip_config.json").write_text(json.dumps(config))
    ours = load_backbone("tiny-clip", str(folder))
    _, _, theirs = open_clip.create_model_and_transforms(f"local-dir:{folder}")
    for name, photo in photos().items():
        torch.testing.assert_close(ours.eval_transform()(photo), theirs(photo), rtol=0, atol=1e-6, msg=name)
    assert ours.describe()["preprocess"]["resize_mode"] == "longest"
    data = make_folder_dataset(tmp_path / "data", n_classes=2, train_per_class=1, test_per_class=1)
    assert main(["zeroshot", "--model", "tiny-clip", "--pretrained", str(folder), "--dataset", "folder", "--root",
                 str(data), "--workers", "0", "--no-cache"]) == 0, capsys.readouterr().err
    config["preprocess_cfg"]["size"] = 64  # a folder whose images would not fit the model: refused, named
    (folder / "open_clip_config.json").write_text(json.dumps(config))
    with pytest.raises(BackboneError, match="says size 64, but tiny-clip takes 32x32"):
        load_backbone("tiny-clip", str(folder))



@pytest.mark.parametrize(("text", "needle"), [
    ("{not json", "cannot read the open_clip model config"), ("[1]", "not a JSON object"),
    ('{"model_cfg": 5}', "no model_cfg object"),
    ('{"model_cfg": {}, "preprocess_cfg": []}', "preprocess_cfg is not an")])
def test_damaged_open_clip_model_folder_config_is_refused_not_replaced_by_defaults(text, needle, tmp_path):
    """A damaged open_clip_config.json is named, not read as absent (the architecture's default preprocessing,
    silently, for weights that declared their own)."""
    stock = load_backbone("tiny-clip", None)
    folder = tmp_path / "model"
    stock.export(stock.model.state_dict(), folder)
    (folder / "open_clip_config.json").write_text(text)
    with pytest.raises(BackboneError, match=needle) as err:
        load_backbone("tiny-clip", str(folder))
    assert "\n" not in str(err.value) and "open_clip_config.json" in str(err.value)


# -- tokens ----------------------------------------------------------------------------------------------------------
PROMPTS = ["a photo of a Red Apple.", "a photo of a red apple.", "A PHOTO of a  red_apple!!", "Stanford Cars: BMW M3",
           "itap of a (blue) sky, on a table?"]


def _siglip_gemma(folder: Path) -> Path:
    """A tiny SigLIP folder with a case-sensitive Gemma tokenizer (one token per character), as the fixed-resolution
    SigLIP 2 checkpoints ship (model_type siglip)."""
    import string

    from transformers import GemmaTokenizer, SiglipConfig, SiglipImageProcessor, SiglipModel

    specials = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"]
    chars = list(string.ascii_lowercase + string.ascii_uppercase + string.digits + string.punctuation) + ["\u2581"]
    vocab = {t: i for i, t in enumerate(specials + chars)}
    GemmaTokenizer(vocab=vocab, merges=[], add_bos_token=False, add_eos_token=True).save_pretrained(folder)
    text = dict(hidden_size=16, intermediate_size=32, num_attention_heads=2, num_hidden_layers=1, vocab_size=len(vocab),
                max_position_embeddings=64, pad_token_id=0, eos_token_id=1, bos_token_id=2)
    vision = dict(hidden_size=16, intermediate_size=32, num_attention_heads=2, num_hidden_layers=1, image_size=32,
                  patch_size=8)
    torch.manual_seed(0)
    SiglipModel(SiglipConfig(text_config=text, vision_config=vision)).save_pretrained(folder)
    SiglipImageProcessor(size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


def test_siglip2_through_transformers_is_tokenized_as_open_clip_tokenizes_the_same_weights(tmp_path):
    """SigLIP 2's Gemma tokenizer is case-sensitive; open_clip canonicalizes every prompt for SigLIP 2 (lowercase,
    punctuation removed: tokenizer_kwargs clean=canonicalize), as big_vision trained it. blocklora's transformers
    path gives the tokens open_clip's HFTokenizer gives on the same tokenizer files."""
    from open_clip.tokenizer import HFTokenizer

    _siglip_gemma(tmp_path)
    ours = load_backbone(f"hf:{tmp_path}").tokenize(PROMPTS)["input_ids"]
    theirs = HFTokenizer(str(tmp_path), context_length=64, clean="canonicalize")(PROMPTS)
    assert torch.equal(ours, theirs)
    assert torch.equal(ours[0], ours[1]) and torch.equal(ours[0], ours[2])  # case, punctuation, "_" do not matter


def test_siglip_export_prompts_are_the_texts_its_stock_tokenizer_is_given(tmp_path):
    """An export's classifier "prompts" of a transformers SigLIP are canonicalized, as blocklora scores them: the stock
    model and tokenizer of the export, given those prompts (padded to the fixed length, as SigLIP was trained), give
    blocklora's class embeddings; the raw "A photo of a Red_Apple." would be other tokens for the Gemma tokenizer."""
    import torch.nn.functional as F
    from transformers import AutoTokenizer, SiglipModel

    import blocklora
    from blocklora.engine import evaluate as ev
    from blocklora.engine.runtime import make_runtime
    from blocklora.pipeline.trained import export, load_trained

    folder = _siglip_gemma(tmp_path / "siglip")
    backbone = load_backbone(f"hf:{folder}")
    blocklora.inject(backbone.model, blocklora.AdapterConfig(n_blocks=2))
    with torch.no_grad():  # a text-side update that matters (B starts at zero)
        for name, p in backbone.model.named_parameters():
            if name.endswith("lora_B"):
                p.normal_(0, 0.5)
    names = ["Red_Apple", "Blue-Sky!", "green leaf"]
    blocklora.save_adapter(backbone.model, tmp_path / "adapter", backbone=f"hf:{folder}", classnames=names,
                           pretrained=None)
    export(tmp_path / "adapter", tmp_path / "export")
    meta = json.loads((tmp_path / "export" / "blocklora_classifier.json").read_text())
    assert meta["prompts"] == ["a photo of a red apple", "a photo of a bluesky", "a photo of a green leaf"]
    model = SiglipModel.from_pretrained(tmp_path / "export").eval()
    tokens = AutoTokenizer.from_pretrained(tmp_path / "export")(meta["prompts"], padding="max_length", max_length=64,
                                                                 return_tensors="pt")
    with torch.no_grad():
        stock = model.get_text_features(input_ids=tokens["input_ids"])
        stock = F.normalize(stock if isinstance(stock, torch.Tensor) else stock.pooler_output, dim=-1)
        loaded, _, _ = load_trained(tmp_path / "adapter", device="cpu")
        ours = ev.encode_classes(loaded, names, [meta["template"]], make_runtime("cpu"))
    torch.testing.assert_close(stock, ours, atol=1e-5, rtol=1e-5)


def test_transformers_clip_tokens_equal_open_clips_for_the_same_weights(tmp_path):
    """openai/clip-vit-base-patch32's real tokenizer settings with OpenAI's BPE (open_clip's packaged vocabulary):
    lower-casing, cleaning, start / end tokens and truncation at 77 equal open_clip's tokenizer."""
    import open_clip

    from conftest import make_hf_dir

    make_hf_dir(tmp_path)
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(FIXTURES / "openai__clip-vit-base-patch32" / name, tmp_path / name)
    prompts = [*PROMPTS, "Ünïcödé café, naïve " * 3, "long " * 100]
    tokens = load_backbone(f"hf:{tmp_path}").tokenize(prompts)
    theirs = open_clip.get_tokenizer("ViT-B-32")(prompts)
    for row, mask, expected in zip(tokens["input_ids"], tokens["attention_mask"], theirs):
        n = int(mask.sum())
        assert row[:n].tolist() == expected[:n].tolist() and int(expected[n:].abs().sum()) == 0


def test_open_clip_folder_export_carries_its_hub_tokenizer(tmp_path):
    """A model whose tokenizer comes from the Hugging Face hub (SigLIP's in open_clip: text_cfg.hf_tokenizer_name):
    its folder export holds the tokenizer, as open_clip's local-dir reads it from the folder itself. Stock open_clip
    (create_model and get_tokenizer on "local-dir:") gives blocklora's class embeddings from the export's prompts, and
    blocklora reads the folder back with that tokenizer, no --tokenizer needed."""
    import open_clip
    import torch.nn.functional as F

    import blocklora
    from blocklora.engine import evaluate as ev
    from blocklora.engine.runtime import make_runtime
    from blocklora.pipeline.trained import export, load_trained
    from families import register, save_tokenizer

    register()
    tokenizer = str(save_tokenizer(tmp_path / "tokenizer"))
    backbone = load_backbone("tiny-siglip-test", None, tokenizer=tokenizer)
    blocklora.inject(backbone.model, blocklora.AdapterConfig(n_blocks=2))
    torch.manual_seed(0)
    with torch.no_grad():  # a text-side update that matters (B starts at zero)
        for name, p in backbone.model.named_parameters():
            if name.endswith("lora_B"):
                p.normal_(0, 0.5)
    names = ["red apple", "blue sky", "green leaf"]
    blocklora.save_adapter(backbone.model, tmp_path / "adapter", backbone="tiny-siglip-test", classnames=names,
                           pretrained=None)
    export(tmp_path / "adapter", tmp_path / "folder", tokenizer=tokenizer)
    meta = json.loads((tmp_path / "folder" / "blocklora_classifier.json").read_text())
    stock = open_clip.create_model(f"local-dir:{tmp_path / 'folder'}").eval()
    stock_tokenizer = open_clip.get_tokenizer(f"local-dir:{tmp_path / 'folder'}")
    with torch.no_grad():
        theirs = F.normalize(stock.encode_text(stock_tokenizer(meta["prompts"])), dim=-1)
        loaded, _, _ = load_trained(tmp_path / "adapter", device="cpu", tokenizer=tokenizer)
        ours = ev.encode_classes(loaded, names, [meta["template"]], make_runtime("cpu"))
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=1e-5)
    again = load_backbone("tiny-siglip-test", str(tmp_path / "folder"), text=True)
    assert torch.equal(again.tokenize(meta["prompts"]), loaded.tokenize(meta["prompts"]))
