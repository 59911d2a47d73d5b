"""The frozen image features a baseline trains on, computed once per run.

    plain  the shots and validation shots under the evaluation preprocessing, L2-normalised (the probe, the search
           of alpha / beta / the penalty)
    views  V augmented views of each shot (Tip-Adapter's augment_epoch loop: random resized crop (scale 0.5-1,
           Tip-Adapter's train transform) and horizontal flip), NOT normalised: Tip-Adapter averages the raw features
           of the views and normalises the mean (build_cache_model); epochs of Tip-Adapter-F and CoOp cycle through
           them (normalising each view) instead of decoding fresh crops every epoch

View v's crops are drawn from generators seeded by (seed, v): the same views for the same run and number of loader
workers (each worker draws from its own seeded stream, so another data.workers gives other, equally random, crops).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from ..backbones import Backbone
from ..data.images import ImageDataset, collate_reported
from ..data.types import Item
from ..engine.runtime import Runtime, eval_mode
from ..errors import DataError

VIEW_SCALE_MIN = 0.5  # Tip-Adapter main.py: RandomResizedCrop(size=224, scale=(0.5, 1), interpolation=BICUBIC)


@torch.no_grad()
def encode(backbone: Backbone, items: Sequence[Item], reader: Callable, transform: Callable, runtime: Runtime,
           batch_size: int, workers: int, seed: int | None = None) -> torch.Tensor:
    """(N, D) raw fp32 image features of `items` in order, under `transform` (its randomness seeded by `seed`)."""
    if not items:
        return torch.empty(0, 0)
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    loader = DataLoader(ImageDataset(items, transform, reader, report=True), batch_size=batch_size,
                        num_workers=workers, collate_fn=collate_reported, generator=generator,
                        worker_init_fn=_seed_worker if seed is not None else None)
    out = []
    with eval_mode(backbone.model), torch.random.fork_rng(devices=[]):
        if seed is not None:
            torch.manual_seed(seed)  # workers=0: the transforms draw from the main process's generator
        for images, _, bad in loader:
            if bad:  # the run checked every shot before training (prepare.py): a file changed since
                raise DataError(f"cannot read image {bad[0][0]}: {bad[0][1]}")
            with runtime.autocast():
                out.append(backbone.encode_images(images.to(runtime.device)).float())
    return torch.cat(out)


def _seed_worker(worker_id: int) -> None:
    import random

    seed = torch.initial_seed() % 2**32  # DataLoader seeds each worker from its generator: deterministic
    random.seed(seed)


def plain(backbone: Backbone, items: Sequence[Item], reader: Callable, runtime: Runtime, batch_size: int = 128,
          workers: int = 0) -> torch.Tensor:
    """(N, D) L2-normalised features under the evaluation preprocessing."""
    feats = encode(backbone, items, reader, backbone.eval_transform(), runtime, batch_size, workers)
    return F.normalize(feats, dim=-1) if feats.numel() else feats


def views(backbone: Backbone, items: Sequence[Item], reader: Callable, runtime: Runtime, n_views: int, seed: int,
          batch_size: int = 128, workers: int = 0) -> torch.Tensor:
    """(V, N, D) raw features of V augmented views of each item (Tip-Adapter's augment_epoch loop)."""
    transform = backbone.train_transform(VIEW_SCALE_MIN, flip=True)
    return torch.stack([encode(backbone, items, reader, transform, runtime, batch_size, workers,
                               seed=seed * 1000 + v) for v in range(n_views)])
