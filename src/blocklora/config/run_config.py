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
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import checks as c
from ..adapters.config import ALIASES as ADAPTER_ALIASES
from ..adapters.config import AdapterConfig
from ..checks import option
from ..choices import (
    ClassSubset,
    EvalSplit,
    FrozenDtype,
    Logger,
    Loss,
    NanPolicy,
    Precision,
    QuickGelu,
    Sampler,
    Schedule,
)
from ..errors import ConfigError
from .files import coerce, read_file
from .recipes import METHOD_DEFAULTS, RECIPES, recipe_overrides  # noqa: F401 - re-exported

# Allowed strings: the Literals of choices.py are the one source, read by these checks and the CLI (cli/flags.py).
SAMPLERS, CLASS_SUBSETS, PRECISIONS = typing.get_args(Sampler), typing.get_args(ClassSubset), typing.get_args(Precision)
LOSSES, SCHEDULES, FROZEN_DTYPES, NAN_POLICIES = typing.get_args(Loss), typing.get_args(Schedule), \
    typing.get_args(FrozenDtype), typing.get_args(NanPolicy)
EVAL_SPLITS = typing.get_args(EvalSplit)
MAX_SHOTS = 10_000  # images per class: beyond this "few-shot" is a typo (and 500 x K steps would never end)
MAX_ITERS = 10**9
# AdamW moves each weight by about lr per step whatever the gradient's size (Kingma & Ba 2015, sec. 2.1: the step is
# bounded by the learning rate), so lr is the per-step change of a LoRA factor. LoRA recipes use 1e-5 to 1e-2
# (CLIP-LoRA 2e-4); above 10 every factor moves by more than any trained weight is large in one step and the run
# diverges at once, after its folder is written. A generous bound, 1000x the largest rate in use.
MAX_LR = 10.0
# Options a resumed run may change: they do not change what is computed (the batches are a pure function of seed and
# step whatever the number of loader workers, engine/stream.py; evaluation accuracy does not depend on its batch) or
# only how progress is shown and how often the resumable state is saved.
RESUMABLE = ("device", "data.workers", "eval.batch_size", "train.log_every", "train.checkpoint_every", "train.log")
LOGGERS = typing.get_args(Logger)
# What an unset data field means without a split file.
DATA_DEFAULTS: dict[str, Any] = {"dataset": "folder", "shots": 16, "seed": 1, "sampler": "clip-lora", "replace": True,
                                 "classes": "all"}
@dataclass(frozen=True)
class DataConfig:
    # None: the split file's value (split_file), else DATA_DEFAULTS's; an explicit value must agree with the file.
    dataset: str | None = option(None, "imagenet, caltech101, oxford_pets, stanford_cars, oxford_flowers, food101, "
                                 "fgvc_aircraft, sun397, dtd, eurosat, ucf101, folder, csv, fashion-mnist, ...",
                                 flag="--dataset", shown="the split file's, else folder")
    root: str = option("", "datasets root (a folder; the CSV file for --dataset csv)", flag="--root",
                       shown="the current directory")
    shots: int | None = option(None, "images per class", flag="--shots", shown="the split file's, else 16")
    seed: int | None = option(None, "the few-shot draw's and the training's seed", flag="--seed",
                              shown="the split file's, else 1")
    sampler: Sampler | None = option(None, "which peer's draw order to reproduce (README, Sampling)",
                                     flag="--sampler", shown="the split file's, else clip-lora")
    split_file: str | None = option(None, "reuse a drawn split (the split.json of an earlier run): its dataset, "
                                    "shots, seed, sampler and classes are the run's, and the default schedule "
                                    "follows its K", flag="--split-file", shown="draw one")
    replace: bool | None = option(None, "classes with fewer than `shots` images: draw with replacement (as the "
                                  "peers do) or fail", shown="the split file's, else true")
    classes: ClassSubset | None = option(None, "train on all classes, or on the base half (base-to-new protocol: "
                                         "test base and new) or the new half of the sorted labels", flag="--classes",
                                         shown="the split file's, else all")
    test_fraction: float | None = option(None, "a folder dataset without test/ (torchvision's DIR/<class>/<images>): "
                                         "hold out this fraction of each class as the test set (the same images "
                                         "for every seed; recorded in results.json and split.json)",
                                         flag="--test-fraction", shown="the dataset's own test split")
    skip_bad_images: bool = option(False, "drop unreadable images (listed in results.json) instead of stopping",
                                   flag="--skip-bad-images")
    workers: int = option(-1, "data-loading processes; -1: min(8, cores - 1)", flag="--workers")

    def __post_init__(self) -> None:
        c.apply(self, "data", {
            "dataset": c.maybe(c.text(empty=False)), "root": c.text(),
            "shots": c.num(1, MAX_SHOTS, integer=True, optional=True), "seed": c.maybe(c.seed),
            "sampler": c.maybe(c.one_of(*SAMPLERS)), "split_file": c.text(optional=True),
            "replace": c.maybe(c.boolean), "classes": c.maybe(c.one_of(*CLASS_SUBSETS)),
            "test_fraction": c.num(0, 1, lo_open=True, hi_open=True, optional=True),
            "skip_bad_images": c.boolean, "workers": c.num(-1, 256, integer=True)})


