"""K-shot sampling against explicit re-implementations of the peers' code, and split files."""

from __future__ import annotations

import json
import os
import random
from collections import defaultdict
from pathlib import Path

import pytest

from blocklora.data import (
    DatasetSplits,
    FewShotSplit,
    Item,
    file_sha256,
    load_dataset,
    read_split_file,
    sample_few_shot,
    write_split_file,
)
from blocklora.errors import ConfigError, DataError
from data_trees import make_zhou, write_image


# -- the peers' algorithms, written out with the global `random` module ----------------------------------------------
def dassl_generate_fewshot_dataset(data_source, num_shots):
    """Dassl DatasetBase.generate_fewshot_dataset(..., repeat=True) + split_dataset_by_label (CLIP-LoRA copies it)."""
    tracker = defaultdict(list)
    for item in data_source:
        tracker[item.label].append(item)
    dataset = []
    for _label, items in tracker.items():
        if len(items) >= num_shots:
            sampled_items = random.sample(items, num_shots)
        else:
            sampled_items = random.choices(items, k=num_shots)
        dataset.extend(sampled_items)
    return dataset


def clip_lora_reference(train, val, num_shots, seed):
    """CLIP-LoRA: set_random_seed(seed); datasets/<name>.py draws val (min(K, 4)) first, then train."""
    random.seed(seed)
    val = dassl_generate_fewshot_dataset(val, num_shots=min(num_shots, 4))
    train = dassl_generate_fewshot_dataset(train, num_shots=num_shots)
    return train, val


def clip_lora_imagenet_reference(train, num_shots, seed):
    """CLIP-LoRA datasets/imagenet.py: per label (ImageFolder order) sample K + min(K, 4), split train / val."""
    random.seed(seed)
    num_shots_val = min(4, num_shots)
    split_by_label_dict = defaultdict(list)
    for item in train:
        split_by_label_dict[item.label].append(item)
    imgs, imgs_val = [], []
    for _label, items in split_by_label_dict.items():
        samples = random.sample(items, num_shots + num_shots_val)
        imgs = imgs + samples[0:num_shots]
        imgs_val = imgs_val + samples[num_shots:num_shots + num_shots_val]
    return imgs, imgs_val


def coop_reference(train, val, num_shots, seed):
    """CoOp: Dassl set_random_seed(cfg.SEED); datasets/<name>.py draws train, then val with min(K, 4)."""
    random.seed(seed)
    train = dassl_generate_fewshot_dataset(train, num_shots=num_shots)
    val = dassl_generate_fewshot_dataset(val, num_shots=min(num_shots, 4))
    return train, val


def synthetic(val: bool = True) -> DatasetSplits:
    """5 classes, labels first appearing out of order and interleaved; class 3 has only 2 train and 1 val items."""
    sizes = {4: 9, 0: 7, 2: 12, 3: 2, 1: 20}
    train = []
    for j in range(max(sizes.values())):
        for label, n in sizes.items():
            if j < n:
                train.append(Item(f"/d/train/{label}/{j}.jpg", label))
    vals = [Item(f"/d/val/{y}/{j}.jpg", y) for j in range(5) for y in (2, 0, 1, 4) + ((3,) if j == 0 else ())]
    return DatasetSplits("synthetic", Path("/d"), [f"class{i}" for i in range(5)], train, vals if val else [], [])


@pytest.mark.parametrize("shots", [1, 2, 4, 8, 16])
@pytest.mark.parametrize("seed", [1, 2, 3])
@pytest.mark.parametrize("order", ["clip-lora", "coop"])
def test_sampling_order_matches_reference(order, shots, seed):
    d = synthetic()
    got = sample_few_shot(d, shots, seed, order)
    reference = clip_lora_reference if order == "clip-lora" else coop_reference
    train, val = reference(d.train, d.val, shots, seed)
    assert got.train == train and got.val == val
    assert (got.dataset, got.shots, got.seed, got.sampler, got.replace) == ("synthetic", shots, seed, order, True)


