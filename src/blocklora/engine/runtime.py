"""Device, precision, seeding and determinism: the few decisions every loop shares."""

from __future__ import annotations

import contextlib
import os
import random
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from ..errors import ConfigError


@dataclass(frozen=True)
class Runtime:
    device: torch.device
    amp_dtype: torch.dtype | None  # None: plain fp32
    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def precision(self) -> str:
        return {None: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}[self.amp_dtype]

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)

    def grad_scaler(self) -> torch.amp.GradScaler:
        """A real scaler for fp16 on CUDA (the recipe); a disabled one (a no-op with the same API) otherwise."""
        return torch.amp.GradScaler(self.device.type, enabled=self.amp_dtype is torch.float16)


def make_runtime(device: str = "auto", precision: str = "auto", rank: int = 0, world_size: int = 1) -> Runtime:
    """auto: CUDA when present (fp16 autocast + grad scaler, the CLIP-LoRA recipe), else CPU in fp32."""
    if device == "auto":
        device = f"cuda:{torch.cuda.current_device()}" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ConfigError(f"unknown device {device!r}: use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {device} requested but CUDA is not available here: use device=cpu or auto")
    if precision == "auto":
        precision = "fp16" if dev.type == "cuda" else "fp32"
    if precision == "fp16" and dev.type != "cuda":
        raise ConfigError("fp16 autocast needs CUDA: use precision fp32 or bf16 on the CPU")
    amp = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}[precision]
    return Runtime(dev, amp, rank, world_size)


def compute_dtype(model: torch.nn.Module, runtime: Runtime) -> torch.dtype:
    """The dtype to run the frozen weights in: float32 on the CPU when they are stored in float16 / bfloat16 (CPU
    half-precision kernels are slow and accumulate in half precision, which overflows); as stored elsewhere (CUDA
    autocast computes in half precision either way). Adapters are float32 in any case (adapters/layers.py)."""
    stored = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    if runtime.device.type == "cpu" and stored in (torch.float16, torch.bfloat16):
        return torch.float32
    return stored


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def set_deterministic(enabled: bool) -> None:
    """Bit-identical reruns: deterministic kernels, no cuDNN autotuning, fixed cuBLAS workspace."""
    if not enabled:
        return
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False


def rng_state() -> dict:
    """Every RNG the training step reads (dropout masks come from torch's global generators)."""
    state = {"python": random.getstate(), "torch": torch.random.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(_as_tuple(state["python"]))
    torch.random.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _as_tuple(x):
    return tuple(_as_tuple(i) for i in x) if isinstance(x, (list, tuple)) else x


def default_workers() -> int:
    return max(0, min(8, (os.cpu_count() or 1) - 1))


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module) -> Iterator[None]:
    was = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was)