@dataclass(frozen=True)
class TrainConfig:
    lr: float = option(2e-4, "AdamW learning rate (CLIP-LoRA)", flag="--lr")
    weight_decay: float = option(1e-2, "AdamW weight decay")
    betas: tuple[float, float] = option((0.9, 0.999), "AdamW's (beta1, beta2)")
    schedule: Schedule = option("cosine", "learning-rate schedule: cosine to min_lr, stepped every iteration "
                                "(CLIP-LoRA), or constant")
    min_lr: float = option(1e-6, "the cosine schedule's final learning rate")
    warmup_iters: int = option(0, "linear warm-up steps")
    iters_per_shot: int = option(500, "total steps = iters_per_shot x shots unless iters is set (CLIP-LoRA)")
    iters: int | None = option(None, "total training steps", flag="--iters", shown="500 x shots")
    batch_size: int = option(32, "the global batch (split across processes under torchrun)", flag="--batch-size")
    # The epoch's last partial batch: dropped (True) or kept as a smaller step (False, CLIP-LoRA: drop_last=False
    # in its build_data_loader). None: the method's default (METHOD_DEFAULTS).
    drop_last: bool | None = option(None, "drop the epoch's last partial batch (true) or keep it as a smaller step",
                                    shown="false for lora (CLIP-LoRA), true for block_lora")
    precision: Precision = option("auto", "autocast: auto = fp16 autocast + grad scaler on CUDA, fp32 on CPU",
                                  flag="--precision")
    # The frozen weights' dtype, which is also the residual streams' under autocast: "fp32", or "autocast" = the
    # autocast dtype (CLIP-LoRA on GPU: OpenAI's fp16 weights, fp16 residual streams); a no-op without autocast.
    frozen_dtype: FrozenDtype = option("auto", "the frozen weights' dtype under autocast: fp32, or the autocast "
                                       "dtype (CLIP-LoRA on GPU); auto: the method's default",
                                       shown="autocast for lora, fp32 for block_lora")
    # Cosine-to-logit scale: a number (CLIP-LoRA uses 100 for CLIP), or "auto": the checkpoint's own learned
    # exp(logit_scale) (e.g. about 100 for OpenAI CLIP, about 110 for SigLIP; with train.loss=sigmoid, SigLIP's).
    logit_scale: float | str = option(100.0, "cosine-to-logit scale: a number (CLIP-LoRA: 100), or auto: the "
                                      "checkpoint's own learned exp(logit_scale)")
    # "softmax": cross-entropy over the classes (CLIP-LoRA); "sigmoid": SigLIP's loss, one sigmoid per class with the
    # checkpoint's logit bias (Zhai et al. 2023, eq. 1); SigLIP models only. predict's probabilities follow it.
    loss: Loss = option("softmax", "softmax: cross-entropy over the classes (CLIP-LoRA); sigmoid: SigLIP's loss "
                        "(Zhai et al. 2023, eq. 1), SigLIP models only")
    template: str = option("a photo of a {}.", "prompt template, one '{}' where the class name goes")
    aug_scale_min: float = option(0.08, "RandomResizedCrop scale (aug_scale_min, 1)")
    flip: bool = option(True, "random horizontal flips")
    grad_clip: float | None = option(None, "clip the gradient norm to this value", shown="no clipping")
    log_every: int = option(10, "log the loss every N steps")
    checkpoint_every: int = option(200, "save the resumable run state every N steps (0: never; it is tiny)",
                                   flag="--checkpoint-every")
    nan_policy: NanPolicy = option("stop", "a non-finite loss: stop (keep the last good checkpoint) or skip the step")
    deterministic: bool = option(False, "bit-identical reruns (slower kernels on GPU)", flag="--deterministic")
    # Recompute each transformer block's activations in backward instead of keeping them: about a third more
    # compute for a peak that no longer grows with depth (BENCHMARKS.md, "Step cost"). For large towers on small GPUs.
    grad_checkpointing: bool = option(False, "recompute block activations in backward: less memory, about a third "
                                      "more compute", flag="--grad-checkpointing")
    # Start from a PEFT LoRA adapter trained elsewhere on the same backbone (interop/peft.py: same modules and rank).
    init_adapter: str | None = option(None, "start from a PEFT LoRA adapter folder trained elsewhere on the same "
                                      "backbone (same modules and rank)", flag="--init-adapter", shown="none")
    log: Logger = option("none", "extra progress records beside metrics.jsonl: tensorboard writes TensorBoard "
                         "scalars into RUN/tensorboard/", flag="--log")

    def __post_init__(self) -> None:
        c.apply(self, "train", {
            "lr": c.num(0, MAX_LR, lo_open=True), "weight_decay": c.num(0), "betas": _betas,
            "schedule": c.one_of(*SCHEDULES), "min_lr": c.num(0), "warmup_iters": c.num(0, MAX_ITERS, integer=True),
            "iters_per_shot": c.num(1, MAX_ITERS, integer=True),
            "iters": c.num(1, MAX_ITERS, integer=True, optional=True), "batch_size": c.num(1, 65536, integer=True),
            "drop_last": c.maybe(c.boolean), "frozen_dtype": c.one_of(*FROZEN_DTYPES),
            "precision": c.one_of(*PRECISIONS), "logit_scale": _logit_scale,
            "loss": c.one_of(*LOSSES), "template": c.template,
            "aug_scale_min": c.num(0, 1, lo_open=True), "flip": c.boolean,
            # a negative clip would make clip_grad_norm_ flip every gradient; 0 would zero them: training nothing
            "grad_clip": c.num(0, lo_open=True, optional=True), "log_every": c.num(1, integer=True),
            "checkpoint_every": c.num(0, integer=True), "nan_policy": c.one_of(*NAN_POLICIES),
            "deterministic": c.boolean, "grad_checkpointing": c.boolean,
            "init_adapter": c.text(optional=True), "log": c.one_of(*LOGGERS)})
        if self.min_lr > self.lr:
            raise ConfigError(f"train.min_lr ({self.min_lr:g}) is above train.lr ({self.lr:g}): the cosine schedule "
                              "would raise the learning rate; lower min_lr")
        if self.lr * self.weight_decay >= 1:  # AdamW's decay step w <- (1 - lr * wd) w (Loshchilov & Hutter 2019)
            raise ConfigError(f"train.weight_decay ({self.weight_decay:g}) times train.lr ({self.lr:g}) is >= 1: "
                              "AdamW's decay step w <- (1 - lr * weight_decay) w would zero or flip every weight; "
                              "use a weight decay below 1 / lr (CLIP-LoRA: 0.01)")

    def total_iters(self, shots: int) -> int:
        """Training steps: `iters` when set, else iters_per_shot x shots (CLIP-LoRA's 500 x K)."""
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
    zero_shot: bool = option(True, "also report the frozen model's accuracy (cached per backbone + dataset)",
                             flag="--zero-shot")
    dataset_templates: bool = option(False, "also report zero-shot with the dataset's hand-made template (CoOp)",
                                     flag="--dataset-templates")
    batch_size: int = option(128, "evaluation batch size (accuracy does not depend on it)")
    split: EvalSplit = option("test", "the split evaluated")
    # results["cross_dataset"][name] = top-1
    datasets: tuple[str, ...] = option((), "cross-dataset / domain generalization: also test the trained adapter on "
                                       "these datasets under --root (e.g. caltech101,dtd or imagenet_v2,"
                                       "imagenet_sketch,imagenet_a,imagenet_r)", flag="--eval-datasets",
                                       shown="none")
    # evenly spaced through each evaluated split: class-balanced when the split is sorted by class, the same images
    # for every run and seed
    limit: int | None = option(None, "test on a fixed subset of N images, evenly spaced through each evaluated "
                               "split (the same images for every run and seed)", flag="--limit",
                               aliases=("--test-images",), shown="every image")

    def __post_init__(self) -> None:
        c.apply(self, "eval", {"zero_shot": c.boolean, "dataset_templates": c.boolean,
                               "batch_size": c.num(1, 65536, integer=True), "split": c.one_of(*EVAL_SPLITS),
                               "limit": c.num(1, integer=True, optional=True)})
        if isinstance(self.datasets, str) or not isinstance(self.datasets, Sequence):
            raise ConfigError(f"eval.datasets must be a list of dataset names, got {self.datasets!r}")
        names = tuple(str(d).strip() for d in self.datasets if str(d).strip())
        if len(set(names)) != len(names):
            raise ConfigError(f"eval.datasets lists a dataset twice: {','.join(names)}")
        object.__setattr__(self, "datasets", names)