@pytest.mark.parametrize("shots", [1, 2, 4])
def test_clip_lora_without_val_matches_its_imagenet_code(shots):
    d = synthetic(val=False)
    d.train = [i for i in d.train if i.label != 3]  # CLIP-LoRA's ImageNet code needs K + min(K, 4) per class
    d.classnames = d.classnames[:3] + ["x"] + d.classnames[4:]
    d.train += [Item(f"/d/extra/3/{j}.jpg", 3) for j in range(8)] + [Item("/d/extra/0/7.jpg", 0)]
    got = sample_few_shot(d, shots, 1, "clip-lora")
    train, val = clip_lora_imagenet_reference(d.train, shots, 1)
    assert got.train == train and got.val == val
    assert len(got.train) == 5 * shots and len(got.val) == 5 * min(shots, 4)
    coop = sample_few_shot(d, shots, 1, "coop")  # CoOp's ImageNet: train only (its val is the test set)
    assert coop.val == [] and coop.train == coop_reference(d.train, [], shots, 1)[0]
    # 16 shots + 4 val shots need 20 images; the first group (class 4) has 9: no val shots are set aside, and the
    # training draw is the plain one (CLIP-LoRA's ImageNet code would crash here: no peer draw to reproduce)
    with pytest.raises(DataError, match=r"class 4 \('class4'\) in train has 9 images, fewer than the 16"):
        sample_few_shot(d, 16, 1, "clip-lora", replace=False)
    drawn = sample_few_shot(d, 16, 1, "clip-lora")  # with replacement, like the other branch
    assert len(drawn.train) == 5 * 16 and drawn.val == []
    assert drawn.train == coop_reference(d.train, [], 16, 1)[0]


@pytest.mark.parametrize("sampler", ["clip-lora", "coop"])
@pytest.mark.parametrize("shots", [3, 4, 5])
def test_val_shots_never_take_training_images(sampler, shots):
    """Issue 25: 5 images per class and no val split; K <= 5 shots are K distinct images in every class (the unused
    validation shots used to come first, leaving 2-4 distinct images and repeats), for both samplers."""
    train = [Item(f"/d/train/{y}/{j}.jpg", y) for y in range(4) for j in range(5)]
    d = DatasetSplits("mine", Path("/d"), [f"c{y}" for y in range(4)], train, [], [])
    for seed in (1, 2, 3):
        got = sample_few_shot(d, shots, seed, sampler, replace=False)  # no class short of K: no error either
        assert got.val == []
        for y in range(4):
            drawn = [i.path for i in got.train if i.label == y]
            assert len(drawn) == len(set(drawn)) == shots


def test_orders_differ_and_short_classes_use_choices():
    d = synthetic()
    a, b = sample_few_shot(d, 4, 1, "clip-lora"), sample_few_shot(d, 4, 1, "coop")
    assert a.train != b.train
    short = [i for i in a.train if i.label == 3]  # 2 images, 4 shots: drawn with replacement
    assert len(short) == 4 and len(set(short)) <= 2
    with pytest.raises(DataError, match=r"class 3 \('class3'\) in train has 2 images, fewer than the 4"):
        sample_few_shot(d, 4, 1, "clip-lora", replace=False)
    # a val class short of min(K, 4) is never refused (nothing trains or selects on val): it gives the images it
    # has, as Dassl's repeat=False does, and the training draw is untouched
    strict = sample_few_shot(d, 2, 1, "clip-lora", replace=False)
    assert [i.path for i in strict.val if i.label == 3] == ["/d/val/3/0.jpg"]
    assert len(strict.train) == 5 * 2
    with pytest.raises(DataError, match=r"class 3 \('class3'\) in train has 2 images, fewer than the 4"):
        sample_few_shot(d, 4, 1, "coop", replace=False)
    assert len(sample_few_shot(d, 1, 1, "coop", replace=False).train) == 5


def test_seeds_and_global_state():
    d = synthetic()
    state = random.getstate()
    first = sample_few_shot(d, 4, 7)
    assert random.getstate() == state  # a private generator: the caller's random stream is untouched
    assert sample_few_shot(d, 4, 7) == first
    assert sample_few_shot(d, 4, 8).train != first.train


def test_sampler_errors():
    d = synthetic()
    with pytest.raises(ConfigError):
        sample_few_shot(d, 0, 1)
    with pytest.raises(ConfigError, match="unknown sampler"):
        sample_few_shot(d, 1, 1, "random")
    with pytest.raises(DataError, match="no training images"):
        sample_few_shot(DatasetSplits("t", Path("/"), ["a"], [], [], [Item("/x.jpg", 0)]), 1, 1)
    d.classnames.append("lonely")
    with pytest.raises(DataError, match=r"class 5 \('lonely'\) in train has no training images"):
        sample_few_shot(d, 1, 1)


# -- split files -----------------------------------------------------------------------------------------------------
@pytest.fixture
def pets(tmp_path) -> DatasetSplits:
    make_zhou(tmp_path / "data", "oxford_pets")
    return load_dataset("oxford_pets", tmp_path / "data")


