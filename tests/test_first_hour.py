"""A new user's first hour: defaults by model, the CPU recipe and plan, short classes, adapters and exports that
travel (relative hf: folders, Python-saved adapters, run folders, classifier metadata), streaming predict, docs."""

from __future__ import annotations

import json
import logging
import re
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import blocklora
from blocklora.backbones import default_pretrained, load_backbone
from blocklora.cli.main import build_parser, main
from blocklora.config.run_config import RECIPES, RunConfig, recipe_overrides
from blocklora.errors import BackboneError, BlockLoRAError
from conftest import make_hf_dir
from gen_data import make_folder_dataset

REPO = Path(__file__).resolve().parents[1]
FAST = ["--shots", "2", "--iters", "2", "--batch-size", "4", "--workers", "0", "--no-zero-shot"]


def cli(capsys, *argv) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def one_error(err: str) -> str:
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in err, err
    return errors[0]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_folder_dataset(tmp_path_factory.mktemp("data") / "colours", n_classes=3, train_per_class=6,
                               test_per_class=2)


@pytest.fixture(scope="module")
def tiny_run(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "run"
    assert main(["train", "--model", "tiny-clip", *FAST, "--dataset", "folder", "--root", str(data),
                 "--output", str(out)]) == 0  # no --pretrained: tiny-clip's default is its random init
    return out


# -- --pretrained defaults by model ------------------------------------------------------------------------------------
def test_pretrained_defaults_by_model(tmp_path, monkeypatch):
    assert default_pretrained("effnet-minilm") == "packaged"
    assert default_pretrained("tiny-clip") is None
    assert default_pretrained("ViT-B-16") == "openai"
    with pytest.raises(BackboneError, match=r"ViT-B-16-SigLIP has no OpenAI weights.*webli"):
        default_pretrained("ViT-B-16-SigLIP")
    with pytest.raises(BackboneError, match="unknown model"):
        default_pretrained("ViT-Q-99")
    (tmp_path / "m").mkdir()
    monkeypatch.chdir(tmp_path)
    assert default_pretrained("hf:m") == str(tmp_path / "m")  # absolute: the record holds from anywhere
    # resolved() is where a run's value is decided and recorded; an explicit value is kept
    assert RunConfig(model="tiny-clip").resolved().pretrained is None
    assert RunConfig(model="effnet-minilm").resolved().pretrained == "packaged"
    assert RunConfig(model="ViT-B-16", pretrained="laion2b_s34b_b88k").resolved().pretrained == "laion2b_s34b_b88k"
    assert RunConfig().pretrained == "auto" and RunConfig().resolved().pretrained == "openai"


def test_tiny_clip_trains_without_pretrained_and_records_it(tiny_run):
    results = json.loads((tiny_run / "results.json").read_text())
    assert results["config"]["pretrained"] is None and results["backbone"]["pretrained"] is None
    request = json.loads((tiny_run / "config.json").read_text())["request"]
    assert request["pretrained"] == "auto"


def test_open_clip_name_without_openai_weights_lists_its_tags(capsys, data, tmp_path):
    code, _, err = cli(capsys, "train", "--model", "ViT-B-16-SigLIP", *FAST, "--dataset", "folder", "--root", data,
                       "--output", tmp_path / "r")
    assert code == 2 and "webli" in one_error(err) and "--pretrained" in one_error(err)
    assert not (tmp_path / "r").exists()


def test_hf_pretrained_is_used_not_recorded_silently(capsys, data, tmp_path):
    model = make_hf_dir(tmp_path / "hfclip")
    code, _, err = cli(capsys, "train", "--model", f"hf:{model}", "--pretrained", "/does/not/exist.pt", *FAST,
                       "--dataset", "folder", "--root", data, "--output", tmp_path / "r")
    assert code == 2 and "--pretrained /does/not/exist.pt" in one_error(err)
    assert not (tmp_path / "r").exists()


# -- the CPU recipe and the plan ---------------------------------------------------------------------------------------
def test_quick_recipe_is_one_table_used_by_train_and_demo():
    from blocklora.cli.flags import run_config as _run_config
    from blocklora.pipeline.demo import demo_config

    args = build_parser().parse_args(["train", "--model", "tiny-clip", "--recipe", "quick", "--output", "x",
                                      "--dataset", "folder"])
    quick = _run_config(args).train
    assert (quick.iters, quick.batch_size, quick.lr, quick.aug_scale_min) == (200, 8, 4e-3, 0.5)
    demo = demo_config().train
    assert (demo.iters, demo.batch_size, demo.lr, demo.aug_scale_min) == (quick.iters, quick.batch_size, quick.lr,
                                                                         quick.aug_scale_min)
    # options and key=value overrides change single values of the recipe; the reference recipe stays the default
    args = build_parser().parse_args(["train", "--recipe", "quick", "--iters", "50", "--output", "x",
                                      "--dataset", "folder", "train.lr=1e-3"])
    assert (_run_config(args).train.iters, _run_config(args).train.lr, _run_config(args).train.batch_size) == \
        (50, 1e-3, 8)
    reference = _run_config(build_parser().parse_args(["train", "--output", "x", "--dataset", "folder"])).train
    assert (reference.iters, reference.iters_per_shot, reference.batch_size, reference.lr) == (None, 500, 32, 2e-4)
    assert recipe_overrides("reference") == [] and set(RECIPES) == {"reference", "quick"}
    with pytest.raises(BlockLoRAError, match="unknown recipe 'fast'"):
        recipe_overrides("fast")


def test_train_help_shows_the_recipes_and_the_pretrained_default(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--recipe {reference,quick}" in text and "iters 200, batch_size 8, lr 0.004" in text
    assert "packaged for effnet-minilm, none for tiny-clip" in text


def test_plan_names_steps_epochs_device_and_the_cpu_recipe():
    from blocklora.engine.fit import plan
    from blocklora.engine.runtime import make_runtime

    rt = make_runtime("cpu")
    lines = plan(2000, 0, 32, 20, rt)  # a set smaller than the batch is each step's whole batch (issue 25)
    assert lines[0] == ("plan: 2000 steps of batch 20 = 2000.0 epochs over the 20 K-shot images (train.batch_size 32 "
                        "is more than the set: every step is the whole set), on cpu (fp32)")
    assert "--recipe quick" in lines[1] and "200 steps of 8" in lines[1]
    assert plan(200, 50, 8, 160, rt) == [
        "plan: 200 steps of batch 8, 150 left from step 50 = 10.0 epochs over the 160 K-shot images, on cpu (fp32)"]
    assert plan(10, 0, 8, 160, rt, validation="the tested split (eval.split=val)")[0].endswith(
        "(validation: the tested split (eval.split=val)), on cpu (fp32)")


@pytest.mark.parametrize("n, batch, drop_last, steps", [(10, 32, False, 500), (47, 32, False, 500),
                                                        (47, 32, True, 500), (752, 32, False, 8000), (6, 4, True, 9)])
def test_plan_states_the_batch_and_epochs_the_stream_feeds(n, batch, drop_last, steps):
    """The plan's "batch B = E epochs" against what engine/stream.StepBatches feeds: the first step's batch, and the
    images fed over the run / the set's size (DTD 1-shot, 47 images, CLIP-LoRA's kept partial batch: 32 + 15)."""
    from blocklora.engine.fit import plan
    from blocklora.engine.runtime import make_runtime
    from blocklora.engine.stream import StepBatches

    line = plan(steps, 0, batch, n, make_runtime("cpu"), drop_last=drop_last)[0]
    said_batch, said_epochs = re.search(r"steps of batch (\d+) = ([\d.]+) epochs", line).groups()
    sb = StepBatches(n, batch, 1, 0, steps, drop_last=drop_last)
    assert int(said_batch) == sb.global_size(0)
    assert said_epochs == f"{sum(sb.global_size(t) for t in range(steps)) / n:.1f}"


def test_train_logs_the_plan_and_the_eta(caplog, data, tmp_path):
    with caplog.at_level(logging.INFO, logger="blocklora"):
        assert main(["train", "--model", "tiny-clip", "--shots", "2", "--iters", "8", "--batch-size", "4",
                     "--workers", "0", "--no-zero-shot", "--dataset", "folder", "--root", str(data), "--output",
                     str(tmp_path / "r")]) == 0
    text = caplog.text
    assert ("plan: 8 steps of batch 4 = 5.3 epochs over the 6 K-shot images (2 images left out of each epoch: "
            "drop_last), on cpu (fp32)") in text  # 3 x 2
    assert re.search(r"eta: [0-9.]+ s/step over steps 2-6: about \d+ s for the 2 steps left", text), text
    assert "plan: 8 steps" in (tmp_path / "r" / "train.log").read_text()


# -- more shots than a class has ---------------------------------------------------------------------------------------
def test_shots_drawn_with_replacement_are_named_and_recorded(caplog, data, tmp_path):
    with caplog.at_level(logging.WARNING, logger="blocklora"):
        assert main(["train", "--model", "tiny-clip", "--shots", "7", "--iters", "1", "--batch-size", "4",
                     "--workers", "0", "--no-zero-shot", "--dataset", "folder", "--root", str(data), "--output",
                     str(tmp_path / "r")]) == 0
    warning = next(r.getMessage() for r in caplog.records if "fewer training images" in r.getMessage())
    # 7 shots of 6 images: every class repeats; no validation shots are taken from them (issue 25)
    assert "3 class(es) have fewer training images than the 7 shots asked" in warning
    assert "'red apple' (6 images)" in warning and "data.replace=false" in warning
    results = json.loads((tmp_path / "r" / "results.json").read_text())
    assert results["replacement"]["allowed"] is True and results["replacement"]["used"] is True
    split = json.loads((tmp_path / "r" / "split.json").read_text())
    assert {c["class"]: (c["images"], c["shots"]) for c in results["replacement"]["classes"]} == {
        name: (6, 7) for name in ("red apple", "green leaf", "blue sky")}
    for c in results["replacement"]["classes"]:  # what the split file lists: 5 shots, some of them repeated
        paths = [path for path, label in split["train"] if split["classnames"][label] == c["class"]]
        assert len(paths) == 7 and len(set(paths)) == c["distinct"] < 7  # random.choices, as Dassl
    assert split["val"] == [] and results["validation"]["used"] is False and results["validation"]["val_shots"] == 0


def test_enough_images_no_replacement(tiny_run):
    results = json.loads((tiny_run / "results.json").read_text())
    assert results["replacement"] == {"allowed": True, "used": False, "classes": []}
    assert results["validation"] == {"used": False, "val_shots": 6,  # 2 per class, set aside from 6 images
                                     "why": "no model selection: the adapter of the last step is tested"}


# -- adapters that travel --------------------------------------------------------------------------------------------
def test_hf_relative_folder_works_from_anywhere_and_a_moved_one_is_named(capsys, data, tmp_path, monkeypatch):
    make_hf_dir(tmp_path / "hfclip")
    monkeypatch.chdir(tmp_path)
    code, _, err = cli(capsys, "train", "--model", "hf:hfclip", *FAST, "--dataset", "folder", "--root", data,
                       "--output", "run")
    assert code == 0, err
    run = json.loads((tmp_path / "run" / "adapter" / "blocklora_adapter.json").read_text())["run"]
    assert run["pretrained"] == str(tmp_path / "hfclip")
    image = next((data / "test").rglob("*.png"))
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    code, before, err = cli(capsys, "predict", "--adapter", "../run", image, "--json")  # the run folder is understood
    assert code == 0, err
    shutil.move(tmp_path / "hfclip", tmp_path / "moved")
    code, _, err = cli(capsys, "predict", "--adapter", "../run/adapter", image)
    assert code == 2 and f"{tmp_path / 'hfclip'}" in one_error(err) and "--pretrained PATH" in one_error(err)
    code, after, err = cli(capsys, "predict", "--adapter", "../run", "--pretrained", tmp_path / "moved", image,
                           "--json")
    assert code == 0 and after == before


def test_python_saved_adapter_records_what_the_cli_needs(capsys, tmp_path):
    backbone = load_backbone("tiny-clip", None)
    blocklora.inject(backbone.model, blocklora.AdapterConfig(n_blocks=8))
    blocklora.save_adapter(backbone.model, tmp_path / "bare", backbone="tiny-clip")
    image = tmp_path / "photo.png"
    Image.new("RGB", (40, 40), (200, 30, 30)).save(image)
    code, _, err = cli(capsys, "predict", "--adapter", tmp_path / "bare", image)
    line = one_error(err)
    assert code == 2 and "records its backbone (tiny-clip) but not the class names and prompt template" in line
    assert "classnames=[...]" in line and "template=" in line and "logit_scale=" in line
    blocklora.save_adapter(backbone.model, tmp_path / "full", backbone="tiny-clip", classnames=["red", "blue"],
                           template="a {} thing.", logit_scale=50.0, pretrained=None)
    code, out, err = cli(capsys, "predict", "--adapter", tmp_path / "full", image, "--json")
    assert code == 0, err
    (row,) = json.loads(out)  # --json: one array
    assert [t["class"] for t in row["top"]] in (["red", "blue"], ["blue", "red"])
    with pytest.raises(BlockLoRAError, match="needs backbone="):
        blocklora.save_adapter(backbone.model, tmp_path / "x", classnames=["a", "b"])


def test_adapter_option_takes_the_run_folder_or_says_what_it_looked_for(capsys, tiny_run, data, tmp_path):
    code, out, err = cli(capsys, "eval", "--adapter", tiny_run, "--dataset", "folder", "--root", data,
                         "--workers", "0", "--json")
    assert code == 0 and json.loads(out)["n"] == 6, err
    (tmp_path / "empty").mkdir()
    code, _, err = cli(capsys, "predict", "--adapter", tmp_path / "empty", next((data / "test").rglob("*.png")))
    assert code == 2 and "holds no adapter (blocklora_adapter.json)" in one_error(err)


# -- exports that carry their classifier -------------------------------------------------------------------------------
def test_open_clip_exports_carry_the_classifier_and_load_in_stock_open_clip(capsys, tiny_run, tmp_path):
    import open_clip
    from safetensors import safe_open

    run = json.loads((tiny_run / "adapter" / "blocklora_adapter.json").read_text())["run"]
    assert cli(capsys, "export", "--adapter", tiny_run, "--output", tmp_path / "m.safetensors")[0] == 0
    with safe_open(str(tmp_path / "m.safetensors"), "pt") as f:
        meta = json.loads(f.metadata()["blocklora.classifier"])
    assert meta["classnames"] == run["classnames"] and meta["template"] == run["template"]
    assert meta["logit_scale"] == run["logit_scale"] and meta["activation"] == "gelu"
    assert meta["prompts"] == [run["template"].format(c) for c in run["classnames"]]
    assert cli(capsys, "export", "--adapter", tiny_run, "--output", tmp_path / "folder")[0] == 0
    assert json.loads((tmp_path / "folder" / "blocklora_classifier.json").read_text()) == meta
    model = open_clip.create_model(f"local-dir:{tmp_path / 'folder'}").eval()  # stock open_clip, no blocklora
    with torch.no_grad():
        text = model.encode_text(open_clip.get_tokenizer("ViT-B-32")(meta["prompts"]))
    assert text.shape[0] == len(meta["classnames"])


def test_an_exports_prompts_are_the_texts_blocklora_scores_with(tmp_path):
    """Class names saved from Python with underscores: the export's prompts, encoded by stock open_clip from the
    export alone, give the class embeddings predict and eval score with (engine.evaluate.prompts, the one place a
    class name becomes text)."""
    import open_clip

    from blocklora.engine import evaluate as ev
    from blocklora.engine.runtime import make_runtime
    from blocklora.pipeline.trained import export, load_trained

    backbone = load_backbone("tiny-clip", None)
    blocklora.inject(backbone.model, blocklora.AdapterConfig(n_blocks=4))
    torch.manual_seed(0)
    with torch.no_grad():  # a text-side update that matters (B starts at zero)
        for name, p in backbone.model.named_parameters():
            if name.endswith("lora_B"):
                p.normal_(0, 0.5)
    names = ["red_apple", " green_leaf_", "blue sky"]
    blocklora.save_adapter(backbone.model, tmp_path / "adapter", backbone="tiny-clip", classnames=names,
                           pretrained=None)
    export(tmp_path / "adapter", tmp_path / "folder")
    meta = json.loads((tmp_path / "folder" / "blocklora_classifier.json").read_text())
    assert meta["classnames"] == names
    assert meta["prompts"] == ["a photo of a red apple.", "a photo of a green leaf.", "a photo of a blue sky."]
    model = open_clip.create_model(f"local-dir:{tmp_path / 'folder'}").eval()  # stock open_clip, no blocklora
    with torch.no_grad():
        stock = F.normalize(model.encode_text(open_clip.get_tokenizer("ViT-B-32")(meta["prompts"])), dim=-1)
        loaded, _, _ = load_trained(tmp_path / "adapter", device="cpu")
        ours = ev.encode_classes(loaded, names, [meta["template"]], make_runtime("cpu"))
    torch.testing.assert_close(stock, ours, atol=1e-5, rtol=1e-5)


def test_transformers_exports_get_id2label_and_folder_only_families_refuse_a_file_name(capsys, data, tmp_path):
    from transformers import CLIPModel

    model = make_hf_dir(tmp_path / "hfclip")
    assert cli(capsys, "train", "--model", f"hf:{model}", *FAST, "--dataset", "folder", "--root", data,
               "--output", tmp_path / "run")[0] == 0
    code, _, err = cli(capsys, "export", "--adapter", tmp_path / "run", "--output", tmp_path / "merged.safetensors")
    assert code == 2 and "exports a folder" in one_error(err) and str(tmp_path / "merged") in one_error(err)
    assert not (tmp_path / "merged.safetensors").exists()
    assert cli(capsys, "export", "--adapter", tmp_path / "run", "--output", tmp_path / "merged")[0] == 0
    stock = CLIPModel.from_pretrained(tmp_path / "merged")
    names = json.loads((tmp_path / "merged" / "blocklora_classifier.json").read_text())["classnames"]
    assert stock.config.id2label == dict(enumerate(names)) and stock.config.label2id == {n: i for i, n in
                                                                                         enumerate(names)}


def test_effnet_minilm_export_is_a_folder_never_a_file_named_like_one():
    from blocklora.pipeline.trained import check_export_path

    with pytest.raises(BlockLoRAError, match=r"effnet-minilm exports a folder \(a folder: visual.safetensors"):
        check_export_path("effnet-minilm", Path("out/merged.safetensors"))
    check_export_path("effnet-minilm", Path("out/merged"))
    check_export_path("ViT-B-16", Path("out/merged.safetensors"))


def test_export_help_says_what_each_family_writes(capsys):
    with pytest.raises(SystemExit):
        main(["export", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for words in ("open_clip: NAME.safetensors or NAME.pt", "transformers: a save_pretrained folder",
                  "effnet-minilm: a folder: visual.safetensors", "blocklora_classifier.json"):
        assert words in text, words


# -- predict streams and skips unreadable files ---------------------------------------------------------------------
def test_predict_streams_rows_and_reports_unreadable_files(capsys, tiny_run, tmp_path, monkeypatch):
    monkeypatch.setenv("BLOCKLORA_PROGRESS", "bar")  # a terminal's progress bar, on stderr
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    for i in range(70):  # more than one batch of 64
        Image.new("RGB", (24, 24), (i * 3, 100, 200 - i)).save(inbox / f"img_{i:03d}.png")
    (inbox / "img_010b.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    (inbox / "zz_broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    code, out, err = cli(capsys, "predict", "--adapter", tiny_run, inbox, "--jsonl", "--topk", "1")
    rows = [json.loads(line) for line in out.splitlines()]  # one line per image, as it is done
    assert len(rows) == 70 and all(len(r["top"]) == 1 for r in rows)
    assert [Path(r["image"]).name for r in rows] == [f"img_{i:03d}.png" for i in range(70)]
    skipped = [line for line in err.splitlines() if line.startswith("skipped:")]
    assert len(skipped) == 2 and "img_010b.png" in skipped[0] and "zz_broken.jpg" in skipped[1]
    line = one_error(err)
    assert code == 2 and "2 of 72 images could not be read" in line and "img_010b.png" in line
    assert "predict:" in err  # the progress bar


def test_image_check_shows_progress_on_large_sets(capsys, caplog, monkeypatch, data):
    from blocklora.data import images, load_dataset

    monkeypatch.setattr(images, "PROGRESS_FROM", 2)
    splits = load_dataset("folder", str(data))
    with caplog.at_level(logging.INFO, logger="blocklora"):  # stderr is no terminal here: log lines
        assert images.verify_images(splits.train, splits.image_reader) == []
    assert "check images (full decode): 18/18 images (100%)" in caplog.text
    monkeypatch.setenv("BLOCKLORA_PROGRESS", "bar")  # a terminal's bar
    assert images.verify_images(splits.train, splits.image_reader) == []
    assert "check images (full decode)" in capsys.readouterr().err


# -- documents -----------------------------------------------------------------------------------------------------
def test_every_document_cited_ships_in_the_repository():
    texts = {p: p.read_text() for p in [REPO / "README.md", REPO / "BENCHMARKS.md", *(REPO / "docs").glob("*.md"),
                                        *(REPO / "src").rglob("*.py")]}
    cited = set()
    for path, text in texts.items():
        assert "shared/docs" not in text and "../shared" not in text, path
        cited |= set(re.findall(r"\bdocs/[\w.-]+\.md\b", text))
        for link in re.findall(r"\]\(([^)#:]+\.md)\)", text):  # relative markdown links
            assert (path.parent / link).resolve().is_file(), (path, link)
    assert {"docs/method.md", "docs/protocol.md", "docs/recipe.md", "docs/reliability.md"} <= cited
    for doc in cited:
        assert (REPO / doc).is_file(), doc
    readme = texts[REPO / "README.md"]
    assert "dark-on-white" in readme and "same torch thread count" in readme and "--recipe quick" in readme


# -- an own flat folder, a run that travels, eval with no options (issue 25) -------------------------------------------
def test_flat_folder_run_records_its_split_and_evaluates_alone(capsys, tmp_path, monkeypatch):
    make_folder_dataset(tmp_path / "made", n_classes=3, train_per_class=5, test_per_class=0)
    shutil.move(tmp_path / "made" / "train", tmp_path / "flat")  # torchvision's DIR/<class>/<images>
    monkeypatch.chdir(tmp_path)
    code, _, err = cli(capsys, "train", "--model", "tiny-clip", *FAST, "--dataset", "folder", "--root", "flat",
                       "--output", "run")
    assert code == 2 and "--test-fraction 0.2" in one_error(err) and not (tmp_path / "run").exists()
    assert cli(capsys, "train", "--model", "tiny-clip", *FAST, "--dataset", "folder", "--root", "flat",
               "--test-fraction", "0.4", "--output", "run")[0] == 0
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["dataset"]["held_out"]["test_fraction"] == 0.4 and results["n_test"] == 6  # 2 of 5 per class
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["config"]["data"]["root"] == str(tmp_path / "flat")  # resolved; the request keeps what was typed
    assert saved["request"]["data"]["root"] == "flat" and saved["config"]["data"]["test_fraction"] == 0.4
    assert json.loads((tmp_path / "run" / "split.json").read_text())["test_fraction"] == 0.4
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    # eval needs nothing but the run: its dataset, root and held-out fraction are the run's own
    code, out, _ = cli(capsys, "eval", "--adapter", tmp_path / "run", "--json", "--workers", "0")
    assert code == 0 and json.loads(out)["n"] == 6 and json.loads(out)["top1"] == results["top1"]
    # the run's config.json starts it again from another folder; its split file brings the fraction along
    assert cli(capsys, "train", "--config", tmp_path / "run" / "config.json", "--output", "again")[0] == 0
    assert json.loads((elsewhere / "again" / "results.json").read_text())["top1"] == results["top1"]
    assert cli(capsys, "train", "--model", "tiny-clip", *FAST[2:], "--dataset", "folder", "--root", tmp_path / "flat",
               "--split-file", tmp_path / "run" / "split.json", "--output", "from-split")[0] == 0
    # another folder at the recorded root (here: a class renamed): "the run's own data" is refused, not a score on
    # other classes that reads like the run's
    (tmp_path / "flat" / "red_apple").rename(tmp_path / "flat" / "a_red_apple")
    code, _, err = cli(capsys, "eval", "--adapter", tmp_path / "run", "--workers", "0")
    assert code == 2 and "is not the one" in one_error(err) and "'a red apple' where the run had 'blue sky'" in err
    code, out, _ = cli(capsys, "eval", "--adapter", tmp_path / "run", "--dataset", "folder", "--root",
                       tmp_path / "flat", "--test-fraction", "0.4", "--json", "--workers", "0")
    assert code == 0 and json.loads(out)["n"] == 6  # named explicitly: evaluated on the classes there


def test_progress_is_log_lines_when_stderr_is_not_a_terminal(capsys, caplog, data, tmp_path, monkeypatch):
    """Redirected (pytest captures stderr: no terminal), training logs one line every train.log_every steps with the
    loss, and no carriage-return frame reaches stderr; BLOCKLORA_PROGRESS=bar forces tqdm's bar (issue 25)."""
    from blocklora.engine.progress import LineProgress, progress, use_bars

    monkeypatch.delenv("BLOCKLORA_PROGRESS", raising=False)
    assert not use_bars() and isinstance(progress(total=3), LineProgress)
    with caplog.at_level(logging.INFO, logger="blocklora"):
        code, _, err = cli(capsys, "train", "--model", "tiny-clip", "--shots", "2", "--iters", "6", "--batch-size",
                           "4", "--workers", "0", "--no-zero-shot", "--dataset", "folder", "--root", data,
                           "--output", tmp_path / "r", "train.log_every=3")
    assert code == 0 and "\r" not in err
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("train: ")]
    assert [re.match(r"train: (\d)/6 steps", line).group(1) for line in lines] == ["3", "6"], lines
    assert "(50%), loss=" in lines[0] and "eta" in lines[0] and "s/step" in lines[1]
    assert "train: 6/6 steps (100%)" in (tmp_path / "r" / "train.log").read_text()
    monkeypatch.setenv("BLOCKLORA_PROGRESS", "bar")
    assert use_bars() and not isinstance(progress(total=3), LineProgress)


def test_runs_write_predictions_confusion_and_curve(capsys, tiny_run, data, tmp_path):
    """predictions.csv holds one row per test image whose correct column gives results.json's top-1 and whose
    predicted class and probability are what `predict` says for that image; eval --output writes the same rows."""
    import csv

    results = json.loads((tiny_run / "results.json").read_text())
    rows = list(csv.DictReader((tiny_run / "predictions.csv").open()))
    assert list(rows[0]) == ["path", "label", "predicted", "prob", "correct"] and len(rows) == results["n_test"]
    assert 100 * sum(int(r["correct"]) for r in rows) / len(rows) == pytest.approx(results["top1"], abs=1e-4)
    code, out, _ = cli(capsys, "predict", "--adapter", tiny_run, rows[0]["path"], "--json", "--topk", "1")
    top = json.loads(out)[0]["top"][0]
    assert top["class"] == rows[0]["predicted"] and top["prob"] == pytest.approx(float(rows[0]["prob"]), abs=1e-5)
    for name in ("confusion.png", "curve.png"):
        assert Image.open(tiny_run / name).size[0] > 100
    code, _, _ = cli(capsys, "eval", "--adapter", tiny_run, "--workers", "0", "--output", tmp_path / "ev")
    assert code == 0 and list(csv.DictReader((tmp_path / "ev" / "predictions.csv").open())) == rows
    assert (tmp_path / "ev" / "confusion.png").is_file()
    # again into the same folder: eval replaces its own files, never a user's (nor one edited since)
    assert cli(capsys, "eval", "--adapter", tiny_run, "--workers", "0", "--output", tmp_path / "ev")[0] == 0
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "predictions.csv").write_text("my own\n")
    (tmp_path / "ev" / "predictions.csv").write_text("edited\n")
    for folder in (mine, tmp_path / "ev"):
        code, _, err = cli(capsys, "eval", "--adapter", tiny_run, "--workers", "0", "--output", folder)
        assert code == 2 and f"refusing to replace {folder / 'predictions.csv'}" in one_error(err)
    assert (mine / "predictions.csv").read_text() == "my own\n" and not (mine / "confusion.png").exists()
    code, _, err = cli(capsys, "eval", "--adapter", tiny_run, "--workers", "0", "--output", mine / "predictions.csv")
    assert code == 2 and "is a file: give a folder" in one_error(err)


def test_open_clip_folder_export_has_a_card_and_a_snippet_that_runs(capsys, tiny_run, tmp_path):
    """The printed load line is Python that runs as printed with stock open_clip (issue 25), and the folder holds a
    model card with the base model, method, K, seed and accuracy."""
    results = json.loads((tiny_run / "results.json").read_text())
    code, out, _ = cli(capsys, "export", "--adapter", tiny_run, "--output", tmp_path / "merged")
    hint = out.split("load it with: ", 1)[1].strip()
    assert code == 0 and hint == f"import open_clip; model = open_clip.create_model('local-dir:{tmp_path / 'merged'}')"
    scope: dict = {}
    exec(hint, scope)  # noqa: S102
    assert sum(p.numel() for p in scope["model"].parameters()) > 0
    card = (tmp_path / "merged" / "README.md").read_text()
    assert card.startswith("# tiny-clip adapted with blocklora (block_lora)")
    assert "K = 2 shots per class, seed 1" in card and f"top-1 {results['top1']:.2f}%" in card and hint in card


def test_readme_python_api_snippet_runs(tmp_path, monkeypatch, capsys):
    """README's "Python API" notebook example, executed as it stands (issue 25) on a small folder of real colour
    photos in the layout it names; only the quick recipe's step count is cut for the test's time."""
    from blocklora.config.recipes import RECIPES

    text = (REPO / "README.md").read_text()
    section = text[text.index("## Python API"):]
    snippet = section[section.index("```python\n") + 10:section.index("```\n", section.index("```python\n") + 10)]
    make_folder_dataset(tmp_path / "photos", n_classes=2, train_per_class=4, test_per_class=2)
    for split in ("train", "test"):  # the class the snippet names
        shutil.move(tmp_path / "photos" / split / "red_apple", tmp_path / "photos" / split / "cat")
    shutil.copy(tmp_path / "photos" / "test" / "cat" / "000.png", tmp_path / "photos" / "test" / "cat" / "1.jpg")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setitem(RECIPES["quick"], "train.iters", 1)
    monkeypatch.setitem(RECIPES["quick"], "train.batch_size", 2)
    scope: dict = {}
    exec(snippet, scope)  # noqa: S102
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("top-1 ") and out[1].split()[0] in ("cat", "green leaf")
    import blocklora

    one = scope["clf"].predict(Image.open(tmp_path / "photos" / "test" / "cat" / "1.jpg"), topk=1)
    assert one[0]["class"] == out[1].split()[0] and len(one[0]["top"]) == 1
    # what a notebook gets wrong is a ConfigError naming it (was: TypeError, IndexError, AttributeError)
    for images, kw, says in (([torch.zeros(3, 8, 8)], {}, "file paths or PIL images, got Tensor"),
                             ([None], {}, "got NoneType"), (["photos/test/cat/1.jpg"], {"topk": 0}, "topk must be")):
        with pytest.raises(blocklora.ConfigError, match=says):
            scope["clf"].predict(images, **kw)
    with pytest.raises(blocklora.ConfigError, match="overrides must map config keys to values"):
        blocklora.train("again", dataset="folder", root="photos", overrides=["train.lr=1e-3"])
    assert not (tmp_path / "again").exists()
    assert {"train", "load_trained", "Classifier"} <= set(dir(blocklora)) <= set(blocklora.__all__) | {
        "__version__", "adapters", "backbones", "pipeline", "engine", "config", "data", "errors", "checks",
        "choices", "reading", "ownership", "interop", "cli", "grid", "methods"}
