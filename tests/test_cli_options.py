"""The CLI generated from the config: help on every option, one flag per concept, overrides anywhere, --config."""

from __future__ import annotations

import argparse
import json

import pytest

from blocklora.cli.flags import config_flags, run_config
from blocklora.cli.main import build_parser, main
from blocklora.config.run_config import RunConfig
from blocklora.errors import ConfigError
from gen_data import make_folder_dataset


def _subcommands() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(sub.choices)


def _parse(*argv: str) -> argparse.Namespace:
    return build_parser().parse_args(list(argv))


@pytest.mark.parametrize("command", sorted(_subcommands()))
def test_every_option_has_help_and_shows_its_default(command):
    p = _subcommands()[command]
    formatter = p.formatter_class(p.prog)
    for action in p._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        name = "/".join(action.option_strings) or action.dest
        assert action.help, f"{command} {name} has no help"
        text = formatter._get_help_string(action)
        assert "default" in text or "(required)" in text, f"{command} {name}: {text!r}"
    assert "%(default)" not in p.format_help()  # every placeholder was filled


def test_every_flagged_config_field_is_a_train_and_sweep_option():
    subs = _subcommands()
    train = {s for a in subs["train"]._actions for s in a.option_strings}
    sweep = {s for a in subs["sweep"]._actions for s in a.option_strings}
    for f in config_flags():
        assert f.flag in train, f.key
        if f.key not in ("data.dataset", "data.root", "data.shots", "data.seed", "data.split_file", "device"):
            assert f.flag in sweep, f.key  # the sweep sets those per cell


def test_the_same_concept_has_the_same_flag_everywhere():
    subs = _subcommands()
    for command in ("train", "eval", "zeroshot", "demo"):
        flags = {s for a in subs[command]._actions for s in a.option_strings}
        assert {"--limit", "--test-images"} <= flags, command  # --test-images: the demo's former name
    assert run_config(_parse("train", "--output", "o", "--test-images", "7")).eval.limit == 7
    assert _parse("demo", "--test-images", "7").limit == 7


def test_choices_come_from_the_config_literals():
    subs = _subcommands()
    choices = {s: a.choices for a in subs["train"]._actions for s in a.option_strings}
    assert choices["--sampler"] == ("clip-lora", "coop")
    assert choices["--precision"] == ("auto", "fp32", "fp16", "bf16")
    assert choices["--method"] == ("block_lora", "lora", "probe", "tip_adapter", "tip_adapter_f", "coop")


def test_key_value_overrides_anywhere_on_the_line():
    args = _parse("train", "--dataset", "folder", "eval.limit=4", "--output", "o", "train.iters=1", "--lr", "0.1",
                  "adapter.r=4")
    cfg = run_config(args)
    assert (cfg.eval.limit, cfg.train.iters, cfg.train.lr, cfg.adapter.r) == (4, 1, 0.1, 4)
    assert _parse("demo", "train.lr=1e-3", "--shots", "2", "train.flip=false").overrides == \
        ["train.lr=1e-3", "train.flip=false"]


def test_flags_and_overrides_apply_in_order_the_last_word_wins():
    cfg = run_config(_parse("train", "--output", "o", "--lr", "0.1", "train.lr=0.2"))
    assert cfg.train.lr == 0.2


def test_recipe_default_applies_to_new_runs_never_over_a_recorded_request(monkeypatch):
    """--recipe not given is None: a new run gets the default recipe, a resumed run's recorded request (the base
    with --resume) keeps the recipe it was started with; an explicit --recipe and the options still apply on top."""
    from blocklora.config import recipes

    monkeypatch.setitem(recipes.RECIPES, "reference", {"train.lr": 1e-5})  # a default recipe with values
    assert _parse("train", "--output", "o").recipe is None
    assert _parse("sweep", "--datasets", "dtd", "--root", "r", "--output", "o").recipe is None
    assert run_config(_parse("train", "--output", "o")).train.lr == 1e-5
    recorded = run_config(_parse("train", "--output", "o", "--recipe", "quick", "--seed", "3"))
    resumed = run_config(_parse("train", "--output", "o", "--resume"), recorded)
    assert resumed == recorded and resumed.train.lr == 4e-3 and resumed.data.seed == 3
    assert run_config(_parse("train", "--output", "o", "--resume", "--recipe", "reference"), recorded).train.lr == 1e-5
    assert run_config(_parse("train", "--output", "o", "--resume", "--lr", "0.1"), recorded).train.lr == 0.1


@pytest.mark.parametrize("argv", [["adapter.method=lora"], ["--method", "lora"]])
def test_method_lora_takes_its_own_n_blocks(argv):
    cfg = run_config(_parse("train", "--output", "o", *argv))
    assert (cfg.adapter.method, cfg.adapter.n_blocks) == ("lora", 1)


def test_method_lora_with_an_explicit_n_blocks_is_refused():
    with pytest.raises(ConfigError, match="n_blocks=1"):
        RunConfig().with_overrides(["adapter.method=lora", "adapter.n_blocks=8"])


