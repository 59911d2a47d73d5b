"""A run's resumable state (RunDir.checkpoint): written every train.checkpoint_every steps, checked and loaded on
--resume, removed when the run is complete; and the metric lines of the steps a resumed run redoes."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ..backbones import Backbone
from ..errors import BlockLoRAError
from .files import atomic_write, load_torch, save_torch
from .fit import Trainer
from .rundir import RunDir

log = logging.getLogger("blocklora")
FIX = "start the run again with --overwrite"


class Checkpoints:
    """Writes the trainer's state into the run directory (rank 0 only) and remembers the last step written.

    The file holds everything a resume needs: adapter, optimizer, scheduler, grad scaler, RNG states and step
    (Trainer.state_dict), plus what it must match: the K-shot split's sha256, the config hash and the frozen
    weights' fingerprint."""

    def __init__(self, rd: RunDir, split_sha256: str, config_hash: str, fingerprint: str, main: bool,
                 last_step: int | None = None, write: Callable[[Path, Any], None] = save_torch) -> None:
        self.rd, self.main, self.write = rd, main, write  # write(path, obj): api.run passes api.save_torch
        self.stamp = {"split_sha256": split_sha256, "config_hash": config_hash, "weights_fingerprint": fingerprint}
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
    """Load the checkpoint into `trainer`, or refuse on one line (BlockLoRAError): a damaged or foreign file, another
    K-shot split, other frozen weights (the fingerprint), non-finite tensors."""
    try:
        state = load_torch(rd.checkpoint)
    except BlockLoRAError as e:
        raise BlockLoRAError(f"{e}: {FIX}") from None
    missing = [k for k in ("step", "adapter", "optimizer", "scheduler", "rng")
               if not isinstance(state, dict) or k not in state]
    if missing:
        raise BlockLoRAError(f"{rd.checkpoint} is not a blocklora checkpoint (no {missing[0]!r}): {FIX}")
    saved = state.get("weights_fingerprint")
    if saved != backbone.fingerprint:
        raise BlockLoRAError(f"{rd.checkpoint} was trained on other frozen weights (fingerprint {saved}, these "
                             f"weights {backbone.fingerprint}): resume with the weights it started on, or {FIX}")
    if state.get("split_sha256") != split_sha256:
        raise BlockLoRAError(f"{rd.checkpoint} belongs to another K-shot split ({state.get('split_sha256')} vs "
                             f"{split_sha256}): {FIX}")
    try:
        if not all(bool(torch.isfinite(v).all()) for v in state["adapter"].values()):
            raise ValueError("non-finite adapter weights")
        trainer.load_state_dict(state)
    except (AttributeError, KeyError, IndexError, RuntimeError, TypeError, ValueError) as e:
        raise BlockLoRAError(f"{rd.checkpoint} does not fit this run ({type(e).__name__}: "
                             f"{str(e).splitlines()[0][:120] if str(e) else ''}): {FIX}") from None
    log.info("resumed at step %d of %d", trainer.state.step, trainer.total)


def truncate_metrics(path: Path, step: int) -> None:
    """Keep the metric lines of steps <= `step` (a resumed run redoes the steps after its checkpoint)."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["step"] <= step:
                kept.append(line)
        except (ValueError, KeyError, TypeError):
            break  # a line cut by a kill: drop it and what follows
    text = "".join(k + "\n" for k in kept)
    atomic_write(path, lambda fh: fh.write(text.encode()))
