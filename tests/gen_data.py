"""Generated image datasets for end-to-end tests: classes that a model can learn (distinct colours and shapes)."""

from __future__ import annotations

import random
from pathlib import Path

from PIL import Image, ImageDraw

COLOURS = {"red_apple": (220, 30, 30), "green_leaf": (30, 180, 40), "blue_sky": (40, 60, 230),
           "yellow_sun": (240, 220, 30), "black_cat": (10, 10, 10)}


def draw(colour: tuple[int, int, int], rng: random.Random, size: int = 40) -> Image.Image:
    bg = tuple(rng.randint(100, 160) for _ in range(3))
    im = Image.new("RGB", (size, size), bg)
    d = ImageDraw.Draw(im)
    x0, y0 = rng.randint(0, size // 3), rng.randint(0, size // 3)
    x1, y1 = rng.randint(2 * size // 3, size), rng.randint(2 * size // 3, size)
    jitter = tuple(max(0, min(255, c + rng.randint(-20, 20))) for c in colour)
    d.rectangle([x0, y0, x1, y1], fill=jitter)
    return im


def make_folder_dataset(root: Path, n_classes: int = 4, train_per_class: int = 8, test_per_class: int = 6,
                        val_per_class: int = 0, seed: int = 0) -> Path:
    """root/train/<class>/*.png, root/test/<class>/*.png (and root/val) with learnable classes."""
    rng = random.Random(seed)
    names = list(COLOURS)[:n_classes]
    for split, n in (("train", train_per_class), ("test", test_per_class), ("val", val_per_class)):
        for name in names:
            if not n:
                continue
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                draw(COLOURS[name], rng).save(folder / f"{i:03d}.png")
    return root
