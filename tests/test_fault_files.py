"""Faults around the files blocklora writes and reads (docs/reliability.md): two commands given one output, links
and nesting, one image under two names, strip-shaped bombs, checks that would come after clearing, absurd values,
file names that are not UTF-8. Driven through the CLI (in process, and as real processes for the race) and the
objects under it; every refusal is one `error:` line, and what was there is compared before and after."""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

import blocklora.pipeline.run as api
from blocklora.cli.main import main
from blocklora.data import load_dataset
from blocklora.engine.rundir import RunDir
from blocklora.errors import BlockLoRAError, DataError
from blocklora.ownership import Protected, rename_noreplace
from gen_data import make_folder_dataset
from test_fault_matrix import cli, refused, snapshot, train_args

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_folder_dataset(tmp_path_factory.mktemp("files") / "d", n_classes=3, train_per_class=4,
                               test_per_class=2)


@pytest.fixture(scope="module")
def run(data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("files-run") / "run"
    assert main([str(a) for a in train_args(data, out)]) == 0
    return out


def copy_run(run: Path, tmp_path: Path) -> Path:
    mine = tmp_path / "run"
    shutil.copytree(run, mine)
    return mine


# -- kind 1: two commands, one output ---------------------------------------------------------------------------------
def test_a_run_that_finds_its_new_output_taken_meanwhile_refuses_naming_the_other(capsys, data, tmp_path,
                                                                                 monkeypatch):
    """Run B checks the free path, then (inside prepare, where real runs spend seconds) run A creates, fills and
    finishes it: B refuses on one line naming A's process, and A's results stay."""
    other = make_folder_dataset(tmp_path / "other", n_classes=3, train_per_class=4, test_per_class=2)
    out = tmp_path / "out"
    real = api.prepare

    def prepare_while_a_finishes(*args, **kwargs):
        prepared = real(*args, **kwargs)
        monkeypatch.setattr(api, "prepare", real)
        assert main([str(a) for a in train_args(other, out)]) == 0  # run A, start to finish
        return prepared

    monkeypatch.setattr(api, "prepare", prepare_while_a_finishes)
    refused(capsys, train_args(data, out), "was created by another blocklora command", f"pid {os.getpid()}",
            "choose another --output")
    assert json.loads((out / "results.json").read_text())["dataset"]["name"] == "other"


def test_two_runs_started_together_one_wins_whatever_the_timing(data, tmp_path):
    """A real race: two processes, the same new --output, started at once. One completes; the other refuses on one
    line (the path already exists, is being written, or was created after its check), and the folder holds the
    winner's run."""
    other = make_folder_dataset(tmp_path / "other", n_classes=3, train_per_class=4, test_per_class=2)
    out = tmp_path / "out"
    procs = [subprocess.Popen([sys.executable, "-m", "blocklora", *map(str, train_args(root, out))], env=ENV,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
             for root in (data, other)]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    codes = sorted(code for code, _ in results)
    assert codes[0] == 0 and codes[1] != 0, results
    winner = [root for root, (code, _) in zip((data, other), results) if code == 0][0]
    loser_err = next(err for code, err in results if code != 0)
    errors = [line for line in loser_err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in loser_err, loser_err
    assert any(s in errors[0] for s in ("already exists", "another blocklora run is writing",
                                        "created by another blocklora command")), errors[0]
    assert json.loads((out / "results.json").read_text())["dataset"]["name"] == winner.name


def test_a_folder_that_changed_after_the_check_is_refused(tmp_path):
    """--overwrite decided on one state; another command wrote the folder before the lock was taken: refused,
    naming that command (it recorded itself in .lock), and nothing is cleared."""
    rd = RunDir(tmp_path / "run")
    rd.create()
    rd.results.write_text('{"old": true}')
    assert rd.open_for(True, False, [Protected("the dataset root", tmp_path / "data")]) == "overwrite"
    with RunDir(rd.path).lock():  # another command: takes the lock, records itself, writes its results
        rd.results.write_text('{"theirs": true}')
    with pytest.raises(BlockLoRAError, match=rf"changed after this command checked it: .*pid {os.getpid()}"), \
            rd.session(True, "overwrite"):
        pytest.fail("the session must not start")
    assert json.loads(rd.results.read_text()) == {"theirs": True}


def test_rename_noreplace_never_replaces(tmp_path, monkeypatch):
    import blocklora.ownership as ownership

    for native in (True, False):  # renameat2, and the link / rename fallback
        if not native:
            monkeypatch.setattr(ownership, "_renameat2", lambda src, dst: False)
        d = tmp_path / str(native)
        d.mkdir()
        (d / "new").write_text("new")
        (d / "taken").write_text("theirs")
        with pytest.raises(FileExistsError):
            rename_noreplace(d / "new", d / "taken")
        assert (d / "taken").read_text() == "theirs" and (d / "new").exists()
        (d / "newdir").mkdir()
        (d / "takendir").mkdir()
        with pytest.raises(FileExistsError):
            rename_noreplace(d / "newdir", d / "takendir")  # os.rename would replace an empty folder
        rename_noreplace(d / "new", d / "free")
        assert (d / "free").read_text() == "new" and not (d / "new").exists()


def test_an_export_never_replaces_one_written_meanwhile(capsys, run, tmp_path, monkeypatch):
    """Export B checks the free path; while it loads, export A writes the same file: B refuses and A's file stays.
    And an export started while another live one writes the same path refuses at once, naming its process."""
    import blocklora.pipeline.trained as trained

    target = tmp_path / "m.safetensors"
    real = trained.load_trained

    def load_while_a_exports(*args, **kwargs):
        monkeypatch.setattr(trained, "load_trained", real)
        assert main(["export", "--adapter", str(run), "--output", str(target)]) == 0
        return real(*args, **kwargs)

    monkeypatch.setattr(trained, "load_trained", load_while_a_exports)
    refused(capsys, ["export", "--adapter", run, "--output", target], "was written by another command while this "
            "one ran", "nothing was replaced")
    first = target.read_bytes()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary left
    # a live process's temporary folder for the same name, made earlier: that export is under way
    holder = tmp_path / f".n.safetensors.blocklora-{os.getppid()}-1-x.tmp"
    holder.mkdir()
    refused(capsys, ["export", "--adapter", run, "--output", tmp_path / "n.safetensors"],
            f"another blocklora command (pid {os.getppid()}) is writing")
    assert not (tmp_path / "n.safetensors").exists() and target.read_bytes() == first


# -- kind 2: links and nesting ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["train.log", "metrics.jsonl", "results.json", "tensorboard", "adapter", ".lock"])
def test_overwrite_refuses_a_link_under_a_run_name_before_touching_anything(capsys, data, run, tmp_path, name):
    mine = copy_run(run, tmp_path)
    victim = tmp_path / "victim"
    shutil.copytree(data / "train" / "red_apple", victim)
    link = mine / name
    if link.is_dir():
        shutil.rmtree(link)
    else:
        link.unlink(missing_ok=True)
    link.symlink_to(victim if name in ("tensorboard", "adapter") else victim / "000.png")
    before, victim_before = snapshot(mine), snapshot(victim)
    refused(capsys, train_args(data, mine, "--overwrite", "--log", "tensorboard"), f"{link} is a symbolic link",
            "never writes through a link")
    assert snapshot(mine) == before and snapshot(victim) == victim_before


@pytest.mark.parametrize("output", ["DATA/val/run1", "DATA/train/red_apple/run", "LINK/test/run"])
def test_a_new_output_inside_the_dataset_is_refused(capsys, data, tmp_path, output):
    root = tmp_path / "d"
    shutil.copytree(data, root)
    (tmp_path / "link").symlink_to(root)  # the same folder by another name
    out = Path(output.replace("DATA", str(root)).replace("LINK", str(tmp_path / "link")))
    before = snapshot(root)
    refused(capsys, train_args(root, out), "refusing to create", "inside the dataset root")
    assert snapshot(root) == before and not out.exists() and not (root / "val").exists()


def test_one_image_by_two_names_is_refused_across_splits_and_labels_and_read_once_within(caplog, data, tmp_path):
    leak = tmp_path / "leak"
    shutil.copytree(data, leak)
    shutil.rmtree(leak / "test" / "red_apple")
    (leak / "test" / "red_apple").symlink_to("../train/red_apple")  # the test images are the training images
    with pytest.raises(DataError, match=r"same file .* in train and in test \(an image in two splits leaks"):
        load_dataset("folder", leak)
    labels = tmp_path / "labels"
    shutil.copytree(data, labels)
    for split in ("train", "test"):
        shutil.rmtree(labels / split / "blue_sky")
        (labels / split / "blue_sky").symlink_to("red_apple")
    with pytest.raises(DataError, match=r"labelled 'blue sky' and 'red apple'"):
        load_dataset("folder", labels)
    alias = tmp_path / "alias"
    shutil.copytree(data, alias)
    (alias / "train" / "red_apple" / "zz.png").symlink_to("000.png")  # one class, one split: read once
    assert len(load_dataset("folder", alias).train) == len(load_dataset("folder", data).train) == 12
    assert any("1 image(s) reached by a second name" in r.message for r in caplog.records)


@pytest.mark.parametrize(("row", "needle"), [
    ("test/red_apple/alias.png,red_apple,test", None),  # read once, with a warning
    ("test/red_apple/alias.png,red_apple,train", "in two splits"),
    ("test/red_apple/alias.png,green_leaf,test", "labels it 'green_leaf'"),
])
def test_csv_rows_naming_one_image_by_two_names(caplog, data, tmp_path, row, needle):
    root = tmp_path / "d"
    shutil.copytree(data, root)
    (root / "test" / "red_apple" / "alias.png").symlink_to("000.png")
    lines = ["path,label,split"] + [f"{p.relative_to(root)},{p.parent.name},{p.parent.parent.name}"
                                    for p in sorted(root.rglob("0*.png"))]
    csv = root / "data.csv"
    csv.write_text("\n".join([*lines, row]) + "\n")
    if needle:
        with pytest.raises(DataError) as e:
            load_dataset("csv", csv)
        assert needle in str(e.value) and "the same file by another name" in str(e.value), e.value
        return
    assert len(load_dataset("csv", csv).test) == 6
    assert any("1 repeated row(s) read once" in r.message for r in caplog.records)


def test_a_split_file_entry_naming_a_link_is_that_image(data, run, tmp_path):
    """A split file's entry that names a dataset image by another name is that image: its label is checked (and a
    test image stays a test image), not trusted as an image outside the dataset."""
    from blocklora.data import read_split_file

    root = tmp_path / "d"
    shutil.copytree(data, root)
    (tmp_path / "elsewhere.png").symlink_to(root / "train" / "red_apple" / "000.png")
    split = json.loads((run / "split.json").read_text())
    split["train"][0] = [str(tmp_path / "elsewhere.png"), 0]  # red_apple is label 2
    (tmp_path / "split.json").write_text(json.dumps(split))
    with pytest.raises(DataError, match="labelled 0, but the dataset labels it 2"):
        read_split_file(tmp_path / "split.json", load_dataset("folder", root))


# -- kind 4: resources ------------------------------------------------------------------------------------------------
def test_strip_images_are_refused_by_name_like_the_other_bombs(capsys, data, run, tmp_path):
    from blocklora.data.decode import header_problem, open_image_file
    from blocklora.data.images import read_image

    strip = tmp_path / "strip.png"
    Image.new("RGB", (2_000_000, 1), (200, 10, 10)).save(strip)  # 2 MP, 6 KB: under PIL's pixel limit
    assert strip.stat().st_size < 20_000
    assert "aspect ratio of 2000000:1" in header_problem(str(strip))
    with pytest.raises(DataError, match=r"strip\.png: 2000000x1 pixels: an aspect ratio"):
        open_image_file(str(strip))
    with pytest.raises(DataError, match="aspect ratio of 300:1"):  # a custom reader's images too
        read_image(lambda p: Image.new("RGB", (3, 900)), "held-in-memory")
    assert header_problem(str(data / "test" / "red_apple" / "000.png")) is None
    good = data / "test" / "red_apple" / "000.png"
    capsys.readouterr()
    code = main(["predict", "--adapter", str(run), "--jsonl", str(strip), str(good)])
    out, err = capsys.readouterr()
    assert code == 2 and "Traceback" not in err and "strip.png" in err.splitlines()[-1], err
    assert [json.loads(line)["image"] for line in out.splitlines()] == [str(good)]  # the good image's row
    root = tmp_path / "d"
    shutil.copytree(data, root)
    shutil.copy(strip, root / "test" / "red_apple" / "strip.png")
    eval_args = ["eval", "--adapter", run, "--dataset", "folder", "--root", root, "--workers", "0"]
    refused(capsys, eval_args, "strip.png", "aspect ratio", "--skip-bad-images")
    code, err = cli(capsys, *eval_args, "--skip-bad-images", "--json")
    assert code == 0 and "Traceback" not in err


# -- kind 5: checks before clearing; nothing left by a failed start ----------------------------------------------------
@pytest.mark.parametrize(("extra", "needle"), [
    (["--lr", "1e308"], "train.lr must be a finite number > 0 and <= 10"),
    (["--lr", "11"], "train.lr"),
    (["--alpha", "1e308"], "adapter.alpha must be a finite number > 0 and <= 10000"),
    (["train.weight_decay=1e308"], "AdamW's decay step"),
    (["--lr", "2", "train.weight_decay=0.5"], "times train.lr (2) is >= 1"),
])
def test_absurd_finite_values_are_refused_before_the_run_directory_exists(capsys, data, tmp_path, extra, needle):
    out = tmp_path / "run"
    refused(capsys, train_args(data, out, *extra), needle)
    assert not out.exists()


def test_overwrite_refuses_a_user_file_where_the_run_writes_before_clearing(capsys, data, run, tmp_path):
    mine = copy_run(run, tmp_path)
    (mine / "tensorboard").write_text("my notes")  # where --log tensorboard writes its folder
    before = snapshot(mine)
    refused(capsys, train_args(data, mine, "--overwrite", "--log", "tensorboard"), f"{mine / 'tensorboard'} is a "
            "file, where this run writes its tensorboard folder")
    assert snapshot(mine) == before
    assert cli(capsys, *train_args(data, mine, "--overwrite"))[0] == 0  # a run that does not write there: kept
    assert (mine / "tensorboard").read_text() == "my notes" and (mine / "results.json").exists()


def test_a_run_failing_before_its_first_checkpoint_leaves_nothing_and_overwrite_puts_the_old_run_back(
        capsys, monkeypatch, data, run, tmp_path):
    from blocklora.engine import stream

    real = stream.AugmentedImages.__getitem__
    monkeypatch.setattr(stream.AugmentedImages, "__getitem__", lambda s, k: (real(s, k)[0] * float("nan"),
                                                                           real(s, k)[1]))
    new = tmp_path / "new"
    refused(capsys, train_args(data, new), "the loss became nan at step 1", "no checkpoint had been written yet")
    assert not new.exists()
    mine = copy_run(run, tmp_path)
    (mine / "notes.txt").write_text("mine")
    before = {k: v for k, v in snapshot(mine).items() if k != ".lock"}  # the lock records its last holder
    refused(capsys, train_args(data, mine, "--overwrite", "--seed", "3"), "the loss became nan")
    # the finished run is back, byte for byte, and nothing of the failed one
    assert {k: v for k, v in snapshot(mine).items() if k != ".lock"} == before
    assert sorted(p.name for p in mine.iterdir() if p.name.startswith(".")) == [".blocklora", ".lock"]


# -- kind 6: outputs --------------------------------------------------------------------------------------------------
def test_predict_json_of_a_file_name_that_is_not_utf8(capsys, data, run, tmp_path):
    raw = os.fsencode(tmp_path) + b"/caf\xe9.png"
    with open(raw, "wb") as fh:
        fh.write((data / "test" / "red_apple" / "000.png").read_bytes())
    name = os.fsdecode(raw)
    for flag in ("--jsonl", "--json"):
        capsys.readouterr()
        assert main(["predict", "--adapter", str(run), flag, name]) == 0
        text = capsys.readouterr().out
        text.encode("utf-8")  # no lone surrogate: any UTF-8 reader takes it
        rows = [json.loads(line) for line in text.splitlines()] if flag == "--jsonl" else json.loads(text)
        assert rows[0]["image"] == f"{tmp_path}/caf\\xe9.png"
        assert base64.b64decode(rows[0]["image_bytes_base64"]) == raw  # the exact name, for opening the file
        assert rows[0]["top"][0]["class"] in ("red apple", "green leaf", "blue sky")


def test_a_run_folder_whose_name_is_not_utf8_writes_valid_utf8(capsys, data, tmp_path):
    """results.json, config.json and train.log name the folder with \\xNN escapes: every file stays valid UTF-8, and
    the log has no "Logging error" traceback."""
    raw = os.fsencode(tmp_path) + b"/caf\xe9"
    code, err = cli(capsys, *train_args(data, os.fsdecode(raw)))
    assert code == 0 and "Traceback" not in err and "Logging error" not in err, err
    for name in (b"results.json", b"config.json", b"split.json", b"train.log", b".lock"):
        with open(raw + b"/" + name, "rb") as fh:
            fh.read().decode("utf-8")
    with open(raw + b"/results.json", "rb") as fh:
        assert json.load(fh)["split_file"] == f"{tmp_path}/caf\\xe9/split.json"
