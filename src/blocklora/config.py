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

from . import checks as c
from .adapters.config import ALIASES as ADAPTER_ALIASES
from .adapters.config import AdapterConfig
from .engine.logits import KINDS as LOSSES
from .errors import ConfigError

SAMPLERS = ("clip-lora", "coop")
MAX_SHOTS = 10_000  # images per class: beyond this "few-shot" is a typo (and 500 x K steps would never end)
MAX_ITERS = 10**9
# Options a resumed run may change: they do not change what is computed (the batches are a pure function of seed and
# step whatever the number of loader workers, engine/stream.py; evaluation accuracy does not depend on its batch) or
# only how progress is shown and how often the resumable state is saved.
RESUMABLE = ("device", "data.workers", "eval.batch_size", "train.log_every", "train.checkpoint_every", "train.log")
LOGGERS = ("none", "tensorboard")  # train.log: extra progress records beside metrics.jsonl (engine/tensorboard.py)
PRECISIONS = ("auto", "fp32", "fp16", "bf16")
SCHEDULES = ("cosine", "constant")
CLASS_SUBSETS = ("all", "base", "new")
FROZEN_DTYPES = ("auto", "fp32", "autocast")
# What an unset data field means without a split file.
DATA_DEFAULTS: dict[str, Any] = {"dataset": "folder", "shots": 16, "seed": 1, "sampler": "clip-lora", "replace": True,
                                 "classes": "all"}
# Named recipes (--recipe NAME): a table of overrides applied before the user's own, so any option still changes one
# value. "reference": CLIP-LoRA's GPU recipe, the dataclass defaults (500 x K steps of batch 32, lr 2e-4;
# docs/recipe.md).
# "quick": the demo's CPU budget, a fixed 200 steps of batch 8 at lr 4e-3 with milder crops (aug_scale_min 0.5);
# measured on the offline model in benchmarks/accuracy.py (BENCHMARKS.md, "Accuracy"). demo.py takes its recipe from
# here.
RECIPES: dict[str, dict[str, Any]] = {
    "reference": {},
    "quick": {"train.iters": 200, "train.batch_size": 8, "train.lr": 4e-3, "train.aug_scale_min": 0.5},
}


def recipe_overrides(name: str) -> list[str]:
    """The key=value overrides of a named recipe (RECIPES). Raises ConfigError for an unknown name."""
    if name not in RECIPES:
        raise ConfigError(f"unknown recipe {name!r}: use one of {', '.join(RECIPES)}")
    return [f"{k}={v}" for k, v in RECIPES[name].items()]


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
        c.apply(self, "data", {
            "dataset": c.maybe(c.text(empty=False)), "root": c.text(),
            "shots": c.num(1, MAX_SHOTS, integer=True, optional=True), "seed": c.maybe(c.seed),
            "sampler": c.maybe(c.one_of(*SAMPLERS)), "split_file": c.text(optional=True),
            "replace": c.maybe(c.boolean), "classes": c.maybe(c.one_of(*CLASS_SUBSETS)),
            "skip_bad_images": c.boolean, "workers": c.num(-1, 256, integer=True)})


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
    # Start from a PEFT LoRA adapter trained elsewhere on the same backbone (peft_format.py: same modules and rank).
    init_adapter: str | None = None
    log: str = "none"  # LOGGERS: "tensorboard" also writes TensorBoard scalars (RUN/tensorboard/)

    def __post_init__(self) -> None:
        c.apply(self, "train", {
            "lr": c.num(0, lo_open=True), "weight_decay": c.num(0), "betas": _betas,
            "schedule": c.one_of(*SCHEDULES), "min_lr": c.num(0), "warmup_iters": c.num(0, MAX_ITERS, integer=True),
            "iters_per_shot": c.num(1, MAX_ITERS, integer=True),
            "iters": c.num(1, MAX_ITERS, integer=True, optional=True), "batch_size": c.num(1, 65536, integer=True),
            "drop_last": c.maybe(c.boolean), "frozen_dtype": c.one_of(*FROZEN_DTYPES),
            "precision": c.one_of(*PRECISIONS), "logit_scale": _logit_scale,
            "loss": c.one_of(*LOSSES), "template": c.template,
            "aug_scale_min": c.num(0, 1, lo_open=True), "flip": c.boolean,
            # a negative clip would make clip_grad_norm_ flip every gradient; 0 would zero them: training nothing
            "grad_clip": c.num(0, lo_open=True, optional=True), "log_every": c.num(1, integer=True),
            "checkpoint_every": c.num(0, integer=True), "nan_policy": c.one_of("stop", "skip"),
            "deterministic": c.boolean, "grad_checkpointing": c.boolean,
            "init_adapter": c.text(optional=True), "log": c.one_of(*LOGGERS)})
        if self.min_lr > self.lr:
            raise ConfigError(f"train.min_lr ({self.min_lr:g}) is above train.lr ({self.lr:g}): the cosine schedule "
                              "would raise the learning rate; lower min_lr")

    def total_iters(self, shots: int) -> int:
        return self.iters if self.iters is not None else self.iters_per_shot * shots


