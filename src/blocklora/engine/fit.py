"""The training loop: one optimizer step per iteration on the K-shot images, the CLIP-LoRA recipe by default.

    for step in range(start, total):
        images, labels = batch(step)                       # a pure function of (seed, step): see stream.py
        img = normalize(encode_images(images))             # (B, D)
        txt = normalize(encode_classes(classnames))        # (C, D); cached once when the text tower is frozen
        loss = cross_entropy(logit_scale * img @ txt.T, labels)   # or SigLIP's sigmoid loss: engine/logits.py
        backward; (all-reduce grads under torchrun); AdamW step; cosine schedule step
        record loss (the mean over the global batch) and batch accuracy (% of it right), both before the step

Under torchrun each rank holds global_batch[rank::world]; its loss is its samples' sum / the global batch size, so
the ranks' losses (and correct counts) summed are the global batch's: the recorded metrics are the run's, equal to
one process's on the same batches (to float rounding), never one shard's.

The frozen model stays in eval mode (BatchNorm statistics and the backbone's own dropout untouched); only the
adapter layers are in train mode, so adapter dropout is the only randomness besides augmentation.
"""

from __future__ import annotations

import logging
import math
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from ..adapters.inject import adapter_layers, adapter_state_dict
from ..backbones.base import Backbone
from ..config.run_config import TrainConfig
from ..data.types import Item
from ..errors import BlockLoRAError
from .evaluate import encode_classes
from .logits import Logits
from .progress import progress
from .runtime import Runtime, rng_state, set_rng_state
from .stream import train_stream

log = logging.getLogger("blocklora")
ETA_AFTER = 5  # steps timed before the ETA line (the first steps also pay for warm-up: workers, allocations)


def plan(total: int, start: int, batch_size: int, n_train: int, runtime: Runtime, drop_last: bool = True,
         validation: str | None = None) -> list[str]:
    """The lines printed before training: steps, the batch that runs, epochs over the K-shot set, device and
    precision, the validation set when the run uses one (`validation`: what for), and on a CPU with a GPU-sized
    budget, the named CPU recipe (config.RECIPES["quick"]).

    The batch and epochs are what engine/stream.StepBatches feeds (the default drop_last is Block-LoRA's): a set
    smaller than train.batch_size is each step's whole batch, and a kept last partial batch (drop_last=False,
    CLIP-LoRA) makes its step smaller. Epochs = images fed over the `total` steps / the set's size."""
    from ..config.run_config import RECIPES
    from .stream import StepBatches

    n = max(1, n_train)
    sb = StepBatches(n, batch_size, 0, 0, total, drop_last=drop_last)
    sizes = [sb.global_size(pos) for pos in range(sb.per_epoch)]  # one epoch's steps
    full, part = divmod(total, sb.per_epoch)
    epochs = (full * sum(sizes) + sum(sizes[:part])) / n
    left = f", {total - start} left from step {start}" if start else ""
    notes = []
    if batch_size > n:
        notes.append(f"train.batch_size {batch_size} is more than the set: every step is the whole set")
    elif len(sizes) > 1 and sizes[-1] != sizes[0]:
        notes.append(f"each epoch's last step has {sizes[-1]}: the partial batch is kept")
    elif n % sb.batch:
        notes.append(f"{n % sb.batch} images left out of each epoch: drop_last")
    if validation:
        notes.append(f"validation: {validation}")
    note = f" ({'; '.join(notes)})" if notes else ""
    lines = [f"plan: {total} steps of batch {sb.batch}{left} = {epochs:.1f} epochs over the {n_train} K-shot "
             f"images{note}, on {runtime.device} ({runtime.precision})"]
    quick = RECIPES["quick"]
    if runtime.device.type == "cpu" and total * sb.batch > 2 * quick["train.iters"] * quick["train.batch_size"]:
        lines.append(f"note: this budget is the GPU reference recipe's size; on a CPU it can take hours. --recipe "
                     f"quick is the demo's CPU budget ({quick['train.iters']} steps of {quick['train.batch_size']}, "
                     f"lr {quick['train.lr']:g})")
    return lines


class TrainingDiverged(BlockLoRAError):
    """Training cannot go on: a non-finite loss (nan_policy=stop), non-finite adapter weights after a step (under
    either policy: there is nothing left to continue from), or every step skipped."""