@dataclass(frozen=True)
class BaselineConfig:
    """The options of the few-shot baselines (adapter.method probe, tip_adapter, tip_adapter_f, coop; methods/).
    None: the method's published default (docs/recipe.md). Key=value overrides only (baseline.n_ctx=4)."""

    n_ctx: int = option(16, "CoOp: learnable context tokens (CoOp's default 16)")
    ctx_init: str = option("", "CoOp: initialise the context from these words' token embeddings (CoOp: 'a photo of a' "
                           "with n_ctx=4); empty: random normal, std 0.02")
    # not "lr": a bare `lr=...` override keeps meaning train.lr
    method_lr: float | None = option(None, "learning rate of tip_adapter_f (AdamW, paper 1e-3) or coop (SGD, paper "
                                     "0.002)", shown="the method's paper's")
    epochs: int | None = option(None, "training epochs of tip_adapter_f (paper 20) or coop (paper 50 at K=1, 100 at "
                                "K=2-4, 200 at K>=8)", shown="the method's paper's")
    views: int = option(10, "augmented views of each shot whose frozen features are computed once (Tip-Adapter's "
                        "augment_epoch 10); training epochs cycle through them")
    search: bool = option(True, "choose the method's hyper-parameters on the validation shots (the probe's penalty, "
                          "Tip-Adapter's alpha and beta), as the papers do")

    def __post_init__(self) -> None:
        c.apply(self, "baseline", {"n_ctx": c.num(1, 256, integer=True), "ctx_init": c.text(),
                                   "method_lr": c.num(0, MAX_LR, lo_open=True, optional=True),
                                   "epochs": c.num(1, 100_000, integer=True, optional=True),
                                   "views": c.num(1, 1000, integer=True), "search": c.boolean})


