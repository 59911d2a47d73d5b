"""What the CPU can check of the CUDA-facing runtime: bf16 autocast, GradScaler's disabled path, deterministic mode."""

from __future__ import annotations

import json

import pytest
import torch

from blocklora.engine.runtime import DETERMINISTIC_CUBLAS, deterministic, make_runtime, set_deterministic
from blocklora.errors import ConfigError


def _mode():
    return (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
            torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)


@pytest.fixture
def restore_mode():
    saved = _mode()
    yield
    torch.use_deterministic_algorithms(saved[0], warn_only=saved[1])
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = saved[2], saved[3]


def test_bf16_autocast_on_cpu_runs_matmuls_in_bf16_only_inside():
    rt = make_runtime("cpu", "bf16")
    assert rt.precision == "bf16" and rt.amp_dtype is torch.bfloat16
    layer = torch.nn.Linear(8, 4)
    x = torch.randn(2, 8)
    with rt.autocast():
        y = layer(x)
        loss = torch.nn.functional.cross_entropy(y, torch.tensor([0, 1]))  # autocast's float32 list
    assert y.dtype is torch.bfloat16 and loss.dtype is torch.float32
    assert layer(x).dtype is torch.float32 and layer.weight.dtype is torch.float32  # fp32 master weights
    torch.testing.assert_close(y.float(), layer(x), rtol=2e-2, atol=2e-2)


def test_precisions_by_device():
    assert make_runtime("cpu", "auto").precision == "fp32"
    assert make_runtime("cpu", "fp32").autocast().__class__.__name__ == "nullcontext"
    with pytest.raises(ConfigError, match="fp16 autocast needs CUDA"):
        make_runtime("cpu", "fp16")


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_disabled_grad_scaler_is_a_plain_optimizer_step(precision):
    """On the CPU the runtime's GradScaler is disabled: scale, unscale_, step and update must be exactly the plain
    backward + optimizer.step(), and its (empty) state must round-trip through a checkpoint."""
    rt = make_runtime("cpu", precision)
    torch.manual_seed(0)
    models = [torch.nn.Linear(6, 3), torch.nn.Linear(6, 3)]
    models[1].load_state_dict(models[0].state_dict())
    opts = [torch.optim.AdamW(m.parameters(), lr=0.1) for m in models]
    x, target = torch.randn(5, 6), torch.randint(0, 3, (5,))
    scaler = rt.grad_scaler()
    assert not scaler.is_enabled() and scaler.get_scale() == 1.0
    for _ in range(3):
        for i, (model, opt) in enumerate(zip(models, opts)):
            with rt.autocast():
                loss = torch.nn.functional.cross_entropy(model(x), target)
            if i == 0:
                scaled = scaler.scale(loss)
                assert scaled is loss
                scaled.backward()
                scaler.unscale_(opt)
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                scaler.step(opt)
                scaler.update()
            else:
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                opt.step()
            opt.zero_grad(set_to_none=True)
    for a, b in zip(models[0].parameters(), models[1].parameters()):
        assert torch.equal(a, b)
    assert scaler.state_dict() == {}
    fp16_state = torch.amp.GradScaler("cpu", init_scale=1024.0).state_dict()  # a checkpoint from an fp16 run
    scaler.load_state_dict(fp16_state)  # resuming it on the CPU: ignored, still a no-op
    assert scaler.get_scale() == 1.0


def test_deterministic_is_strict_and_restores_the_previous_mode(monkeypatch, restore_mode):
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    torch.use_deterministic_algorithms(True, warn_only=True)  # whatever the caller had, it comes back
    torch.backends.cudnn.benchmark = True
    before = _mode()
    with deterministic(True):
        # strict (warn_only False): only then do CUDA flash / memory-efficient attention run deterministic backward
        assert _mode() == (True, False, True, False)
        import os

        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == DETERMINISTIC_CUBLAS[0]
    assert _mode() == before
    with deterministic(False):
        assert _mode() == before


@pytest.mark.parametrize("value", [":16:8", ":4096:8"])
def test_deterministic_keeps_a_reproducible_cublas_setting(monkeypatch, restore_mode, value):
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", value)
    set_deterministic(True)
    import os

    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == value


def test_deterministic_refuses_a_cublas_setting_that_is_not_reproducible(monkeypatch, restore_mode):
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":1024:2")
    before = _mode()
    with pytest.raises(ConfigError, match=r"CUBLAS_WORKSPACE_CONFIG=:4096:8 or :16:8 \(it is ':1024:2'\)"), \
            deterministic(True):
        pass
    assert _mode() == before


def test_train_turns_deterministic_mode_on_before_the_process_group(tmp_path, monkeypatch, restore_mode):
    """ProcessGroupNCCL reads the mode when it is made: `train --deterministic` must set it before joining, and
    leave the process as it found it."""
    import blocklora.engine.distributed as distributed
    from blocklora.cli.main import main
    from gen_data import make_folder_dataset

    seen = []
    real = distributed.process_group

    def spy(*args, **kwargs):  # the real process_group, observed
        seen.append(torch.are_deterministic_algorithms_enabled())
        return real(*args, **kwargs)

    monkeypatch.setattr(distributed, "process_group", spy)
    torch.use_deterministic_algorithms(False)
    root = make_folder_dataset(tmp_path / "d", n_classes=2, train_per_class=2, test_per_class=1)
    out = tmp_path / "run"
    assert main(["train", "--model", "tiny-clip", "--pretrained", "none", "--shots", "2", "--iters", "2",
                 "--batch-size", "4", "--workers", "0", "--dataset", "folder", "--root", str(root), "--output",
                 str(out), "--no-zero-shot", "--deterministic", "--precision", "bf16"]) == 0
    assert seen == [True]
    assert not torch.are_deterministic_algorithms_enabled()
    results = json.loads((out / "results.json").read_text())
    assert results["precision"] == "bf16" and results["config"]["train"]["deterministic"] is True
