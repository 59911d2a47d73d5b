"""The training data stream: batch t is a pure function of (seed, t).

Each step's image indices come from a per-epoch permutation seeded by (seed, epoch), and each sample's
augmentation from its own seed. So a run resumed at step t sees exactly the batches an uninterrupted run sees,
whatever the number of loader workers or processes (DDP ranks take disjoint slices of the same global batch).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import torch
from torch.utils.data import DataLoader, Dataset, Sampler, default_collate

from ..data.types import Item


def _mix(*parts: int) -> int:
    """A 63-bit seed from integers (splitmix64-style), so nearby (seed, step, j) give unrelated streams."""
    x = 0x9E3779B97F4A7C15
    for p in parts:
        x = (x ^ (p & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        x ^= x >> 31
    return x & 0x7FFFFFFFFFFFFFFF


class StepBatches(Sampler[list[tuple[int, int]]]):
    """Yields, for steps start..total-1, this rank's share of the global batch as (item index, sample seed)."""

    def __init__(self, n_items: int, batch_size: int, seed: int, start: int, total: int,
                 rank: int = 0, world_size: int = 1, drop_last: bool = True) -> None:
        self.n, self.seed, self.start, self.total = n_items, seed, start, total
        # An epoch is one permutation of the items cut into batches. Its last partial batch is either dropped
        # (CoOp: Dassl's build_data_loader sets drop_last when training on at least one batch of images) or kept
        # as a smaller step (CLIP-LoRA: its build_data_loader passes drop_last=False, so DTD 1-shot, 47 images,
        # alternates steps of 32 and 15). A set smaller than one batch is one batch either way.
        self.batch = min(batch_size, n_items)
        self.per_epoch = max(1, n_items // self.batch if drop_last else -(-n_items // self.batch))
        self.rank, self.world = rank, world_size

    def global_size(self, step: int) -> int:
        """Images in the global batch of `step` (the batch size, or less for a kept last partial batch)."""
        pos = step % self.per_epoch
        return min(self.batch, self.n - pos * self.batch)

    def global_batch(self, step: int) -> list[tuple[int, int]]:
        epoch, pos = divmod(step, self.per_epoch)
        g = torch.Generator().manual_seed(_mix(self.seed, epoch))
        perm = torch.randperm(self.n, generator=g)[pos * self.batch:(pos + 1) * self.batch].tolist()
        return [(i, _mix(self.seed, step, j)) for j, i in enumerate(perm)]

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        # a rank's share is empty when the step's global batch (a kept last partial batch, or a batch size below
        # the number of processes) has fewer images than there are ranks: the step still comes, so every rank
        # joins the step's collectives (collate_share gives (None, None))
        for step in range(self.start, self.total):
            yield self.global_batch(step)[self.rank::self.world]

    def __len__(self) -> int:
        return max(0, self.total - self.start)


class AugmentedImages(Dataset):
    """Items -> (augmented tensor, label); index is (item index, sample seed) from StepBatches."""

    def __init__(self, items: Sequence[Item], transform: Callable, reader: Callable) -> None:
        self.items, self.transform, self.reader = list(items), transform, reader

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, key: tuple[int, int]) -> tuple[torch.Tensor, int]:
        index, sample_seed = key
        item = self.items[index]
        image = self.reader(item.path)
        with torch.random.fork_rng(devices=[]):  # torchvision draws from the global CPU generator
            torch.manual_seed(sample_seed)
            return self.transform(image), item.label


def collate_share(batch: list[tuple[torch.Tensor, int]]) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(images (B, 3, H, W), labels (B,)) of this rank's share of a step; (None, None) for an empty share."""
    return default_collate(batch) if batch else (None, None)


def train_stream(items: Sequence[Item], transform: Callable, reader: Callable, batch_size: int, seed: int,
                 start: int, total: int, workers: int, rank: int = 0, world_size: int = 1,
                 pin_memory: bool = False, drop_last: bool = True) -> DataLoader:
    sampler = StepBatches(len(items), batch_size, seed, start, total, rank, world_size, drop_last)
    # A private generator: making the loader's iterator must not draw from the global RNG, which the adapters'
    # dropout reads (a resumed run would otherwise see shifted masks). Augmentation is seeded per sample.
    return DataLoader(AugmentedImages(items, transform, reader), batch_sampler=sampler, num_workers=workers,
                      collate_fn=collate_share, pin_memory=pin_memory, persistent_workers=False,
                      generator=torch.Generator().manual_seed(seed),
                      prefetch_factor=4 if workers > 0 else None)