def test_split_file_round_trip_and_determinism(tmp_path, pets):
    fs = sample_few_shot(pets, 2, 1)
    sha = write_split_file(tmp_path / "out" / "split.json", pets, fs)
    assert sha == file_sha256(tmp_path / "out" / "split.json")
    assert os.listdir(tmp_path / "out") == ["split.json"]  # no temporary file left behind
    data = json.loads((tmp_path / "out" / "split.json").read_text())
    assert data["dataset"] == "oxford_pets" and data["classnames"] == pets.classnames
    assert (data["shots"], data["seed"], data["order"]) == (2, 1, "clip-lora")
    assert data["train"][0][0].startswith("images/")  # relative to the dataset folder
    back, sha2 = read_split_file(tmp_path / "out" / "split.json", pets)
    assert sha2 == sha and back == fs
    # same seed -> byte-identical file; another seed -> another file
    again = write_split_file(tmp_path / "again.json", pets, sample_few_shot(pets, 2, 1))
    assert again == sha and (tmp_path / "again.json").read_bytes() == (tmp_path / "out" / "split.json").read_bytes()
    assert write_split_file(tmp_path / "other.json", pets, sample_few_shot(pets, 2, 2)) != sha


def test_split_file_survives_moving_the_dataset(tmp_path, pets):
    sha = write_split_file(tmp_path / "split.json", pets, sample_few_shot(pets, 1, 3, "coop"))
    (tmp_path / "data").rename(tmp_path / "moved")
    moved = load_dataset("oxford_pets", tmp_path / "moved")
    fs, sha2 = read_split_file(tmp_path / "split.json", moved)
    assert sha2 == sha and all(p.path.startswith(str(tmp_path / "moved")) for p in fs.train)


def test_split_file_array_keys_and_outside_paths(tmp_path):
    d = DatasetSplits("arrays", tmp_path, ["a", "b"], [Item("train/0", 0), Item("train/1", 1)])
    d.image_reader = lambda key: None  # an in-memory dataset: keys, not files
    fs = sample_few_shot(d, 1, 1)
    write_split_file(tmp_path / "s.json", d, fs)
    assert json.loads((tmp_path / "s.json").read_text())["train"] == [["train/0", 0], ["train/1", 1]]
    assert read_split_file(tmp_path / "s.json", d)[0].train == fs.train
    outside = write_image(tmp_path.parent / f"{tmp_path.name}_outside.jpg")
    files = DatasetSplits("files", tmp_path / "root", ["a"], [Item(str(outside), 0)])
    write_split_file(tmp_path / "f.json", files, sample_few_shot(files, 1, 1))
    assert json.loads((tmp_path / "f.json").read_text())["train"] == [[str(outside), 0]]  # kept absolute
    assert read_split_file(tmp_path / "f.json", files)[0].train == [Item(str(outside), 0)]


def test_split_file_rejects_bad_files(tmp_path, pets):
    path = tmp_path / "split.json"

    def message(text: str | None = None, splits: DatasetSplits = pets) -> str:
        if text is not None:
            path.write_text(text)
        with pytest.raises(DataError) as e:
            read_split_file(path, splits)
        assert "\n" not in str(e.value) and str(path) in str(e.value)
        return str(e.value)

    assert "does not exist" in message()
    write_split_file(path, pets, sample_few_shot(pets, 2, 1))
    good = json.loads(path.read_text())
    assert "not valid JSON (line" in message(path.read_text()[:200])

    tampered = json.loads(json.dumps(good))
    tampered["train"][1][1] = (tampered["train"][1][1] + 1) % 3  # a relabelled image
    tampered["train"][3][0] = "images/nothere.jpg"
    tampered["val"][0][1] = 17
    msg = message(json.dumps(tampered))
    assert "3 bad entries, the first train[1]" in msg and "the dataset labels it" in msg

    tampered = json.loads(json.dumps(good))
    tampered["train"][0] = ["images/nothere.jpg", 0]
    assert "train[0]" in message(json.dumps(tampered)) and "no such image" in message(json.dumps(tampered))

    assert "not 'oxford_pets'" in message(json.dumps({**good, "dataset": "dtd"}))
    msg = message(json.dumps({**good, "classnames": good["classnames"][::-1]}))
    assert "class 0 is 'abbey' there but 'golden retriever' here" in msg
    assert '"seed"' in message(json.dumps({**good, "seed": "1"}))
    assert "not a blocklora split file" in message(json.dumps(good["train"]))


def test_fewshot_split_dataclass():
    fs = FewShotSplit("x", 1, 2, "coop", [Item("a", 0)])
    assert fs.val == [] and fs.replace is True
