"""A run's resumable state (RunDir.checkpoint): written every train.checkpoint_every steps, checked and loaded on
--resume, removed when the run is complete; and the metric lines of the steps a resumed run redoes."""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ..backbones import Backbone
from ..checks import num
from ..errors import BlockLoRAError, ConfigError
from ..reading import damaged, fields, listof, loads, mapping, read_text, reason
from .files import atomic_write, load_torch, save_torch
from .fit import Trainer
from .rundir import RunDir

log = logging.getLogger("blocklora")
FIX = "start the run again with --overwrite"


class Checkpoints:
    """Writes the trainer's state into the run directory (rank 0 only) and remembers the last step written.

    The file holds everything a resume needs: adapter, optimizer, scheduler, grad scaler, RNG states and step
    (Trainer.state_dict), plus what it must match: the K-shot split's sha256, the config hash, the frozen
    weights' fingerprint and `activation`, the MLP activation the model computes (backbones.activation.mlp_activation,
    None for a model without GELU: the fingerprint cannot tell QuickGELU from GELU)."""

    def __init__(self, rd: RunDir, split_sha256: str, config_hash: str, fingerprint: str, main: bool,
                 last_step: int | None = None, write: Callable[[Path, Any], None] = save_torch, *,
                 activation: str | None) -> None:
        self.rd, self.main, self.write = rd, main, write  # write(path, obj): api.run passes api.save_torch
        self.stamp = {"split_sha256": split_sha256, "config_hash": config_hash, "weights_fingerprint": fingerprint,
                      "activation": activation}
        self.last_step = last_step  # None: nothing written yet

    def save(self, trainer: Trainer) -> None:
        if self.main:
            self.write(self.rd.checkpoint, {**trainer.state_dict(), **self.stamp})
            self.last_step = trainer.state.step

    def kept(self) -> str:
        """What a diverged run leaves to resume from, for its error message."""
        if self.last_step is None:
            return "no checkpoint had been written yet"
        return f"the last good checkpoint (step {self.last_step}) is kept in {self.rd.checkpoint}"


def resume(rd: RunDir, trainer: Trainer, split_sha256: str, backbone: Backbone) -> None:
    """Load the checkpoint into `trainer`, or refuse on one line (BlockLoRAError): see read_checkpoint."""
    state = read_checkpoint(rd.checkpoint, trainer, split_sha256, backbone)
    try:
        trainer.load_state_dict(state)
    except (AttributeError, KeyError, IndexError, RuntimeError, TypeError, ValueError) as e:
        raise BlockLoRAError(f"{rd.checkpoint} does not fit this run ({type(e).__name__}: "
                             f"{str(e).splitlines()[0][:120] if str(e) else ''}): {FIX}") from None
    log.info("resumed at step %d of %d", trainer.state.step, trainer.total)


def read_checkpoint(path: Path, trainer: Trainer, split_sha256: str, backbone: Backbone) -> dict[str, Any]:
    """checkpoint.pt, checked before any of it is used, against the run resuming it (`trainer`: its adapters,
    optimizer, schedule and step budget; the split's sha256; `backbone`: the frozen weights' fingerprint and MLP
    activation). Raises BlockLoRAError on one line for a damaged or foreign file (weights_only: it cannot run code),
    another split, other frozen weights or activation, a step outside 0..total, skipped steps beyond the step, an
    adapter tensor missing, unexpected, of another shape or non-finite, and a schedule or optimizer that is not at
    that step of this run's recipe (the scheduler's last_epoch, the learning rate, the AdamW terms and moments)."""
    try:
        state = load_torch(path)
    except BlockLoRAError as e:
        raise BlockLoRAError(f"{e}: {FIX}") from None
    missing = [k for k in ("step", "adapter", "optimizer", "scheduler", "rng")
               if not isinstance(state, dict) or k not in state]
    if missing:
        raise BlockLoRAError(f"{path} is not a blocklora checkpoint (no {missing[0]!r}): {FIX}")
    saved = state.get("weights_fingerprint")
    if saved != backbone.fingerprint:
        raise BlockLoRAError(f"{path} was trained on other frozen weights (fingerprint {saved}, these "
                             f"weights {backbone.fingerprint}): resume with the weights it started on, or {FIX}")
    if state.get("split_sha256") != split_sha256:
        raise BlockLoRAError(f"{path} belongs to another K-shot split ({state.get('split_sha256')} vs "
                             f"{split_sha256}): {FIX}")
    from ..backbones.activation import mlp_activation

    act = mlp_activation(backbone.model)
    if "activation" in state and state["activation"] != act:  # checkpoints before it was recorded: not checked
        raise BlockLoRAError(f"{path} was trained with the MLP activation {state['activation']!r}, this run builds "
                             f"{act!r} (its config.json's quick_gelu says so): resume with the activation it "
                             f"started with, or {FIX}")
    with damaged(path, BlockLoRAError, f"the file is damaged or of another run: {FIX}"):
        total = trainer.total
        f = fields(state, {"step": num(0, total, integer=True), "adapter": mapping, "optimizer": mapping,
                           "scheduler": mapping, "rng": mapping, "scaler": mapping}, "checkpoint",
                   defaults={"scaler": {}})
        step = f["step"]
        fields(state, {"skipped": num(0, step, integer=True)}, "checkpoint", defaults={"skipped": 0})
        _check_adapter(f["adapter"], trainer)
        _check_schedule(f["scheduler"], f["optimizer"], step, trainer)
        fields(f["rng"], {"python": _python_rng, "torch": _tensor}, "checkpoint.rng")
    return state