def _logit_scale(name: str, value: Any) -> float | str:
    """A positive number, or "auto": the checkpoint's own learned scale (engine/logits.py)."""
    return value if value == "auto" else float(c.number(name, value, c.Range(0, 1e4, lo_open=True)))


def _betas(name: str, value: Any) -> tuple[float, float]:
    """AdamW's (beta1, beta2), each in [0, 1)."""
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or len(value) != 2:
        raise ConfigError(f"{name} must be two numbers such as 0.9,0.999, got {value!r}")
    return tuple(c.number(name, float(b) if isinstance(b, int) and not isinstance(b, bool) else b,
                          c.Range(0, 1, hi_open=True)) for b in value)  # type: ignore[return-value]


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
        c.apply(self, "eval", {"zero_shot": c.boolean, "dataset_templates": c.boolean,
                               "batch_size": c.num(1, 65536, integer=True), "split": c.one_of("test", "val"),
                               "limit": c.num(1, integer=True, optional=True)})
        if isinstance(self.datasets, str) or not isinstance(self.datasets, Sequence):
            raise ConfigError(f"eval.datasets must be a list of dataset names, got {self.datasets!r}")
        names = tuple(str(d).strip() for d in self.datasets if str(d).strip())
        if len(set(names)) != len(names):
            raise ConfigError(f"eval.datasets lists a dataset twice: {','.join(names)}")
        object.__setattr__(self, "datasets", names)


@dataclass(frozen=True)
class RunConfig:
    model: str = "ViT-B-16"
    # "auto": the model's own default (backbones.default_pretrained: packaged, none, openai, the hf: folder), filled
    # in by resolved(); None: random weights
    pretrained: str | None = "auto"
    quick_gelu: str = "auto"
    tokenizer: str | None = None  # a local tokenizer folder, for models whose tokenizer comes from a hub (SigLIP)
    device: str = "auto"
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def __post_init__(self) -> None:
        c.apply(self, "", {"model": c.text(empty=False), "pretrained": c.text(optional=True),
                           "quick_gelu": c.one_of("auto", "yes", "no"), "device": c.device})
        # unset shots (a split file's or the default) are checked when resolved() rebuilds the config with them
        total = self.train.total_iters(self.data.shots) if self.data.shots is not None else None
        if total is not None and self.train.warmup_iters >= total:
            raise ConfigError(f"train.warmup_iters ({self.train.warmup_iters}) is not below the {total} training steps:"
                              " the learning rate would never leave warm-up; lower it")

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

        An unset ("auto") pretrained becomes the model's default (backbones.default_pretrained), which the run
        records. Raises ConfigError when an explicitly set data field contradicts the split file: the file lists the
        images, so its K, seed and sampler are what the run is; BackboneError when the model has no default weights.
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
        top: dict[str, Any] = {}
        if self.pretrained == "auto":
            from .backbones import default_pretrained  # lazily: the backbones import the model libraries

            top["pretrained"] = default_pretrained(self.model)
        return dataclasses.replace(self, **top, data=dataclasses.replace(self.data, **data),
                                   train=dataclasses.replace(self.train, **fill["train"]),
                                   adapter=dataclasses.replace(self.adapter, **fill["adapter"]))

    def hash(self) -> str:
        """sha256 of the canonical JSON of everything that decides the result (not where it is written)."""
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:16]

    def differences(self, other: RunConfig, ignore: Sequence[str] = RESUMABLE) -> list[tuple[str, Any, Any]]:
        """(key, this value, other value) for every key outside `ignore` whose values differ, in key order."""
        mine, theirs = _flat(self.to_dict()), _flat(other.to_dict())
        return [(k, mine.get(k), theirs.get(k)) for k in sorted(set(mine) | set(theirs))
                if k not in ignore and mine.get(k) != theirs.get(k)]

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




def _flat(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in tree.items():
        if isinstance(v, Mapping) and k in _SECTION_TYPES:
            out.update(_flat(v, f"{k}."))
        else:
            out[prefix + k] = v
    return out


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