def test_config_file_json_and_toml_round_trip(tmp_path, capsys):
    asked = RunConfig().with_overrides(["adapter.r=4", "train.lr=1e-3", "eval.datasets=dtd,caltech101",
                                        "train.betas=0.8,0.99", "data.shots=2"])
    path = tmp_path / "c.json"
    path.write_text(json.dumps(asked.to_dict()))
    assert RunConfig.from_file(path) == asked
    toml = tmp_path / "c.toml"
    toml.write_text('[adapter]\nr = 4\n[train]\nlr = 1e-3\nbetas = [0.8, 0.99]\n[data]\nshots = 2\n'
                    '[eval]\ndatasets = ["dtd", "caltech101"]\n')
    assert RunConfig.from_file(toml) == asked
    assert main(["config", "--config", str(toml), "train.lr=2e-3"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["train"]["lr"] == 2e-3 and printed["adapter"]["r"] == 4  # overrides apply on top
    toml.write_text("[adapter]\nrank = 4\n")
    with pytest.raises(ConfigError, match=r"c\.toml: unknown adapter option\(s\) rank"):
        RunConfig.from_file(toml)
    toml.write_text("[adapter\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        RunConfig.from_file(toml)


def test_a_runs_config_json_reproduces_it(tmp_path, capsys):
    root = make_folder_dataset(tmp_path / "data")
    out = tmp_path / "run"
    assert main(["train", "--model", "tiny-clip", "--pretrained", "none", "--dataset", "folder", "--root", str(root),
                 "--shots", "2", "--workers", "0", "--output", str(out), "train.iters=2", "eval.limit=8",
                 "--method", "lora"]) == 0
    saved = json.loads((out / "config.json").read_text())
    again = run_config(_parse("train", "--config", str(out / "config.json"), "--output", str(tmp_path / "again")))
    assert again.resolved().hash() == saved["config_hash"]
    assert main(["train", "--config", str(out / "config.json"), "--output", str(tmp_path / "again")]) == 0
    assert json.loads((tmp_path / "again" / "config.json").read_text())["config_hash"] == saved["config_hash"]


def test_options_a_method_never_reads_are_one_warning_and_change_nothing(tmp_path, capsys, caplog):
    """tip_adapter reads no adapter or optimiser key: given, they are named in one warning line and the run is the
    run without them (the same accuracy and cache). With no validation shots (a folder without val/ under the coop
    sampler) the no-search warning is for the methods that search on val (tip_adapter), not coop."""
    import logging

    from safetensors.torch import load_file

    root = make_folder_dataset(tmp_path / "data", n_classes=3, train_per_class=2, test_per_class=2)
    common = ["train", "--model", "tiny-clip", "--pretrained", "none", "--dataset", "folder", "--root", str(root),
              "--shots", "1", "--workers", "0", "--device", "cpu", "--no-zero-shot", "--sampler", "coop",
              "baseline.views=1"]
    runs = {}
    for name, extra in (("plain", []), ("ignored", ["--n-blocks", "4", "--lr", "1e-3", "--iters", "3",
                                                    "train.flip=false", "baseline.n_ctx=4"])):
        capsys.readouterr()
        with caplog.at_level(logging.WARNING, logger="blocklora"):
            caplog.clear()
            assert main([*common, "--method", "tip_adapter", "--output", str(tmp_path / name), *extra]) == 0
        warned = [line for line in capsys.readouterr().err.splitlines() if "does not read" in line]
        assert warned == ([] if name == "plain" else [
            "warning: method tip_adapter does not read --n-blocks, --lr, --iters, train.flip, baseline.n_ctx (a "
            "baseline's recipe is its paper's, set by baseline.* keys: docs/recipe.md): they are ignored"])
        assert "no validation shots" in caplog.text  # tip_adapter searches alpha and beta on val
        runs[name] = (json.loads((tmp_path / name / "results.json").read_text())["top1"],
                      load_file(tmp_path / name / "adapter" / "blocklora_adapter.safetensors"))
    assert runs["plain"][0] == runs["ignored"][0]
    assert all((runs["plain"][1][k] == runs["ignored"][1][k]).all() for k in runs["plain"][1])
    # interrupted before results.json: --resume with another value of a key it never reads is the same computation
    (tmp_path / "ignored" / "results.json").unlink()
    assert main([*common, "--method", "tip_adapter", "--output", str(tmp_path / "ignored"), "--resume", "--lr",
                 "5e-3"]) == 0
    assert json.loads((tmp_path / "ignored" / "results.json").read_text())["top1"] == runs["plain"][0]
    capsys.readouterr()
    with caplog.at_level(logging.WARNING, logger="blocklora"):
        caplog.clear()
        assert main([*common, "--method", "coop", "--output", str(tmp_path / "coop"), "baseline.epochs=1",
                     "baseline.n_ctx=2"]) == 0
    assert "no validation shots" not in caplog.text and "does not read" not in capsys.readouterr().err
