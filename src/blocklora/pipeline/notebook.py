"""The Python API of the whole job, for notebooks and scripts: train a run, load it, classify images.

    blocklora.train(output, dataset=..., root=..., shots=..., **options) -> RunResult    (what `blocklora train` does)
    blocklora.load_trained(path) -> Classifier                                            (a run folder or its adapter/)
    Classifier.predict(images, topk=5) -> [{"class", "prob", "top": [{"class", "index", "prob"}, ...]}, ...]

`train` is `blocklora train` with keyword arguments: the named options of the command line, `recipe` ("reference"
or "quick"), and any config key as `overrides={"train.lr": 1e-3}`; it writes the same run folder and raises the
same BlockLoRAError subclasses (ConfigError, DataError, ...) where the command prints `error:`. A Classifier holds the
backbone with its adapter and the class names, template and logits the run trained with, so its probabilities are
`blocklora predict`'s (softmax over the classes, or SigLIP's per-class sigmoid).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from ..config.recipes import recipe_overrides
from ..config.run_config import RunConfig
from ..engine.results import RunResult
from ..errors import ConfigError

# keyword -> config key, as the command line's flags name them
_OPTIONS = {"model": "model", "pretrained": "pretrained", "dataset": "data.dataset", "root": "data.root",
            "shots": "data.shots", "seed": "data.seed", "test_fraction": "data.test_fraction", "device": "device",
            "method": "adapter.method", "iters": "train.iters", "batch_size": "train.batch_size", "lr": "train.lr",
            "workers": "data.workers", "zero_shot": "eval.zero_shot", "limit": "eval.limit"}


def train(output: str | os.PathLike, *, recipe: str = "reference", overrides: Mapping[str, Any] | None = None,
          overwrite: bool = False, **options: Any) -> RunResult:
    """Train an adapter as `blocklora train --output OUTPUT ...` does and return its results (results.json).

    `options`: model, pretrained, dataset, root, shots, seed, test_fraction, device, method, iters, batch_size, lr,
    workers, zero_shot, limit; `overrides`: any other config key (`blocklora config` lists them). Raises ConfigError
    for an unknown option, and what the run raises (BlockLoRAError subclasses) before anything is written."""
    from .run import run

    unknown = sorted(set(options) - set(_OPTIONS))
    if unknown:
        raise ConfigError(f"blocklora.train got unknown option(s) {', '.join(unknown)}: use {', '.join(_OPTIONS)}, "
                          "or overrides={'section.key': value}")
    if overrides is not None and not isinstance(overrides, Mapping):
        raise ConfigError(f"overrides must map config keys to values, e.g. {{'adapter.n_blocks': 4}}, got "
                          f"{type(overrides).__name__}")
    words = recipe_overrides(recipe)
    words += [f"{_OPTIONS[k]}={_word(v)}" for k, v in options.items() if v is not None]
    words += [f"{k}={_word(v)}" for k, v in (overrides or {}).items()]
    cfg = RunConfig().with_overrides(words)
    if not cfg.data.dataset:
        raise ConfigError("blocklora.train needs dataset=... (folder, csv, fashion-mnist or a benchmark name)")
    return run(cfg, output, overwrite=overwrite)


def _word(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (list, tuple)):
        return ",".join(map(str, value))
    return str(value)


class Classifier:
    """A trained adapter on its backbone, ready to classify: `predict` returns each image's top classes."""

    def __init__(self, path: str | os.PathLike, device: str = "auto", pretrained: str | None = None) -> None:
        from ..engine import evaluate as ev
        from ..engine.logits import Logits
        from .trained import load_trained

        self.backbone, meta, self.runtime = load_trained(path, pretrained, device=device)
        run = meta["run"]
        self.classnames: list[str] = list(run["classnames"])
        self.template: str = run["template"]
        self.logits = Logits(run["logit_scale"], run["logit_bias"], run["loss"])
        with torch.no_grad():
            self._text = ev.encode_classes(self.backbone, self.classnames, [self.template], self.runtime)
        self._transform = self.backbone.eval_transform()

    def predict(self, images: Sequence[str | os.PathLike | Image.Image] | str | os.PathLike | Image.Image,
                topk: int = 5, batch_size: int = 64) -> list[dict[str, Any]]:
        """One dict per image, in order: "class" and "prob" of the best class and "top", the `topk` best
        ({"class", "index", "prob"}). Images are file paths (read as `blocklora predict` reads them: EXIF
        orientation applied) or PIL images; topk above the class count gives every class. Raises DataError for a
        file that cannot be read, ConfigError for anything else in `images` or a topk / batch_size below 1."""
        from ..data.types import open_image_file
        from .trained import _top

        if isinstance(images, (str, os.PathLike, Image.Image)):
            images = [images]
        images = list(images)
        bad = [i for i in images if not isinstance(i, (str, os.PathLike, Image.Image))]
        if bad:
            raise ConfigError(f"predict takes image file paths or PIL images, got {type(bad[0]).__name__}: open or "
                              "convert it first (e.g. torchvision.transforms.functional.to_pil_image)")
        if isinstance(topk, bool) or not isinstance(topk, int) or topk < 1:
            raise ConfigError(f"topk must be an integer >= 1, got {topk!r}")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ConfigError(f"batch_size must be an integer >= 1, got {batch_size!r}")
        out: list[dict[str, Any]] = []
        with torch.no_grad():
            for start in range(0, len(images), batch_size):
                chunk = images[start:start + batch_size]
                pixels = [self._transform(i.convert("RGB") if isinstance(i, Image.Image) else
                                          open_image_file(str(Path(i)))) for i in chunk]
                for row in _top(self.backbone, getattr(self.backbone, "head", None), self.runtime, pixels,
                                self._text, self.logits, self.classnames, topk):
                    best = row["top"][0]
                    out.append({"class": best["class"], "prob": best["prob"], "top": row["top"]})
        return out


def load_trained(path: str | os.PathLike, device: str = "auto", pretrained: str | None = None) -> Classifier:
    """A trained adapter (a run folder, or its adapter/ folder) ready to classify images (Classifier). `pretrained`:
    where the backbone weights are now, when they moved since training."""
    return Classifier(path, device, pretrained)