@dataclass(frozen=True)
class RunConfig:
    """One run's request (None / "auto": not asked, see resolved()); validated on construction (ConfigError)."""

    model: str = option("ViT-B-16", "open_clip name (ViT-B-16, ViT-B-32, ViT-L-14, ...), tiny-clip, effnet-minilm, "
                        "or hf:DIR_OR_ID", flag="--model")
    # "auto": the model's own default (backbones.default_pretrained: packaged, none, openai, the hf: folder), filled
    # in by resolved(); None: random weights
    pretrained: str | None = option("auto", "open_clip tag (openai, laion2b_s34b_b88k, ...), a local checkpoint "
                                    "file, none (random weights), or auto: by model, packaged for effnet-minilm, "
                                    "none for tiny-clip, the folder itself for hf:, openai for open_clip names that "
                                    "have OpenAI weights (others: pass one of their tags)", flag="--pretrained")
    quick_gelu: QuickGelu = option("auto", "QuickGELU MLP activation (OpenAI's CLIP weights need it). auto: from the "
                                   "tag's pretrained config, an OpenAI TorchScript archive, a blocklora export's "
                                   "metadata, a -quickgelu model name, else GELU", flag="--quick-gelu")
    tokenizer: str | None = option(None, "a local copy of the model's tokenizer, for models whose tokenizer comes "
                                   "from a hub (SigLIP's): the folder its save_pretrained wrote", flag="--tokenizer",
                                   shown="the model's own")
    device: str = option("auto", "auto, cpu, mps, cuda or cuda:N", flag="--device")
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    baseline: BaselineConfig = field(default_factory=BaselineConfig)

    def __post_init__(self) -> None:
        c.apply(self, "", {"model": c.text(empty=False), "pretrained": c.text(optional=True),
                           "quick_gelu": c.one_of(*typing.get_args(QuickGelu)), "device": c.device})
        # unset shots (a split file's or the default) are checked when resolved() rebuilds the config with them
        total = self.train.total_iters(self.data.shots) if self.data.shots is not None else None
        if total is not None and self.train.warmup_iters >= total:
            raise ConfigError(f"train.warmup_iters ({self.train.warmup_iters}) is not below the {total} training steps:"
                              " the learning rate would never leave warm-up; lower it")

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["adapter"] = self.adapter.to_dict()
        if out["data"]["test_fraction"] is None:  # unset: left out, so configs (and hashes) of earlier runs hold
            del out["data"]["test_fraction"]
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RunConfig:
        data = dict(data)
        sections = {"adapter": AdapterConfig, "data": DataConfig, "train": TrainConfig, "eval": EvalConfig,
                    "baseline": BaselineConfig}
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
            from ..backbones import default_pretrained  # lazily: the backbones import the model libraries

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
        given: set[str] = set()
        for item in overrides:
            key, sep, raw = item.partition("=")
            key = key.strip()
            if not sep or not key:
                raise ConfigError(f"bad override {item!r}: write key=value, e.g. train.lr=1e-4")
            section, name = _locate(key)
            target = tree[section] if section else tree
            target[name] = coerce(raw.strip(), _field_type(section, name), key)
            given.add(f"{section}.{name}" if section else name)
        if "adapter.method" in given and "adapter.n_blocks" not in given and \
                self.adapter.n_blocks == AdapterConfig(method=self.adapter.method).n_blocks:
            tree["adapter"]["n_blocks"] = None  # the old method's default, not a choice: the new method's default
        return RunConfig.from_dict(tree)

    @classmethod
    def from_file(cls, path: str | Path) -> RunConfig:
        """A config from a JSON or TOML (*.toml) file of sections ({"train": {"lr": 1e-4}, ...}; missing keys take
        their defaults), or a run's own config.json (its resolved "config": the run again, with the same hash).

        Raises ConfigError naming the file for a missing or unreadable file and for an unknown or bad key."""
        path = Path(path)
        data = read_file(path)
        if isinstance(data, Mapping) and "config" in data and "config_hash" in data:
            data = data["config"]  # a run directory's config.json
        if not isinstance(data, Mapping):
            raise ConfigError(f"{path} must hold a mapping of config sections, got {type(data).__name__}")
        try:
            return cls.from_dict(data)
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from None




def _flat(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in tree.items():
        if isinstance(v, Mapping) and k in _SECTION_TYPES:
            out.update(_flat(v, f"{k}."))
        else:
            out[prefix + k] = v
    return out


_SECTION_TYPES = {"adapter": AdapterConfig, "data": DataConfig, "train": TrainConfig, "eval": EvalConfig,
                  "baseline": BaselineConfig}


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


def canonical_key(key: str) -> str:
    """"lr" -> "train.lr", "adapter.blocks" -> "adapter.layers"; ConfigError for an unknown or ambiguous key."""
    section, name = _locate(key.strip())
    return f"{section}.{name}" if section else name


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
