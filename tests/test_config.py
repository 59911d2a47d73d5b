"""RunConfig: recipe defaults, overrides, hash, errors."""

from __future__ import annotations

import pytest

from blocklora import ConfigError
from blocklora.config.run_config import RunConfig
from blocklora.engine.fit import lr_lambda


def test_defaults_are_the_clip_lora_recipe():
    c = RunConfig().resolved()
    t = c.train
    assert (t.lr, t.weight_decay, t.betas, t.min_lr, t.warmup_iters) == (2e-4, 1e-2, (0.9, 0.999), 1e-6, 0)
    assert (t.iters_per_shot, t.batch_size, t.logit_scale, t.template) == (500, 32, 100.0, "a photo of a {}.")
    assert t.total_iters(16) == 8000 and t.aug_scale_min == 0.08 and t.schedule == "cosine"
    assert c.adapter.method == "block_lora" and c.adapter.n_blocks == 8 and c.data.sampler == "clip-lora"


def test_overrides_and_round_trip():
    c = RunConfig().with_overrides(["train.lr=1e-3", "r=4", "betas=0.8,0.95", "iters=none", "blocks=up",
                                    "adapter.towers=vision", "data.replace=false", "pretrained=none"])
    assert c.train.lr == 1e-3 and c.adapter.r == 4 and c.train.betas == (0.8, 0.95) and c.train.iters is None
    assert c.adapter.layers == c.adapter.blocks == "up" and c.adapter.towers == ("vision",) and not c.data.replace
    assert c.pretrained is None
    assert RunConfig.from_dict(c.to_dict()) == c
    assert c.hash() == RunConfig.from_dict(c.to_dict()).hash() != RunConfig().hash()


@pytest.mark.parametrize(("override", "message"), [
    ("lr=abc", "bad value 'abc' for lr"), ("nope=1", "unknown config key 'nope'"), ("lr", "write key=value"),
    ("batch_size=4", "ambiguous"), ("train.schedule=linear", "unknown schedule"),
    ("adapter.n_blocks=0", "adapter.n_blocks must be an integer >= 1"), ("data.sampler=x", "unknown sampler"),
    ("train.template=photo", "no '{}'"), ("data.shots=0", "data.shots must be an integer >= 1"),
])
def test_bad_overrides_fail_clearly(override, message):
    with pytest.raises(ConfigError, match=message):
        RunConfig().with_overrides([override])


def test_cosine_schedule_matches_torch():
    import torch

    total, base, eta = 50, 2e-4, 1e-6
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=base)
    ref = torch.optim.lr_scheduler.CosineAnnealingLR(opt, total, eta_min=eta)
    for step in range(total):
        assert lr_lambda(step, total, 0, base, eta, "cosine") * base == pytest.approx(ref.get_last_lr()[0], rel=1e-9)
        opt.step()
        ref.step()
    assert lr_lambda(0, 10, 4, base, eta, "cosine") == pytest.approx(0.25)