def _tensor(name: str, value: Any) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise ConfigError(f"{name} must be a tensor, got {type(value).__name__}")
    return value


def _python_rng(name: str, value: Any) -> tuple:
    """random.getstate(): (version, 625 ints, gauss_next), saved as a tuple."""
    if not isinstance(value, (tuple, list)) or len(value) != 3:
        raise ConfigError(f"{name} must be random.getstate()'s (version, state, gauss_next)")
    return value


def _check_adapter(adapter: dict[str, Any], trainer: Trainer) -> None:
    """Exactly the trainer's adapter tensors, each of its shape, floating point and finite."""
    from ..adapters.inject import adapter_state_dict

    expected = {k: tuple(v.shape) for k, v in adapter_state_dict(trainer.backbone.model).items()}
    missing, unexpected = sorted(set(expected) - set(adapter)), sorted(set(adapter) - set(expected))
    if missing or unexpected:
        first = f"lacks {missing[0]}" if missing else f"has {unexpected[0]!r}, which this run's adapters do not"
        raise ConfigError(f"checkpoint.adapter {first} ({len(missing)} of the {len(expected)} adapter tensors "
                          f"missing, {len(unexpected)} unexpected)")
    for name, shape in expected.items():
        value = _tensor(f"checkpoint.adapter[{name!r}]", adapter[name])
        if tuple(value.shape) != shape or not value.is_floating_point():
            raise ConfigError(f"checkpoint.adapter[{name!r}] is a {value.dtype} tensor of shape {tuple(value.shape)}, "
                              f"the adapter's is {shape}")
        if not bool(torch.isfinite(value).all()):
            raise ConfigError(f"checkpoint.adapter[{name!r}] holds NaN or infinite values")


def _check_schedule(scheduler: dict[str, Any], optimizer: dict[str, Any], step: int, trainer: Trainer) -> None:
    """The scheduler at `step` of this run's schedule (it steps on every step, taken or skipped: fit.Trainer._step),
    the optimizer's learning rate where the schedule puts it and its AdamW terms the recipe's, every moment of the
    parameter's shape and finite, no more optimizer steps than steps."""
    epoch = scheduler.get("last_epoch")
    if epoch != step:
        raise ConfigError(f"checkpoint.scheduler.last_epoch is {epoch!r}, but the checkpoint's step is {step}")
    cfg = trainer.cfg
    groups = fields(optimizer, {"param_groups": listof(mapping, 1, 1), "state": mapping},
                    "checkpoint.optimizer")
    group = groups["param_groups"][0]
    lr = trainer.scheduler.lr_lambdas[0](step) * cfg.lr  # what LambdaLR set after `step` steps
    want = {"lr": lr, "initial_lr": cfg.lr, "weight_decay": cfg.weight_decay, "betas": tuple(cfg.betas)}
    for key, value in want.items():
        got = group.get(key)
        got = tuple(got) if isinstance(got, (list, tuple)) else got
        same = got == value if key == "betas" else isinstance(got, (int, float)) and math.isclose(
            got, value, rel_tol=1e-9, abs_tol=1e-15)
        if not same:
            raise ConfigError(f"checkpoint.optimizer {key} is {got!r}, this run's recipe has {value!r} at step {step}")
    params = group.get("params")
    if not isinstance(params, list) or len(params) != len(trainer.params):
        raise ConfigError(f"checkpoint.optimizer holds {len(params) if isinstance(params, list) else '?'} "
                          f"parameters, this run's adapters {len(trainer.params)}")
    shapes = dict(zip(params, (tuple(p.shape) for p in trainer.params)))
    for index, moments in groups["state"].items():
        where = f"checkpoint.optimizer.state[{index!r}]"
        if index not in shapes or not isinstance(moments, dict):
            raise ConfigError(f"{where} belongs to no parameter of this run")
        for key, value in moments.items():
            value = _tensor(f"{where}.{key}", value)
            if key == "step":
                if not bool(torch.isfinite(value).all()) or not 0 <= float(value) <= step:
                    raise ConfigError(f"{where}.step is {float(value):g}, more than the checkpoint's {step} steps")
            elif tuple(value.shape) != shapes[index] or not bool(torch.isfinite(value).all()):
                raise ConfigError(f"{where}.{key} has shape {tuple(value.shape)} (the parameter's is "
                                  f"{shapes[index]}) or non-finite values")


def truncate_metrics(path: Path, step: int) -> None:
    """Keep the metric lines of steps <= `step` (a resumed run redoes the steps after its checkpoint). A lone
    metrics.jsonl that is not a regular file is an error, never read (a FIFO would block)."""
    if not os.path.lexists(path):
        return
    try:
        text = read_text(path)
    except (OSError, UnicodeDecodeError) as e:
        raise BlockLoRAError(f"cannot read the run's metrics {path} ({reason(e)}): {FIX}") from None
    kept = []
    for line in text.splitlines():
        try:
            value = loads(line)["step"]
            if isinstance(value, bool) or not isinstance(value, int):
                break
            if value <= step:
                kept.append(line)
        except (ValueError, KeyError, TypeError):
            break  # a line cut by a kill: drop it and what follows
    text = "".join(k + "\n" for k in kept)
    atomic_write(path, lambda fh: fh.write(text.encode()))
