"""Published K-shot splits (cross-modal adaptation's index files, JSON lines) read onto a dataset's items, hashed
as blocklora's own split files; a mismatch is one error naming the first bad entry; pickles are refused."""

from __future__ import annotations

import hashlib
import json
import pickle

import pytest

from blocklora.cli.main import main
from blocklora.data import load_dataset, read_split_file, read_split_header
from blocklora.errors import DataError
from data_trees import make_zhou


@pytest.fixture
def dtd(tmp_path):
    make_zhou(tmp_path / "data", "dtd")
    return load_dataset("dtd", str(tmp_path / "data")), tmp_path / "data"


def _cma(data, shots: int = 1) -> dict:
    """cross_modal_adaptation's layout: impath under its own ./data/<dataset>/ prefix, indices into its train list."""
    def part(items):
        picked = []
        for y in range(len(data.classnames)):
            picked += [i for i in items if i.label == y][:shots]
        rel = lambda i: "./data/dtd/" + str(i.path).split("/dtd/", 1)[1]  # noqa: E731
        return {"data": [{"impath": rel(i), "label": i.label, "classname": data.classnames[i.label]} for i in picked],
                "indices": [items.index(i) for i in picked]}
    return {"train": part(data.train), "val": part(data.val)}


def test_cross_modal_adaptation_index_file(dtd, tmp_path):
    data, _ = dtd
    path = tmp_path / "shot_1-seed_3.json"
    path.write_text(json.dumps(_cma(data), indent=4))
    head = read_split_header(path)
    assert head["published"] == "cross-modal-adaptation" and head["shots"] == 1 and head["seed"] == 3
    split, sha = read_split_file(path, data)
    assert sha == hashlib.sha256(path.read_bytes()).hexdigest()
    assert [i.label for i in split.train] == list(range(len(data.classnames)))
    assert all(i in data.train for i in split.train) and all(i in data.val for i in split.val)


def test_json_lines_and_first_mismatch(dtd, tmp_path):
    data, root = dtd
    lines = [json.dumps({"image": str(i.path).split("/dtd/", 1)[1], "label": i.label}) for i in data.train[:6]]
    path = tmp_path / "split.jsonl"
    path.write_text("\n".join(lines) + "\n")
    split, _ = read_split_file(path, data)
    assert split.train == data.train[:6] and split.shots == max(
        sum(i.label == y for i in data.train[:6]) for y in range(len(data.classnames)))
    bad = json.loads(lines[2]) | {"label": (data.train[2].label + 1) % len(data.classnames)}
    path.write_text("\n".join([*lines[:2], json.dumps(bad), *lines[3:]]) + "\n")
    with pytest.raises(DataError, match=r"line 3 .*labelled .* but the dataset labels it"):
        read_split_file(path, data)
    path.write_text(json.dumps({"impath": "elsewhere/none.jpg", "label": 0}) + "\n")
    with pytest.raises(DataError, match=r"line 1 .*no image of the dataset has this path"):
        read_split_file(path, data)
    renamed = _cma(data)
    renamed["train"]["data"][1]["classname"] = "not-a-texture"
    path = tmp_path / "shot_1-seed_1.json"
    path.write_text(json.dumps(renamed))
    with pytest.raises(DataError, match=r"train.data\[1\] .*'not-a-texture' there"):
        read_split_file(path, data)


def test_pickle_is_refused_and_a_run_trains_on_a_published_split(dtd, tmp_path, capsys):
    data, root = dtd
    pkl = tmp_path / "shot_1-seed_1.pkl"
    pkl.write_bytes(pickle.dumps({"train": [], "val": []}))
    with pytest.raises(DataError, match="never reads pickles"):
        read_split_header(pkl)
    path = tmp_path / "shot_1-seed_2.json"
    path.write_text(json.dumps(_cma(data)))
    out = tmp_path / "run"
    argv = ["train", "--model", "tiny-clip", "--pretrained", "none", "--root", str(root), "--split-file", str(path),
            "--iters", "2", "--batch-size", "4", "--workers", "0", "--no-zero-shot", "--output", str(out)]
    assert main(argv) == 2
    assert "does not name its dataset: pass --dataset" in capsys.readouterr().err
    assert main([*argv, "--dataset", "dtd"]) == 0, capsys.readouterr().err
    results = json.loads((out / "results.json").read_text())
    assert results["shots"] == 1 and results["seed"] == 2
    assert results["split_sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert (out / "split.json").read_bytes() == path.read_bytes()  # kept verbatim: the run can be repeated from it
