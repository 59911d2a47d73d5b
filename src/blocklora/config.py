"""Run configuration: frozen dataclasses with the reference recipe as defaults, key=value overrides, a stable hash.

    RunConfig
      model, pretrained, quick_gelu, device
      adapter: AdapterConfig   (method, r, n_blocks, alpha, dropout, placement; adapters/config.py)
      data:    DataConfig      (dataset, root, shots, seed, sampler, split file)
      train:   TrainConfig     (the CLIP-LoRA recipe: AdamW, cosine, 500 x K iterations, batch 32, fp16 AMP)
      eval:    EvalConfig

A config is a request: None (or "auto") means "not asked". RunConfig.resolved() fills those from a split file (the
truth about the images it lists: dataset, shots, seed, sampler, classes) and from the method's recipe defaults
(METHOD_DEFAULTS); runs, results.json and config.json hold the resolved config. docs/recipe.md lists every constant.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .adapters.config import ALIASES as ADAPTER_ALIASES
from .adapters.config import AdapterConfig
from .engine.logits import KINDS as LOSSES
from .errors import ConfigError

SAMPLERS = ("clip-lora", "coop")
PRECISIONS = ("auto", "fp32", "fp16", "bf16")
SCHEDULES = ("cosine", "constant")
CLASS_SUBSETS = ("all", "base", "new")
FROZEN_DTYPES = ("auto", "fp32", "autocast")
# What an unset data field means without a split file.
DATA_DEFAULTS: dict[str, Any] = {"dataset": "folder", "shots": 16, "seed": 1, "sampler": "clip-lora", "replace": True,
                                 "classes": "all"}
# Recipe constants whose default depends on the method. LoRA: CLIP-LoRA's values (MaxZanella/CLIP-LoRA: drop_last=False
# in datasets/utils.py, an nn.Dropout per LinearLoRA in loralib/layers.py, clip.load's fp16 weights on GPU). Block-LoRA
# has no reference code: its values are provisional until measured (benchmarks/accuracy.py --variant).
METHOD_DEFAULTS: dict[str, dict[str, Any]] = {
    "lora": {"train.drop_last": False, "train.frozen_dtype": "autocast", "adapter.dropout_mask": "per_projection"},
    "block_lora": {"train.drop_last": True, "train.frozen_dtype": "fp32", "adapter.dropout_mask": "shared"},
}


@dataclass(frozen=True)
class DataConfig:
    # None: the split file's value (split_file), else DATA_DEFAULTS's; an explicit value must agree with the file.
    dataset: str | None = None  # default "folder"
    root: str = ""
    shots: int | None = None  # default 16
    seed: int | None = None  # default 1; the draw's seed and the training seed
    sampler: str | None = None  # which peer's draw order to reproduce (README, "Sampling"); default "clip-lora"
    split_file: str | None = None  # reuse a drawn split instead of sampling: it decides the fields above
    replace: bool | None = None  # classes with fewer than `shots` images: draw with replacement (peers, the
    # default) or fail
    classes: str | None = None  # base-to-new: train on "base" (first half of sorted labels), "new", or "all" (default)
    skip_bad_images: bool = False  # drop unreadable images (recorded in results) instead of stopping
    workers: int = -1  # data-loading processes; -1 = min(8, cores - 1)

    def __post_init__(self) -> None:
        if self.shots is not None and self.shots < 1:
            raise ConfigError(f"shots must be >= 1, got {self.shots}")
        if self.sampler is not None and self.sampler not in SAMPLERS:
            raise ConfigError(f"unknown sampler {self.sampler!r}: use one of {', '.join(SAMPLERS)}")
        if self.classes is not None and self.classes not in CLASS_SUBSETS:
            raise ConfigError(f"unknown class subset {self.classes!r}: use one of {', '.join(CLASS_SUBSETS)}")


@dataclass(frozen=True)
class TrainConfig:
    lr: float = 2e-4
    weight_decay: float = 1e-2
    betas: tuple[float, float] = (0.9, 0.999)
    schedule: str = "cosine"  # cosine to min_lr, stepped every iteration (CLIP-LoRA), or constant
    min_lr: float = 1e-6
    warmup_iters: int = 0
    iters_per_shot: int = 500  # total iterations = iters_per_shot * shots unless `iters` is set
    iters: int | None = None
    batch_size: int = 32  # the global batch (split across processes under torchrun)
    # The epoch's last partial batch: dropped (True) or kept as a smaller step (False, CLIP-LoRA: drop_last=False
    # in its build_data_loader). None: the method's default (METHOD_DEFAULTS).
    drop_last: bool | None = None
    precision: str = "auto"  # autocast: auto = fp16 autocast + grad scaler on CUDA, fp32 on CPU
    # The frozen weights' dtype, which is also the residual streams' under autocast: "fp32", or "autocast" = the
    # autocast dtype (CLIP-LoRA on GPU: OpenAI's fp16 weights, fp16 residual streams); a no-op without autocast.
    # "auto": the method's default (METHOD_DEFAULTS).
    frozen_dtype: str = "auto"
    # Cosine-to-logit scale: a number (CLIP-LoRA uses 100 for CLIP), or "auto": the checkpoint's own learned
    # exp(logit_scale) (e.g. about 100 for OpenAI CLIP, about 110 for SigLIP; with train.loss=sigmoid, SigLIP's).
    logit_scale: float | str = 100.0
    # "softmax": cross-entropy over the classes (CLIP-LoRA); "sigmoid": SigLIP's loss, one sigmoid per class with the
    # checkpoint's logit bias (Zhai et al. 2023, eq. 1); SigLIP models only. predict's probabilities follow it.
    loss: str = "softmax"
    template: str = "a photo of a {}."
    aug_scale_min: float = 0.08  # RandomResizedCrop scale (aug_scale_min, 1)
    flip: bool = True
    grad_clip: float | None = None
    log_every: int = 10
    checkpoint_every: int = 200  # save the resumable run state every N steps (0: never; it is tiny)
    nan_policy: str = "stop"  # a non-finite loss: "stop" (keep the last good checkpoint) or "skip" the step
    deterministic: bool = False
    # Recompute each transformer block's activations in backward instead of keeping them: about a third more
    # compute for a peak that no longer grows with depth (BENCHMARKS.md, "Step cost"). For large towers on small GPUs.
    grad_checkpointing: bool = False

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ConfigError(f"unknown precision {self.precision!r}: use one of {', '.join(PRECISIONS)}")
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"unknown schedule {self.schedule!r}: use one of {', '.join(SCHEDULES)}")
        if self.logit_scale != "auto":
            try:
                ok = float(self.logit_scale) > 0
            except (TypeError, ValueError):
                ok = False
            if not ok:
                raise ConfigError(f"train.logit_scale must be a positive number or auto, got {self.logit_scale!r}")
            object.__setattr__(self, "logit_scale", float(self.logit_scale))
        if self.loss not in LOSSES:
            raise ConfigError(f"unknown loss {self.loss!r}: use one of {', '.join(LOSSES)}")
        if self.frozen_dtype not in FROZEN_DTYPES:
            raise ConfigError(f"unknown frozen_dtype {self.frozen_dtype!r}: use one of {', '.join(FROZEN_DTYPES)}")
        if self.nan_policy not in ("stop", "skip"):
            raise ConfigError(f"nan_policy must be stop or skip, got {self.nan_policy!r}")
        if self.batch_size < 1 or self.lr <= 0 or (self.iters is not None and self.iters < 1):
            raise ConfigError("batch_size and iters must be >= 1 and lr > 0")
        if "{}" not in self.template:
            raise ConfigError(f"template {self.template!r} has no '{{}}' where the class name goes")
        object.__setattr__(self, "betas", tuple(float(b) for b in self.betas))

    def total_iters(self, shots: int) -> int:
        return self.iters if self.iters is not None else self.iters_per_shot * shots


@dataclass(frozen=True)
class EvalConfig:
    zero_shot: bool = True  # also report the frozen model's accuracy (cached per backbone + dataset)
    dataset_templates: bool = False  # also report zero-shot with the per-dataset hand-made template (CoOp)
    batch_size: int = 128
    split: str = "test"
    # cross-dataset / domain generalization: also test the trained adapter on these datasets (read under data.root,
    # each with its own class names); results["cross_dataset"][name] = top-1
    datasets: tuple[str, ...] = ()
    # test on a fixed subset of this many images, evenly spaced through each evaluated split (class-balanced when
    # the split is sorted by class; the same images for every run and seed); None = every image
    limit: int | None = None

    def __post_init__(self) -> None:
        if self.split not in ("test", "val"):
            raise ConfigError(f"eval split must be test or val, got {self.split!r}")
        if self.limit is not None and self.limit < 1:
            raise ConfigError(f"eval.limit must be a positive number of images (or none for all), got {self.limit}")
        names = tuple(str(d).strip() for d in self.datasets if str(d).strip())
        if len(set(names)) != len(names):
            raise ConfigError(f"eval.datasets lists a dataset twice: {','.join(names)}")
        object.__setattr__(self, "datasets", names)


@dataclass(frozen=True)
class RunConfig:
    model: str = "ViT-B-16"
    pretrained: str | None = "openai"
    quick_gelu: str = "auto"
    tokenizer: str | None = None  # a local tokenizer folder, for models whose tokenizer comes from a hub (SigLIP)
    device: str = "auto"
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["adapter"] = self.adapter.to_dict()
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RunConfig:
        data = dict(data)
        sections = {"adapter": AdapterConfig, "data": DataConfig, "train": TrainConfig, "eval": EvalConfig}
        kwargs: dict[str, Any] = {}
        for key, value in data.items():
            if key in sections:
                kwargs[key] = value if isinstance(value, sections[key]) else _build(sections[key], value, key)
            elif key in {f.name for f in dataclasses.fields(cls)}:
                kwargs[key] = value
            else:
                raise ConfigError(f"unknown config key {key!r}")
        return cls(**kwargs)

    def resolved(self, split: Mapping[str, Any] | None = None) -> RunConfig:
        """The config a run uses: unset data fields from `split` (a split file's header: dataset, shots, seed,
        sampler, replace and, when known, classes) or DATA_DEFAULTS, unset recipe keys from METHOD_DEFAULTS.

        Raises ConfigError when an explicitly set data field contradicts the split file: the file lists the images,
        so its K, seed and sampler are what the run is.
        """
        data = {}
        for key, default in DATA_DEFAULTS.items():
            asked = getattr(self.data, key)
            if split is not None and key in split:
                if asked is not None and asked != split[key]:
                    raise ConfigError(f"the split file {self.data.split_file} was drawn with {key} {split[key]}, "
                                      f"but {key} {asked} was asked (data.{key}): drop that option (the split file "
                                      "decides) or draw a new split without --split-file")
                data[key] = split[key]
            else:
                data[key] = asked if asked is not None else default
        fill: dict[str, dict[str, Any]] = {"train": {}, "adapter": {}}
        for dotted, value in METHOD_DEFAULTS[self.adapter.method].items():
            section, _, name = dotted.partition(".")
            if getattr(getattr(self, section), name) in (None, "auto"):
                fill[section][name] = value
        return dataclasses.replace(self, data=dataclasses.replace(self.data, **data),
                                   train=dataclasses.replace(self.train, **fill["train"]),
                                   adapter=dataclasses.replace(self.adapter, **fill["adapter"]))

    def hash(self) -> str:
        """sha256 of the canonical JSON of everything that decides the result (not where it is written)."""
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:16]

    def with_overrides(self, overrides: Sequence[str]) -> RunConfig:
        """Apply "section.key=value" or "key=value" (when the key is unique across sections) strings."""
        tree = self.to_dict()
        for item in overrides:
            key, sep, raw = item.partition("=")
            key = key.strip()
            if not sep or not key:
                raise ConfigError(f"bad override {item!r}: write key=value, e.g. train.lr=1e-4")
            section, name = _locate(key)
            target = tree[section] if section else tree
            target[name] = _coerce(raw.strip(), _field_type(section, name), key)
        return RunConfig.from_dict(tree)


_SECTION_TYPES = {"adapter": AdapterConfig, "data": DataConfig, "train": TrainConfig, "eval": EvalConfig}


def _build(cls: type, value: Any, where: str) -> Any:
    if not isinstance(value, Mapping):
        raise ConfigError(f"config section {where!r} must be a mapping")
    if cls is AdapterConfig:
        return AdapterConfig.from_dict(value)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(value) - known)
    if unknown:
        raise ConfigError(f"unknown {where} option(s) {', '.join(unknown)}: known are {', '.join(sorted(known))}")
    return cls(**value)


def _locate(key: str) -> tuple[str | None, str]:
    top = {f.name for f in dataclasses.fields(RunConfig)} - set(_SECTION_TYPES)
    section, dot, name = key.rpartition(".")
    key = f"{section}{dot}{ADAPTER_ALIASES.get(name, name)}"  # names of earlier versions (adapter.blocks)
    if "." in key:
        section, _, name = key.partition(".")
        if section not in _SECTION_TYPES or name not in {f.name for f in dataclasses.fields(_SECTION_TYPES[section])}:
            raise ConfigError(f"unknown config key {key!r}: see `blocklora config` for every key")
        return section, name
    if key in top:
        return None, key
    hits = [s for s, cls in _SECTION_TYPES.items() if key in {f.name for f in dataclasses.fields(cls)}]
    if len(hits) != 1:
        what = "unknown" if not hits else f"ambiguous ({', '.join(h + '.' + key for h in hits)})"
        raise ConfigError(f"{what} config key {key!r}: write section.key, see `blocklora config`")
    return hits[0], key


def _field_type(section: str | None, name: str) -> Any:
    cls = _SECTION_TYPES[section] if section else RunConfig
    hints = typing.get_type_hints(cls)
    return hints[name]


def _coerce(raw: str, typ: Any, key: str) -> Any:
    """Parse an override's text by the field's annotated type."""
    options = typing.get_args(typ) if isinstance(typ, types.UnionType) or typing.get_origin(typ) is typing.Union \
        else (typ,)
    if type(None) in options and raw.lower() in ("none", "null", ""):
        return None
    for option in options:
        try:
            if option is bool:
                if raw.lower() in ("true", "1", "yes", "on"):
                    return True
                if raw.lower() in ("false", "0", "no", "off"):
                    return False
                continue
            if option is int:
                return int(raw)
            if option is float:
                return float(raw)
            if option is str:
                return raw
            origin = typing.get_origin(option)
            if origin is tuple:
                inner = typing.get_args(option)
                parts = [p for p in raw.strip("()[]").split(",") if p.strip()]
                conv = float if inner and inner[0] is float else (int if inner and inner[0] is int else str)
                return tuple(conv(p.strip()) for p in parts)
        except ValueError:
            continue
    raise ConfigError(f"bad value {raw!r} for {key}: expected {getattr(typ, '__name__', str(typ))}")
