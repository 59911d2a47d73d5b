"""Dataset readers on tiny trees in the real layouts: classes, counts, labels, templates, paths, and precise errors."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from blocklora.data import DATASETS, DatasetSplits, imagenet_indices, load_dataset
from blocklora.errors import DataError
from data_trees import (
    FGVC_VARIANTS,
    WNIDS,
    ZHOU_CLASSES,
    ZHOU_COUNTS,
    ZHOU_LAYOUT,
    make_class_tree,
    make_fgvc,
    make_imagenet,
    make_zhou,
    write_classnames,
    write_image,
)

COOP_TEMPLATES = {  # CoOp's per-dataset templates
    "caltech101": "a photo of a {}.", "oxford_pets": "a photo of a {}, a type of pet.",
    "stanford_cars": "a photo of a {}.", "oxford_flowers": "a photo of a {}, a type of flower.",
    "food101": "a photo of {}, a type of food.", "fgvc_aircraft": "a photo of a {}, a type of aircraft.",
    "sun397": "a photo of a {}.", "dtd": "{} texture.", "eurosat": "a centered satellite photo of {}.",
    "ucf101": "a photo of a person doing {}.", "imagenet": "a photo of a {}.",
}


def error(fn, *args) -> str:
    """The DataError message of fn(*args): one line."""
    with pytest.raises(DataError) as e:
        fn(*args)
    message = str(e.value)
    assert "\n" not in message
    return message


def assert_files(d: DatasetSplits) -> None:
    for item in d.train + d.val + d.test:
        assert os.path.isabs(item.path) and os.path.isfile(item.path), item.path
        assert 0 <= item.label < len(d.classnames)


def test_known_keys():
    assert {"imagenet", *ZHOU_LAYOUT, "fgvc_aircraft", "imagenet_v2", "imagenet_sketch", "imagenet_a", "imagenet_r",
            "folder", "csv", "fashion-mnist"} == set(DATASETS)
    assert "did you mean oxford_pets" in error(load_dataset, "oxford_pet", "/tmp")


# -- Zhou split datasets ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("scheme", ["coop", "clip-lora"])
@pytest.mark.parametrize("key", list(ZHOU_LAYOUT))
def test_zhou_readers(tmp_path, key, scheme):
    tree = make_zhou(tmp_path, key, scheme)
    d = load_dataset(key, tmp_path)
    assert d.name == key and d.root == tree["dir"]
    assert d.classnames == ["golden retriever", "Sea or Lake", "abbey"]  # "_" -> " " for prompts
    assert d.template == COOP_TEMPLATES[key]
    for part, n in ZHOU_COUNTS.items():
        items = getattr(d, part)
        assert len(items) == n * len(ZHOU_CLASSES)
        # same order and labels as the file; paths = image folder + relative path
        assert [(i.path, i.label) for i in items] == [
            (os.path.join(tree["image_dir"], rel), y) for rel, y, _ in tree["split"][part]]
    assert_files(d)


def test_zhou_dataset_folder_as_root(tmp_path):
    tree = make_zhou(tmp_path, "dtd")
    d = load_dataset("dtd", tree["dir"])  # pointing at the dataset's own folder works too
    assert len(d.train) == ZHOU_COUNTS["train"] * 3


def test_zhou_classnames_from_train_entries_and_string_labels(tmp_path):
    tree = make_zhou(tmp_path, "oxford_pets", classes=["a", "b"], counts={"train": 2, "val": 1, "test": 1})
    split = tree["split"]
    split["test"][0][2] = "renamed_in_test"  # CoOp names classes from the training set
    split["val"][0][1] = str(split["val"][0][1])  # CoOp reads labels with int()
    tree["split_file"].write_text(json.dumps(split))
    d = load_dataset("oxford_pets", tmp_path)
    assert d.classnames == ["a", "b"]
    assert d.val[0].label == 0


def test_zhou_errors(tmp_path):
    root = tmp_path / "data"
    msg = error(load_dataset, "oxford_pets", root)
    assert str(root) in msg and "does not exist" in msg
    root.mkdir()
    msg = error(load_dataset, "caltech101", root)  # no dataset folder: both names
    assert str(root / "caltech-101") in msg and str(root / "Caltech101") in msg and "DATASETS.md" in msg

    tree = make_zhou(root, "oxford_pets")
    split_file = tree["split_file"]
    text = split_file.read_text()
    split_file.unlink()
    msg = error(load_dataset, "oxford_pets", root)
    assert f"split file {split_file} is missing" in msg and "DATASETS.md" in msg

    split_file.write_text(text[: len(text) // 2])  # truncated JSON
    msg = error(load_dataset, "oxford_pets", root)
    assert str(split_file) in msg and "not valid JSON" in msg and "line " in msg

    bad = json.loads(text)
    bad["train"][1] = ["x.jpg", "seven", "cat"]
    split_file.write_text(json.dumps(bad))
    msg = error(load_dataset, "oxford_pets", root)
    assert "entry train[1]" in msg and '"seven"' in msg

    bad = json.loads(text)
    del bad["test"]
    split_file.write_text(json.dumps(bad))
    assert '"test"' in error(load_dataset, "oxford_pets", root)

    bad = json.loads(text)
    bad["train"] = [e for e in bad["train"] if e[1] != 1]
    bad["val"] = [e for e in bad["val"] if e[1] != 1]
    bad["test"] = [e for e in bad["test"] if e[1] != 1]
    split_file.write_text(json.dumps(bad))
    assert "no entry has label 1" in error(load_dataset, "oxford_pets", root)

    split_file.write_text(text)
    shutil.rmtree(tree["image_dir"])
    msg = error(load_dataset, "oxford_pets", root)
    assert f"image folder {tree['image_dir']} is missing" in msg

    tree["image_dir"].mkdir()
    msg = error(load_dataset, "oxford_pets", root)  # images not where the split says
    assert str(tree["image_dir"] / tree["split"]["train"][0][0]) in msg and "does not exist" in msg


# -- FGVC-Aircraft ---------------------------------------------------------------------------------------------------
def test_fgvc_aircraft(tmp_path):
    ddir = make_fgvc(tmp_path)
    d = load_dataset("fgvc_aircraft", tmp_path)
    assert d.classnames == FGVC_VARIANTS and d.template == COOP_TEMPLATES["fgvc_aircraft"]
    assert [len(d.train), len(d.val), len(d.test)] == [ZHOU_COUNTS[p] * 3 for p in ("train", "val", "test")]
    first = (ddir / "images_variant_train.txt").read_text().splitlines()[0].split(" ")
    assert d.train[0].path == str(ddir / "images" / f"{first[0]}.jpg")
    assert d.train[2].label == 2  # "F-16A/B": a name with a slash, label = line of variants.txt
    assert_files(d)


def test_fgvc_errors(tmp_path):
    ddir = make_fgvc(tmp_path)
    with open(ddir / "images_variant_val.txt", "a") as f:
        f.write("1234567 Boeing 999\n")
    n = len((ddir / "images_variant_val.txt").read_text().splitlines())
    msg = error(load_dataset, "fgvc_aircraft", tmp_path)
    assert f"{ddir / 'images_variant_val.txt'} line {n}" in msg and "'Boeing 999'" in msg
    (ddir / "variants.txt").unlink()
    msg = error(load_dataset, "fgvc_aircraft", tmp_path)
    assert f"{ddir / 'variants.txt'} is missing" in msg and "fgvc-aircraft-2013b" in msg


# -- ImageNet --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("layout", ["coop", "clip-lora"])
def test_imagenet_layouts(tmp_path, layout):
    wnids = ["n01484850", "n01440764", "n01443537"]
    ddir = make_imagenet(tmp_path, layout, wnids)
    base = ddir / "images" if layout == "coop" else ddir
    d = load_dataset("imagenet", tmp_path)
    assert d.classnames == ["tench", "goldfish", "great white shark"]  # sorted wnids
    assert d.val == [] and len(d.train) == 18 and len(d.test) == 6
    assert d.train[0].path == str(base / "train" / "n01440764" / "n01440764_0.JPEG")
    assert [i.label for i in d.train] == [0] * 6 + [1] * 6 + [2] * 6
    assert all("/val/" in i.path for i in d.test)  # test = the val folder
    assert d.template == "a photo of a {}." and imagenet_indices(d) == [0, 1, 2]
    assert_files(d)


def test_imagenet_files_sorted_and_filtered(tmp_path):
    ddir = make_imagenet(tmp_path, "coop", ["n01440764"], n_train=0, n_val=1)
    folder = ddir / "images" / "train" / "n01440764"
    for name in ["b.JPEG", "a.png", "c.jpeg", ".hidden.jpg"]:
        write_image(folder / name)
    (folder / "notes.txt").write_text("not an image")
    d = load_dataset("imagenet", tmp_path)
    assert [Path(i.path).name for i in d.train] == ["a.png", "b.JPEG", "c.jpeg"]


def test_imagenet_without_classnames_uses_open_clip(tmp_path):
    make_imagenet(tmp_path, "clip-lora", ["n01440764", "n01443537"], classnames=False)
    assert load_dataset("imagenet", tmp_path).classnames == ["tench", "goldfish"]


def test_imagenet_errors(tmp_path):
    msg = error(load_dataset, "imagenet", tmp_path)
    assert str(tmp_path / "imagenet") in msg
    ddir = make_imagenet(tmp_path, "coop")
    shutil.rmtree(ddir / "images" / "val")
    assert f"{ddir / 'images' / 'val'} is missing" in error(load_dataset, "imagenet", tmp_path)
    write_image(ddir / "images" / "val" / "n09999999" / "x.JPEG")
    msg = error(load_dataset, "imagenet", tmp_path)
    assert str(ddir / "images" / "val" / "n09999999") in msg
    shutil.rmtree(ddir / "images" / "val" / "n09999999")
    write_image(ddir / "images" / "train" / "n09999999" / "x.JPEG")
    msg = error(load_dataset, "imagenet", tmp_path)
    assert str(ddir / "images" / "train" / "n09999999") in msg and "classnames.txt" in msg
    shutil.rmtree(ddir / "images" / "train" / "n09999999")
    (ddir / "images" / "train" / "n01440764" / "extra").mkdir()
    shutil.rmtree(ddir / "images" / "train" / "n01443537")
    (ddir / "images" / "train" / "n01443537").mkdir()
    msg = error(load_dataset, "imagenet", tmp_path)
    assert f"class folder {ddir / 'images' / 'train' / 'n01443537'} has no images" in msg


# -- ImageNet variants -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("folder", ["imagenetv2", "imagenet_v2"])
def test_imagenet_v2(tmp_path, folder):
    image_dir = tmp_path / folder / "imagenetv2-matched-frequency-format-val"
    make_class_tree(image_dir, {"0": 2, "2": 3, "4": 1})
    write_classnames(tmp_path / folder / "classnames.txt")
    d = load_dataset("imagenet_v2", tmp_path)
    assert d.classnames == [WNIDS[w] for w in sorted(WNIDS)]
    assert d.train == [] and d.val == [] and [i.label for i in d.test] == [0, 0, 2, 2, 2, 4]
    assert imagenet_indices(d) == [0, 1, 2, 3, 4]
    assert_files(d)


@pytest.mark.parametrize("folder,sub", [("imagenet-sketch", "images"), ("imagenet_sketch", "")])
def test_imagenet_sketch(tmp_path, folder, sub):
    make_class_tree(tmp_path / folder / sub, {"n01443537": 2, "n01491361": 1}, ext=".JPEG")
    write_classnames(tmp_path / "imagenet" / "classnames.txt")  # falls back to root/imagenet/classnames.txt
    d = load_dataset("imagenet_sketch", tmp_path)
    assert len(d.classnames) == 5 and [i.label for i in d.test] == [1, 1, 3]
    assert_files(d)


@pytest.mark.parametrize("key,folder,sub", [
    ("imagenet_a", "imagenet-adversarial", "imagenet-a"), ("imagenet_a", "imagenet-a", ""),
    ("imagenet_r", "imagenet-rendition", "imagenet-r"), ("imagenet_r", "imagenet_r", ""),
])
def test_imagenet_a_r(tmp_path, key, folder, sub):
    image_dir = tmp_path / folder / sub if sub else tmp_path / folder
    make_class_tree(image_dir, {"n01494475": 1, "n01443537": 2})
    (image_dir / "README.txt").write_text("ignored")
    write_classnames(tmp_path / folder / "classnames.txt")
    d = load_dataset(key, tmp_path)
    assert d.classnames == ["goldfish", "hammerhead shark"]  # the classes present, in ImageNet order
    assert [i.label for i in d.test] == [0, 0, 1]
    assert imagenet_indices(d) == [1, 4]  # among the 5 classes of this classnames.txt
    assert_files(d)


def test_imagenet_a_without_classnames_uses_open_clip_order(tmp_path):
    # ImageNet-A's first classes: stingray (index 6) and goldfinch (11) of the 1000
    make_class_tree(tmp_path / "imagenet-adversarial" / "imagenet-a", {"n01531178": 1, "n01498041": 1})
    d = load_dataset("imagenet_a", tmp_path)
    assert d.classnames == ["stingray", "goldfinch"] and imagenet_indices(d) == [6, 11]


def test_variant_errors(tmp_path):
    msg = error(load_dataset, "imagenet_r", tmp_path)
    assert str(tmp_path / "imagenet-rendition" / "imagenet-r") in msg and str(tmp_path / "imagenet_r") in msg
    make_class_tree(tmp_path / "imagenetv2" / "imagenetv2-matched-frequency-format-val", {"0": 1, "junk": 1})
    write_classnames(tmp_path / "imagenetv2" / "classnames.txt")
    assert "junk" in error(load_dataset, "imagenet_v2", tmp_path)


# -- custom data -----------------------------------------------------------------------------------------------------
def test_folder_dataset(tmp_path):
    root = tmp_path / "my_set"
    make_class_tree(root / "train", {"red_fox": 3, "cat": 2})
    make_class_tree(root / "test", {"cat": 1, "red_fox": 2}, ext=".png")
    write_image(root / "train" / "cat" / "nested" / "deep.jpg")
    d = load_dataset("folder", root)
    assert d.name == "my_set" and d.classnames == ["cat", "red fox"] and d.val == []
    assert [i.label for i in d.train] == [0, 0, 0, 1, 1, 1] and len(d.test) == 3
    assert d.train[2].path.endswith("cat/nested/deep.jpg")
    make_class_tree(root / "val", {"cat": 1})
    assert len(load_dataset("folder", root).val) == 1
    assert_files(d)


def test_image_files_the_scan_leaves_out_are_reported(tmp_path, caplog):
    """Folder scans list torchvision ImageFolder's extensions (the peers' rule); a GIF or JFIF file beside them,
    which PIL reads, is left out with one warning per split naming the count by extension, not silently."""
    import logging

    from blocklora.pipeline.trained import image_paths

    root = tmp_path / "my_set"
    make_class_tree(root / "train", {"cat": 1, "dog": 1})
    make_class_tree(root / "test", {"cat": 1, "dog": 1})
    for name in ("a.gif", "b.GIF", "c.jfif"):
        write_image(root / "train" / "cat" / name)
    (root / "train" / "dog" / "notes.txt").write_text("not an image")
    with caplog.at_level(logging.WARNING, logger="blocklora"):
        d = load_dataset("folder", root)
        files = image_paths([root / "train" / "cat"])
    assert len(d.train) == 2 and not any(i.path.lower().endswith((".gif", ".jfif")) for i in d.train)
    assert len(files) == 1
    warned = [r.getMessage() for r in caplog.records]
    assert len(warned) == 2 and all("3 image file(s) left out (2 .gif, 1 .jfif)" in w for w in warned)
    assert str(root / "train") in warned[0] and warned[1].startswith("predict:")


def test_folder_errors(tmp_path):
    root = tmp_path / "set"
    root.mkdir()
    assert f"{root / 'train'} is missing" in error(load_dataset, "folder", root)
    make_class_tree(root / "train", {"a": 1, "b": 1})
    assert f"{root / 'test'} is missing" in error(load_dataset, "folder", root)
    make_class_tree(root / "test", {"a": 1, "c": 1})
    assert f"class folder {root / 'test' / 'c'}" in error(load_dataset, "folder", root)
    shutil.rmtree(root / "test" / "c")
    (root / "train" / "empty").mkdir()
    (root / "train" / "empty" / "readme.txt").write_text("no images")
    assert f"class folder {root / 'train' / 'empty'} has no images" in error(load_dataset, "folder", root)


def write_csv(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n")
    return path


def test_csv_dataset(tmp_path):
    for name in ["a1.jpg", "a2.jpg", "b1.png", "t1.jpg", "t2.jpg", "v1.jpg"]:
        write_image(tmp_path / "img" / name)
    path = write_csv(tmp_path / "pets.csv", [
        "split,path,label,comment",
        "train,img/a1.jpg,zebra_fish,x", "train,img/a2.jpg,zebra_fish,", f"train,{tmp_path / 'img' / 'b1.png'},ant,",
        "test,img/t1.jpg,ant,", "test,img/t2.jpg,zebra_fish,", "val,img/v1.jpg,ant,",
    ])
    d = load_dataset("csv", path)
    assert d.name == "pets" and d.root == tmp_path and d.classnames == ["ant", "zebra fish"]
    assert [(Path(i.path).name, i.label) for i in d.train] == [("a1.jpg", 1), ("a2.jpg", 1), ("b1.png", 0)]
    assert [i.label for i in d.test] == [0, 1] and len(d.val) == 1
    assert_files(d)


@pytest.mark.parametrize("lines,expected", [
    (["path,label", "img/a.jpg,x"], "line 1: header path,label lacks column 'split'"),
    (["path,label,split", "img/a.jpg,x,train", "img/a.jpg,x,training"], "line 3: split 'training'"),
    (["path,label,split", "img/a.jpg,x,train", "img/a.jpg,x"], "line 3 has 2 fields, the header has 3"),
    (["path,label,split", "img/a.jpg,x,train", "img/a.jpg,x,test,extra"], "line 3 has 4 fields"),
    (["path,label,split", "img/a.jpg,x,train", ",x,test"], "line 3: empty path"),
    (["path,label,split", "img/a.jpg,x,train", "img/a.jpg,y,test"], "line 3: class 'y' has no train rows"),
    (["path,label,split", "img/a.jpg,x,train", "img/missing.jpg,x,test"], "line 3: image"),
    (["path,label,split"], "no rows"),
    (["path,label,split,path", "img/a.jpg,x,train,img/a.jpg"], "names column 'path' 2 times"),
])
def test_csv_errors(tmp_path, lines, expected):
    write_image(tmp_path / "img" / "a.jpg")
    path = write_csv(tmp_path / "data.csv", lines)
    msg = error(load_dataset, "csv", path)
    assert str(path) in msg and expected in msg


def test_csv_parser_error_names_the_line(tmp_path):
    write_image(tmp_path / "a.jpg")
    path = write_csv(tmp_path / "d.csv", ["path,label,split", "a.jpg,x,train", "a" * 200_000 + ",x,test"])
    assert f"csv dataset {path} line 3: field larger than field limit" in error(load_dataset, "csv", path)


def test_csv_root_must_be_a_file(tmp_path):
    assert "pass the CSV file itself" in error(load_dataset, "csv", tmp_path)
    assert "no root given" in error(load_dataset, "csv", "")


# -- torchvision's flat ImageFolder layout and class-name files (issue 25) ---------------------------------------------
def test_flat_folder_needs_a_test_fraction_and_splits_reproducibly(tmp_path):
    root = tmp_path / "flat"
    make_class_tree(root, {"cat": 10, "dog": 5, "red_fox": 3})
    message = error(load_dataset, "folder", root)
    assert f"{root} is laid out as {root}/<class>/<images> (3 class folders: cat, dog, red_fox)" in message
    assert "--test-fraction 0.2" in message and f"{root}/train/<class>/<images>" in message
    d = load_dataset("folder", root, 0.2)
    assert d.classnames == ["cat", "dog", "red fox"] and d.held_out["test_fraction"] == 0.2
    per_class = {y: (sum(i.label == y for i in d.train), sum(i.label == y for i in d.test)) for y in range(3)}
    assert per_class == {0: (8, 2), 1: (4, 1), 2: (2, 1)}  # round(0.2 n), at least 1, never the whole class
    assert not {i.path for i in d.train} & {i.path for i in d.test}
    again = load_dataset("folder", str(root), 0.2)  # the same files on every call, machine and seed
    assert again.train == d.train and again.test == d.test
    # a class's held-out images depend on that class only: adding a class moves nothing else
    make_class_tree(root, {"emu": 4})
    more = load_dataset("folder", root, 0.2)
    assert [i for i in more.test if i.label < 2] == [i for i in d.test if i.label < 2]
    # train/ without test/ is held out the same way; train/ with test/ refuses the option
    make_class_tree(tmp_path / "t" / "train", {"a": 4, "b": 4})
    assert f"{tmp_path / 't' / 'test'} is missing" in error(load_dataset, "folder", tmp_path / "t")
    assert len(load_dataset("folder", tmp_path / "t", 0.5).test) == 4
    make_class_tree(tmp_path / "t" / "test", {"a": 1, "b": 1})
    assert "drop --test-fraction" in error(load_dataset, "folder", tmp_path / "t", 0.5)
    assert "dataset dtd has its own test split" in error(load_dataset, "dtd", tmp_path, 0.5)
    assert f"pass --root {tmp_path / 't'}" in error(load_dataset, "folder", tmp_path, 0.5)  # the folder above
    make_class_tree(tmp_path / "one", {"a": 3, "b": 1})
    assert "has 1 image: holding out a test set needs at least 2" in error(load_dataset, "folder", tmp_path / "one",
                                                                          0.3)
    # a flat folder whose classes include "train" (vehicles): train/ holds images, not class folders
    make_class_tree(tmp_path / "vehicles", {"bus": 3, "car": 3, "train": 3})
    assert load_dataset("folder", tmp_path / "vehicles", 0.4).classnames == ["bus", "car", "train"]


@pytest.mark.parametrize("text, names", [
    ("Persian cat\nGolden retriever\n\nred fox\n", ["Persian cat", "Golden retriever", "red fox"]),  # sorted order
    ("red_fox a red fox\ncat a cat\ndog a dog\n", ["a cat", "a dog", "a red fox"]),  # CoOp's "<folder> <name>"
])
def test_classnames_file(tmp_path, text, names):
    root = tmp_path / "d"
    make_class_tree(root / "train", {"cat": 1, "dog": 1, "red_fox": 1})
    make_class_tree(root / "test", {"cat": 1, "dog": 1, "red_fox": 1})
    (root / "classnames.txt").write_text(text)
    assert load_dataset("folder", root).classnames == names
    # saved by a Windows editor: a byte order mark first is no part of the first name (nor of the JSON)
    (root / "classnames.txt").write_bytes(b"\xef\xbb\xbf" + text.replace("\n", "\r\n").encode())
    assert load_dataset("folder", root).classnames == names
    (root / "classnames.txt").unlink()
    (root / "classnames.json").write_bytes(b"\xef\xbb\xbf" + json.dumps({"cat": "tabby", "dog": "pug",
                                                                         "red_fox": "fox"}).encode())
    assert load_dataset("folder", root).classnames == ["tabby", "pug", "fox"]
    (root / "classnames.json").write_text(json.dumps({"cat": "tabby", "dog": "pug"}))
    assert "has no name for class folder 'red_fox'" in error(load_dataset, "folder", root)
    (root / "classnames.json").unlink()
    (root / "classnames.txt").write_text("one\ntwo\n")
    assert "has 2 names for 3 class folders" in error(load_dataset, "folder", root)