def lr_lambda(step: int, total: int, warmup: int, base_lr: float, min_lr: float, schedule: str) -> float:
    """Multiplier of base_lr at `step`: linear warm-up, then cosine from base_lr to min_lr over the rest.

    With warmup=0 this is torch's CosineAnnealingLR(T_max=total, eta_min=min_lr) in closed form (CLIP-LoRA).
    """
    if warmup and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    t = (step - warmup) / max(1, total - warmup)
    return (min_lr + (base_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * t))) / base_lr


@dataclass
class FitState:
    step: int = 0
    skipped: int = 0
    last_loss: float = float("nan")
    history: list[dict[str, Any]] = field(default_factory=list)


class Trainer:
    """Trains the adapters of `backbone` on `items` with the recipe in `cfg` (see the module docstring).

    `items` are the K-shot (path, label) pairs read by `reader`; labels index `classnames`. `total_iters` optimizer
    steps of cfg.batch_size images (the global batch, split across `runtime`'s processes); batch b of step t is a
    pure function of (seed, t) (engine/stream.py), so a resumed run replays the same batches. AdamW (cfg.lr,
    cfg.betas, cfg.weight_decay) on the trainable parameters only, LambdaLR over lr_lambda: linear warm-up, then
    cosine to cfg.min_lr stepped every iteration (CLIP-LoRA, MaxZanella/CLIP-LoRA main.py / lora.py).
    `logits`: the resolved logits and loss (engine.logits.resolve; default: cfg.logit_scale, softmax).
    Raises BlockLoRAError when nothing is trainable; fit() raises TrainingDiverged (see there).
    """

    def __init__(self, backbone: Backbone, items: Sequence[Item], reader: Callable, classnames: Sequence[str],
                 cfg: TrainConfig, runtime: Runtime, seed: int, total_iters: int, workers: int = 0,
                 logits: Logits | None = None) -> None:
        self.backbone, self.items, self.reader = backbone, list(items), reader
        self.logits = logits or Logits(float(cfg.logit_scale))
        self.classnames, self.cfg, self.runtime = list(classnames), cfg, runtime
        self.seed, self.total, self.workers = seed, total_iters, workers
        model = backbone.model
        self.params = [p for p in model.parameters() if p.requires_grad]
        if not self.params:
            raise BlockLoRAError("nothing to train: inject an adapter first")
        self.optimizer = torch.optim.AdamW(self.params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: lr_lambda(
            s, total_iters, cfg.warmup_iters, cfg.lr, cfg.min_lr, cfg.schedule))
        self.scaler = runtime.grad_scaler()
        self.state = FitState()
        frozen = {p.dtype for p in model.parameters() if not p.requires_grad and p.is_floating_point()}
        self.half_weights = sorted(str(d).removeprefix("torch.") for d in frozen & {torch.float16, torch.bfloat16})
        # The text side only needs recomputing when it carries trainable adapters.
        self.text_trainable = any(p.requires_grad for _, p in backbone.tower_parameters("text"))
        self._text_cache: torch.Tensor | None = None

    # -- state for checkpoints ---------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Everything a resume needs (CPU tensors): step, skipped steps, adapter weights, optimizer, scheduler,
        grad scaler and RNG states (engine/checkpoint.py adds what the checkpoint must match)."""
        return {"step": self.state.step, "skipped": self.state.skipped,
                "adapter": {k: v.detach().cpu().clone() for k, v in adapter_state_dict(self.backbone.model).items()},
                "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict(), "rng": rng_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """The inverse of state_dict(): training continues at state["step"] exactly as if never stopped. Raises
        KeyError / RuntimeError when the state does not fit these adapters (engine/checkpoint.resume words it)."""
        model = self.backbone.model
        with torch.no_grad():
            for name, value in state["adapter"].items():
                model.get_parameter(name).copy_(value)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        set_rng_state(state["rng"])
        self.state.step, self.state.skipped = int(state["step"]), int(state.get("skipped", 0))

    # -- the loop ----------------------------------------------------------------------------------------------------
    def _text_features(self) -> torch.Tensor:
        if self.text_trainable:
            return encode_classes(self.backbone, self.classnames, [self.cfg.template], self.runtime)
        if self._text_cache is None:
            with torch.no_grad():
                self._text_cache = encode_classes(self.backbone, self.classnames, [self.cfg.template], self.runtime)
        return self._text_cache

    def fit(self, on_step: Callable[[dict[str, Any]], None] | None = None,
            checkpoint: Callable[[Trainer], None] | None = None) -> FitState:
        """Train from the current step to the end. `on_step` gets each step's metrics; `checkpoint` is called
        every cfg.checkpoint_every steps (and by the caller at the end)."""
        rt, cfg, model = self.runtime, self.cfg, self.backbone.model
        transform = self.backbone.train_transform(cfg.aug_scale_min, cfg.flip)
        if cfg.drop_last is None:
            raise BlockLoRAError("train.drop_last is unset: train with RunConfig.resolved()'s TrainConfig")
        loader = train_stream(self.items, transform, self.reader, cfg.batch_size, self.seed, self.state.step,
                              self.total, self.workers, rt.rank, rt.world_size, rt.device.type == "cuda",
                              cfg.drop_last)
        sampler = loader.batch_sampler
        model.eval()
        for _, layer in adapter_layers(model):
            layer.train()
        # a bar on a terminal; in a redirected log, one line every log_every steps (engine/progress.py)
        bar = progress(total=self.total, initial=self.state.step, desc="train", unit="step", disable=not rt.is_main,
                       every=max(1, cfg.log_every))
        tick = time.perf_counter()
        timed: tuple[int, float] | None = None  # (step, time) where the ETA's clock starts
        try:
            for images, labels in loader:
                # Sum over this rank's samples / this step's global batch (smaller for a kept last partial
                # batch): summed over ranks it is the global mean, CLIP-LoRA's cross-entropy over its batch.
                self._global_batch = sampler.global_size(self.state.step)  # type: ignore[union-attr]
                if images is None:  # an empty share (fewer images in the step than ranks): it adds nothing
                    loss, logits, labels = self._empty_share()
                else:
                    images = images.to(rt.device, non_blocking=True)
                    labels = labels.to(rt.device, non_blocking=True)
                    with rt.autocast():
                        img = F.normalize(self.backbone.encode_images(images).float(), dim=-1)
                        txt = self._text_features()
                        logits = self.logits(img @ txt.T)  # (B, C): scale * cos (+ SigLIP's bias)
                        loss = self.logits.loss(logits, labels) / self._global_batch
                metrics = self._step(loss, logits, labels)
                now = time.perf_counter()
                metrics["step_s"], tick = round(now - tick, 4), now
                if on_step is not None:
                    on_step(metrics)
                if rt.is_main and (self.state.step % max(1, cfg.log_every) == 0 or self.state.step == self.total):
                    loss_text = "skipped" if metrics["loss"] is None else f"{metrics['loss']:.4f}"
                    bar.set_postfix(loss=loss_text, acc=f"{metrics['acc']:.1f}")
                bar.update(1)
                timed = self._report_eta(timed, now)
                if checkpoint is not None and cfg.checkpoint_every and self.state.step % cfg.checkpoint_every == 0:
                    checkpoint(self)
        finally:
            bar.close()
            model.eval()
        if self.state.step and self.state.skipped >= self.state.step:
            raise TrainingDiverged(f"every one of the {self.state.step} steps was skipped (non-finite loss): nothing "
                                   f"was trained; {self._cause()}")
        return self.state

    def _empty_share(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(loss, logits, labels) of a rank with no image in this step: a zero loss connected to every trained
        parameter (its gradients are zeros, so the rank still joins the step's gradient all-reduce), no logits."""
        device = self.runtime.device
        loss = sum(p.sum() * 0.0 for p in self.params)
        return loss, torch.zeros(0, len(self.classnames), device=device), torch.zeros(0, dtype=torch.long,
                                                                                        device=device)

    def _report_eta(self, timed: tuple[int, float] | None, now: float) -> tuple[int, float] | None:
        """Log the ETA once, ETA_AFTER steps after the first (which pays for start-up); returns the clock's start."""
        step = self.state.step
        if timed is None:
            return (step, now)
        first, t0 = timed
        if step - first == ETA_AFTER and self.runtime.is_main and step < self.total:
            per_step = (now - t0) / ETA_AFTER
            left = per_step * (self.total - step)
            log.info("eta: %.2f s/step over steps %d-%d: about %s for the %d steps left", per_step, first + 1, step,
                     _duration(left), self.total - step)
        return timed

    def _cause(self) -> str:
        """The likeliest cause of a non-finite number, for the error message."""
        if self.half_weights:
            return (f"the frozen weights are stored in {', '.join(self.half_weights)}: run on the CPU (which computes "
                    "them in float32) or with precision fp32, or load a float32 checkpoint")
        return f"lower the learning rate (now {self.cfg.lr:g}) or check the data"

    def _finite(self, tensors) -> bool:
        """One device sync for all: are these tensors free of NaN and infinities?"""
        flags = [t.detach().isfinite().all() for t in tensors if t is not None]
        return bool(torch.stack(flags).all()) if flags else True

    def _step(self, loss: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor) -> dict[str, Any]:
        rt, cfg = self.runtime, self.cfg
        step = self.state.step
        finite = self._agree(torch.isfinite(loss.detach()))
        with torch.no_grad():  # this rank's share of the step's metrics: loss sum / global batch, correct predictions
            shares = torch.stack([loss.detach().float(), (logits.argmax(-1) == labels).sum().float()])
        if finite:
            self.scaler.scale(loss).backward()
            if rt.world_size > 1:
                shares = _all_reduce_grads(self.params, shares)
            if not self.scaler.is_enabled():  # (fp16's grad scaler skips non-finite gradients itself)
                finite = self._agree(torch.tensor(self._finite(p.grad for p in self.params)))
        if not finite:
            if cfg.nan_policy == "stop":
                what = f"the loss became {loss.item()}" if not bool(torch.isfinite(loss.detach())) else \
                    "the gradients became non-finite"
                raise TrainingDiverged(f"{what} at step {step + 1}: {self._cause()} (the last checkpoint is kept; "
                                       "nan_policy=skip skips such steps)")
            self.optimizer.zero_grad(set_to_none=True)
            self.state.skipped += 1
            self.state.step += 1
            with warnings.catch_warnings():  # the schedule follows the step count, taken or skipped
                warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler\.step\(\)`")
                self.scheduler.step()
            return {"step": self.state.step, "loss": None, "acc": 0.0, "skipped": True,
                    "lr": self.scheduler.get_last_lr()[0]}
        if cfg.grad_clip:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.params, cfg.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        if not self._finite(self.params):  # a finite loss and gradients, yet the update was not: nothing to go on with
            raise TrainingDiverged(f"the adapter weights became non-finite at step {step + 1}: {self._cause()} "
                                   "(the last checkpoint is kept)")
        lr = self.scheduler.get_last_lr()[0]
        self.scheduler.step()
        self.state.step += 1
        # The run's metrics, not one shard's (summed over ranks with the gradients): the mean loss over the step's
        # global batch (what was minimised) and the percentage of it classified right, both before the update; the
        # same numbers on any number of processes.
        loss_mean, correct = shares.tolist()
        self.state.last_loss = loss_mean
        acc = 100.0 * correct / self._global_batch
        return {"step": self.state.step, "loss": loss_mean, "acc": round(acc, 2), "lr": lr}

    def _agree(self, flag: torch.Tensor) -> bool:
        """`flag` on every rank (the minimum): all ranks must take the same decision."""
        if self.runtime.world_size > 1:
            import torch.distributed as dist

            flag = flag.float().to(self.runtime.device)
            dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        return bool(flag)


def _all_reduce_grads(params: Sequence[torch.nn.Parameter], extra: torch.Tensor) -> torch.Tensor:
    """Sum gradients over ranks in one flat float32 buffer with `extra` (the step's metric shares, 1-d) appended:
    adapters are small, so one collective per step. Returns `extra` summed over ranks."""
    import torch.distributed as dist

    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1).float() for g in grads] + [extra.float().to(grads[0].device)])
    dist.all_reduce(flat)
    offset = 0
    for p, g in zip(params, grads):
        n = g.numel()
        p.grad = flat[offset:offset + n].view(p.shape).to(p.dtype, copy=True)
        offset += n
    return flat[offset:]


def _duration(seconds: float) -> str:
    """'45 s', '12 min', '1 h 30 min'."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    minutes = round(seconds / 60)
    return f"{minutes} min" if minutes < 90 else f"{minutes // 60} h {minutes % 60:02d} min"
