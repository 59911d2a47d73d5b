"""RunResult, the schema of results.json: lossless round trips, earlier files, damaged files."""

from __future__ import annotations

import json

import pytest

from blocklora.engine.results import RunResult
from blocklora.engine.rundir import RunDir
from blocklora.errors import BlockLoRAError

# A base-to-new run without zero-shot, as api.run writes it (key order included), plus a key of a later version.
WRITTEN = {
    "blocklora_version": "0.3.0", "top1": 81.25, "mean_per_class": 80.5,
    "per_class": [{"index": 0, "class": "cat", "top1": 75.0, "n": 4}, {"index": 1, "class": "dog", "top1": 86.0,
                                                                      "n": 4}],
    "n_test": 8, "base_top1": 81.25, "new_top1": 50.0, "harmonic_mean": 61.9048,
    "trainable_params": 1728, "adapted_modules": 6, "split_sha256": "ab" * 32, "split_file": "/r/split.json",
    "shots": 2, "seed": 1, "sampler": "clip-lora", "iters": 4, "skipped_steps": 0, "final_loss": None,
    "dataset": {"name": "folder", "root": "/d", "classes": 2, "classes_subset": "base", "n_train": 4, "n_test": 8},
    "skipped_images": [], "backbone": {"name": "tiny-clip"}, "device": "cpu", "precision": "fp32", "world_size": 1,
    "wall_time_s": {"total": 3.2, "train": 1.0, "eval": 0.5}, "peak_memory": {"cpu_rss_mb": 900.0},
    "config": {"model": "tiny-clip"}, "config_hash": "0123456789abcdef", "logits": {"scale": 100.0},
    "a_later_key": {"kept": True},
}


def test_round_trip_is_lossless_and_keeps_the_key_order():
    r = RunResult.from_json(WRITTEN)
    assert r.top1 == 81.25 and r.base_to_new and r.harmonic_mean == 61.9048 and r.zero_shot_top1 is None
    assert r.extra == {"a_later_key": {"kept": True}}
    assert list(r.to_json().items()) == list(WRITTEN.items())  # unmeasured protocols stay absent, not null
    assert RunResult.from_json(json.loads(json.dumps(r.to_json()))) == r


def test_a_file_of_an_earlier_version_loads():
    old = {k: WRITTEN[k] for k in ("top1", "shots", "seed", "dataset", "per_class", "zero_shot_top1")
           if k in WRITTEN} | {"zero_shot_top1": 40.0}
    r = RunResult.from_json(old)
    assert (r.top1, r.zero_shot_top1, r.trainable_params, r.base_to_new) == (81.25, 40.0, None, False)
    assert r.to_json() == {**old, "blocklora_version": None, "mean_per_class": None, "n_test": None,
                           "trainable_params": None, "adapted_modules": None, "split_sha256": None,
                           "split_file": None, "sampler": None, "iters": None, "skipped_steps": None,
                           "final_loss": None, "skipped_images": [], "backbone": {}, "device": None,
                           "precision": None, "world_size": None, "wall_time_s": {}, "peak_memory": {},
                           "config": {}, "config_hash": None, "logits": {}}


@pytest.mark.parametrize(("data", "message"), [
    ([1, 2], "not a JSON object"),
    ({"shots": 1, "seed": 1, "dataset": {}}, "no 'top1'"),
    ({**WRITTEN, "top1": "81"}, "wrong type"),
    ({**WRITTEN, "shots": True}, "wrong type"),
])
def test_a_damaged_file_is_one_clear_error(tmp_path, data, message):
    (tmp_path / "results.json").write_text(json.dumps(data))
    with pytest.raises(BlockLoRAError, match=message):
        RunDir(tmp_path).read_results()


def test_write_then_read(tmp_path):
    r = RunResult.from_json(WRITTEN)
    RunDir(tmp_path).write_results(r)
    assert RunDir(tmp_path).read_results() == r
    assert json.loads((tmp_path / "results.json").read_text()) == WRITTEN


def test_a_config_edited_after_the_run_is_refused_by_its_hash(tmp_path):
    """summarize files each run under its recorded config: a file of this version whose config no longer hashes to
    its config_hash (a valid value changed, a section dropped) is damaged, not another configuration."""
    from blocklora._version import __version__
    from blocklora.config.run_config import RunConfig

    cfg = RunConfig.from_dict({"model": "tiny-clip", "pretrained": None, "data": {"shots": 2}})
    good = {**WRITTEN, "blocklora_version": __version__, "config": json.loads(json.dumps(cfg.to_dict())),
            "config_hash": cfg.hash()}
    assert RunResult.from_json(good).config == good["config"]  # as written: loads
    edited = json.loads(json.dumps(good))
    edited["config"]["train"]["lr"] = 3e-4
    no_adapter = json.loads(json.dumps(good))
    del no_adapter["config"]["adapter"]
    for data, message in ((edited, "does not match its config_hash"), (no_adapter, "no 'adapter' section")):
        (tmp_path / "results.json").write_text(json.dumps(data))
        with pytest.raises(BlockLoRAError, match=message):
            RunDir(tmp_path).read_results()
