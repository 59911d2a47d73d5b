"""Data parallelism under torchrun: read its environment, start and end the process group.

    torchrun --nproc_per_node N -m blocklora train ...   (multi-node: torchrun's --nnodes/--rdzv options)

torchrun sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT for every process. The engine does the rest:
every rank draws the same global batch of each step and takes global_batch[rank::world] (stream.py), the loss is
summed over the rank's samples / global batch and gradients are summed in one flat all-reduce (fit.py) that also
sums the step's metrics (so metrics.jsonl, TensorBoard and results.json's final_loss report the global batch, as one
process would, never rank 0's shard), evaluation counts are summed (evaluate.py), and only rank 0 writes files,
caches and progress bars (pipeline/run.py).
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass

from ..errors import ConfigError


@dataclass(frozen=True)
class Launch:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def from_env(env: dict[str, str] | None = None) -> Launch:
    """The launch torchrun describes in the environment; a plain process is rank 0 of 1."""
    env = dict(os.environ if env is None else env)
    if "WORLD_SIZE" not in env:
        return Launch()
    try:
        launch = Launch(int(env.get("RANK", "0")), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", "0")))
    except ValueError:
        raise ConfigError(f"RANK/WORLD_SIZE/LOCAL_RANK are not integers ({env.get('RANK')!r}, "
                          f"{env.get('WORLD_SIZE')!r}, {env.get('LOCAL_RANK')!r}): start the run with torchrun"
                          ) from None
    if launch.world_size < 1 or not 0 <= launch.rank < launch.world_size:
        raise ConfigError(f"RANK={launch.rank} is not in 0..WORLD_SIZE-1={launch.world_size - 1}")
    return launch


@contextlib.contextmanager
def process_group(device: str = "auto", env: dict[str, str] | None = None) -> Iterator[Launch]:
    """Join torchrun's process group for the duration (nothing to do on a single process).

    CUDA (device auto/cuda): backend nccl, this process on cuda:LOCAL_RANK (made the current device, so device
    "auto" resolves to it and the run's config, hashed and compared on resume, is the same on every rank).
    CPU: backend gloo. Ranks other than 0 log warnings only.
    """
    launch = from_env(env)
    if launch.world_size == 1:
        yield launch
        return
    import torch
    import torch.distributed as dist

    use_cuda = device != "cpu" and torch.cuda.is_available()
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device {device} requested but CUDA is not available here: use --device cpu")
    if device.startswith("cuda:"):
        raise ConfigError(f"--device {device} under torchrun: pass --device cuda or auto (each rank takes "
                          "cuda:LOCAL_RANK)")
    if use_cuda:
        torch.cuda.set_device(launch.local_rank)
    dist.init_process_group("nccl" if use_cuda else "gloo", rank=launch.rank, world_size=launch.world_size)
    if not launch.is_main:
        logging.getLogger("blocklora").setLevel(logging.WARNING)
    try:
        yield launch
    finally:
        dist.destroy_process_group()


def all_ranks(flag: bool, device) -> bool:
    """True when `flag` is true on every rank (for decisions the ranks must take together, such as using a cache)."""
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return flag
    t = torch.tensor([1 if flag else 0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item())
