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

    def frozen_dtype(self, choice: str) -> torch.dtype:
        """The frozen weights' dtype for train.frozen_dtype `choice`: "autocast" = the autocast dtype (fp32 without
        autocast), "fp32" = float32. "auto" must have been resolved (RunConfig.resolved) before."""
        if choice == "autocast":
            return self.amp_dtype or torch.float32
        if choice == "fp32":
            return torch.float32
        raise ConfigError(f"unresolved or unknown frozen_dtype {choice!r}: use fp32 or autocast")

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


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# cuBLAS's reproducible workspace settings (NVIDIA cuBLAS docs, "Results reproducibility"; torch accepts these two).
DETERMINISTIC_CUBLAS = (":4096:8", ":16:8")


def set_deterministic(enabled: bool) -> None:
    """Bit-identical reruns: deterministic kernels, no cuDNN autotuning, a fixed cuBLAS workspace.

    Strict mode (torch.use_deterministic_algorithms(True), not warn_only): only then do the CUDA attention kernels
    (flash and memory-efficient scaled_dot_product_attention, used by every adapted attention) run their
    deterministic backward; with warn_only=True they warn once and stay non-deterministic (torch's
    aten/src/ATen/native/transformers/cuda/attention_backward.cu). An op with no deterministic implementation then
    raises instead of silently breaking the promise. Under torchrun this must come before the NCCL process group
    is made: ProcessGroupNCCL reads the mode when it is built (it then excludes NCCL's NVLS all-reduce).

    CUBLAS_WORKSPACE_CONFIG is set to :4096:8 when unset. torch reads it at the first cuBLAS call of the process,
    so it must be set before any CUDA matrix product (the CLI does so); a value cuBLAS does not document as
    reproducible raises ConfigError.
    """
    if not enabled:
        return
    config = os.environ.get("CUBLAS_WORKSPACE_CONFIG")
    if config is None:
        os.environ["CUBLAS_WORKSPACE_CONFIG"] = DETERMINISTIC_CUBLAS[0]
    elif config not in DETERMINISTIC_CUBLAS:
        raise ConfigError(f"deterministic runs need CUBLAS_WORKSPACE_CONFIG={DETERMINISTIC_CUBLAS[0]} or "
                          f"{DETERMINISTIC_CUBLAS[1]} (it is {config!r}): unset it or set one of those")
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False


@contextlib.contextmanager
def deterministic(enabled: bool) -> Iterator[None]:
    """set_deterministic(enabled) for the duration; the process's previous settings come back afterwards (a
    deterministic run leaves no strict mode behind in a notebook, a test session or the next run)."""
    if not enabled:
        yield
        return
    saved = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
             torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
    set_deterministic(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(saved[0], warn_only=saved[1])
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = saved[2], saved[3]


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
