"""Everything a run needs, built and checked before anything is written: `prepare(cfg)` -> Prepared.

Every user error of a run surfaces here (with the config's own checks, config.py, and the run directory's,
engine/rundir.py): dataset, classes and protocol, split file, backbone, adapter placement, images.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..backbones import Backbone, load_backbone
from ..config.run_config import RunConfig
from ..data import (
    DATASETS,
    DatasetSplits,
    Item,
    load_dataset,
    read_split_file,
    read_split_header,
    repeated_shots,
    sample_few_shot,
    subsample_classes,
    subsample_fewshot,
    verify_images,
)
from ..data.protocols import check_classes
from ..engine import evaluate as ev
from ..engine.logits import Logits
from ..engine.logits import resolve as resolve_logits
from ..engine.runtime import Runtime, make_runtime, seed_everything
from ..errors import ConfigError, DataError
from ..methods import is_baseline, record
from ..ownership import Protected, protected
from .evaluation import EvaluationPlan
from .trained import drop_unreadable

log = logging.getLogger("blocklora")


@dataclass
class Prepared:
    """Everything a run needs, built and validated before anything is written."""

    cfg: RunConfig  # resolved (RunConfig.resolved): what the run uses and records
    request: RunConfig  # as asked (None = unset): what --resume compares
    backbone: Backbone
    data: DatasetSplits  # classes as trained (all, or the base half)
    fewshot: Any  # data.fewshot.FewShotSplit as drawn (or read from the split file)
    train_items: list[Item]  # fewshot.train minus skipped unreadable images
    split_sha256: str | None  # of the split file given by the user
    plan: EvaluationPlan  # what is tested: the trained classes, base-to-new's new half, cross-dataset targets
    runtime: Runtime
    bad_images: dict[str, str]  # path -> why it was skipped, in the order found (before and during evaluation)
    modules: list[str]  # the adapted modules (injected, probed)
    logits: Logits  # scale, bias and kind (softmax | sigmoid) the run trains and predicts with
    repeated: list[dict[str, Any]]  # classes whose shots repeat images (drawn with replacement): fewshot.repeated_shots

    @property
    def validation(self) -> dict[str, Any]:
        """results.json's "validation": whether the run uses a validation set, and for what. A run tests its last
        step (no model selection), so the K-shot validation shots in split.json (drawn as the peers draw them, from a
        val split or, CLIP-LoRA's ImageNet rule, from classes with K + min(K, 4) images) are not used; only
        eval.split=val uses one, as the tested split."""
        if self.cfg.eval.split == "val":
            return {"used": True, "as": "the tested split (eval.split=val)", "val_shots": len(self.fewshot.val)}
        return {"used": False, "val_shots": len(self.fewshot.val),
                "why": "no model selection: the adapter of the last step is tested"}

    def skip_unreadable(self, found: list[tuple[str, str]], hint: str = "") -> None:
        """Images an evaluation pass could not decode: an error naming the first unless data.skip_bad_images, else
        recorded and left out of every later pass."""
        new = [(path, why) for path, why in found if path not in self.bad_images]
        if not new:
            return
        drop_unreadable([], new, self.cfg.data.skip_bad_images, hint)
        self.bad_images.update(new)
        self.plan = self.plan.without(set(self.bad_images))


def run_inputs(cfg: RunConfig) -> list[Protected]:
    """What a run reads, which clearing its --output must never touch (ownership.py)."""
    model_dir = cfg.model[3:] if cfg.model.startswith("hf:") else None
    return protected(("the dataset root (--root)", cfg.data.root),
                     ("the split file (--split-file)", cfg.data.split_file),
                     ("the pretrained weights (--pretrained)", cfg.pretrained),
                     ("the model folder (--model)", model_dir),
                     ("the tokenizer folder (--tokenizer)", cfg.tokenizer),
                     ("the initial adapter (--init-adapter)", cfg.train.init_adapter))


def absolute_paths(cfg: RunConfig, cwd: str | Path | None = None) -> RunConfig:
    """`cfg` with the paths it reads made absolute (the dataset root, split file, initial adapter, and the weights,
    tokenizer and hf: model folder when they are paths that exist): config.json's "config" then starts the same run
    from any folder; its "request" keeps what was typed, and "cwd" the folder it was typed in. `cwd`: the folder
    relative paths are read from (default: the current one; a resumed run's recorded "cwd", so it resumes from
    any folder)."""
    def absolute(value: str | None, must_exist: bool = False) -> str | None:
        if not value:
            return value
        path = Path(value).expanduser()
        if not path.is_absolute():
            path = (Path.cwd() if cwd is None else Path(cwd)) / path
        return value if must_exist and not path.exists() else str(path)

    model = cfg.model
    if model.startswith("hf:"):
        model = "hf:" + absolute(model[3:], must_exist=True)
    return dataclasses.replace(
        cfg, model=model, pretrained=absolute(cfg.pretrained, must_exist=True),
        tokenizer=absolute(cfg.tokenizer, must_exist=True),
        data=dataclasses.replace(cfg.data, root=absolute(cfg.data.root) or "",
                                 split_file=absolute(cfg.data.split_file)),
        train=dataclasses.replace(cfg.train, init_adapter=absolute(cfg.train.init_adapter)))


def resolve(cfg: RunConfig) -> tuple[RunConfig, DatasetSplits]:
    """The config the run uses (RunConfig.resolved: the split file's draw, the method's recipe; absolute_paths) and
    the full dataset.

    With a split file its dataset, shots, seed, sampler, replace and class subset (found by comparing its class
    names with the dataset's halves) are the run's; an explicit option that contradicts them is an error.
    """
    cfg = absolute_paths(cfg)
    if not cfg.data.split_file:
        cfg = cfg.resolved()
        return cfg, load_dataset(cfg.data.dataset, cfg.data.root, cfg.data.test_fraction)
    header = read_split_header(cfg.data.split_file)
    held = header.get("test_fraction")  # a flat folder's held-out test set is part of the draw's dataset
    if held is not None:
        if cfg.data.test_fraction not in (None, held):
            raise DataError(f"the split file {cfg.data.split_file} was drawn with test_fraction {held}, but "
                            f"{cfg.data.test_fraction} was asked: drop --test-fraction (the split file decides)")
        cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, test_fraction=held))
    if header.get("published"):  # another project's draw: the dataset is the user's to name
        if not cfg.data.dataset:
            raise DataError(f"the split file {cfg.data.split_file} ({header['published']} format) does not name its "
                            "dataset: pass --dataset and --root")
        draw = {k: header[k] for k in ("shots", "seed") if header[k] is not None}
        return cfg.resolved(draw), load_dataset(cfg.data.dataset, cfg.data.root, cfg.data.test_fraction)
    draw = {k: header[k] for k in ("shots", "seed", "sampler", "replace")}
    cfg.resolved(draw)  # a conflicting option fails before any dataset is read
    # The file names the dataset as read (DatasetSplits.name): a benchmark key, or a folder / CSV dataset's own name.
    key = cfg.data.dataset or (header["dataset"] if header["dataset"] in DATASETS else
                               "csv" if Path(cfg.data.root).is_file() else "folder")
    full = load_dataset(key, cfg.data.root, cfg.data.test_fraction)
    if full.name != header["dataset"]:
        raise DataError(f"the split file {cfg.data.split_file} was drawn from dataset {header['dataset']!r}, not "
                        f"{full.name!r}: use the split file of this dataset, or the matching --dataset/--root")
    draw["dataset"] = key
    subset = next((c for c in ("all", "base", "new") if subsample_classes(full, c).classnames == header["classnames"]),
                  None)  # None: read_split_file names the first differing class
    return cfg.resolved({**draw, **({"classes": subset} if subset else {})}), full


def prepare(cfg: RunConfig, rank: int = 0, world_size: int = 1, recorded_quick_gelu: bool | None = None) -> Prepared:
    """Resolve the config, build backbone, data and few-shot split and check that the adapter fits: every user
    error surfaces here. `recorded_quick_gelu`: the activation a resumed run started with."""
    runtime = make_runtime(cfg.device, cfg.train.precision, rank, world_size)
    if cfg.train.log == "tensorboard":  # an optional dependency: named before anything is read or written
        from ..engine.tensorboard import check_available

        check_available()
    request = cfg
    cfg, full = resolve(cfg)
    check_classes(full, "training", cfg.data.classes)
    data = subsample_classes(full, cfg.data.classes) if cfg.data.classes != "all" else full
    plan = EvaluationPlan.of(cfg, full, data)  # a missing cross-dataset target fails here
    if cfg.data.split_file:
        fewshot, sha = read_split_file(cfg.data.split_file, data)
    else:
        # CoCoOp draws the K shots over all classes, then keeps the base half: the same draws as peers.
        fewshot = sample_few_shot(full, cfg.data.shots, cfg.data.seed, cfg.data.sampler, cfg.data.replace)
        fewshot = subsample_fewshot(fewshot, len(full.classnames), cfg.data.classes)
        sha = None
    repeated = repeated_shots(fewshot, data)
    if repeated:  # the peers' draw (Dassl's repeat=True) does this silently; a user with few images wants to know
        shown = ", ".join(f"{r['class']!r} ({r['images']} images)" for r in repeated[:8])
        more = f" and {len(repeated) - 8} more" if len(repeated) > 8 else ""
        log.warning("warning: %d class(es) have fewer training images than the %d shots asked: %s%s; their shots "
                    "repeat images (drawn with replacement, recorded in results.json). Use fewer --shots, add images, "
                    "or data.replace=false to refuse such a draw", len(repeated), cfg.data.shots, shown, more)
    # text=True: a tokenizer out of reach fails first, before any weights are read
    backbone = load_backbone(cfg.model, cfg.pretrained, cfg.quick_gelu, recorded_quick_gelu, tokenizer=cfg.tokenizer,
                             text=True)
    logits = resolve_logits(cfg.train.logit_scale, cfg.train.loss, backbone.learned_logit_scale(),
                            backbone.learned_logit_bias(), backbone.name)
    # n_blocks vs widths, towers, layers, and a probe forward proving every adapter is called: fail before any
    # work. Seeded: the adapters' initial values are a function of the seed.
    seed_everything(cfg.data.seed)
    if is_baseline(cfg.adapter.method):  # a head or prompt context on the frozen model (methods/): no adapters
        if world_size > 1:
            raise ConfigError(f"method {cfg.adapter.method} trains on one process (its frozen features fit on one "
                              "device): run it without torchrun")
        modules = _baseline_checks(cfg, backbone, plan)
    else:
        modules = _inject(cfg, backbone)
    for warning in ev.prompt_collisions(data.classnames, cfg.train.template):
        log.warning("warning: %s", warning)
    test_items = [i for t in (plan.trained, plan.new) if t for i in t.items]
    if not test_items:
        raise DataError(f"dataset {data.name} at {data.root} has no {cfg.eval.split} images to evaluate on")
    # The few training shots are decoded in full (each is read many times). Test images are decoded once, by the
    # first evaluation pass, which reports every image it cannot use (skip_unreadable): when that pass is the
    # zero-shot one, before training, a file check is enough here; without it, headers are read before training.
    bad = verify_images(fewshot.train, data.image_reader, level="decode")
    test_level = "file" if cfg.eval.zero_shot else "header"
    bad += verify_images(test_items, data.image_reader, level=test_level)
    # cross-dataset / DG test sets (eval.datasets), first decoded after training: headers now
    for target in plan.cross:
        bad += verify_images(target.items, target.data.image_reader, level="header")
    train_items = list(fewshot.train)
    if bad:
        drop_unreadable([], bad, cfg.data.skip_bad_images)  # an error naming the first, unless skipping
        bad_paths = {p for p, _ in bad}
        train_items = [i for i in train_items if i.path not in bad_paths]
        plan = plan.without(bad_paths)
        if not train_items:
            raise DataError("every training image is unreadable: nothing to train on")
    return Prepared(cfg, request, backbone, data, fewshot, train_items, sha, plan, runtime, dict(bad), modules,
                    logits, repeated)



def _inject(cfg: RunConfig, backbone: Backbone) -> list[str]:
    """Inject the run's adapters (with the initial PEFT adapter, when given); returns the adapted module names."""
    initial = None
    if cfg.train.init_adapter:  # a PEFT LoRA adapter: checked against the run's placement and rank before injecting
        from ..interop.peft import read_peft_adapter

        initial = read_peft_adapter(cfg.train.init_adapter, backbone.model, cfg.adapter)[1]
    modules = backbone.inject(cfg.adapter)
    if initial is not None:
        from ..interop.peft import copy_factors

        copy_factors(backbone.model, initial)
    if cfg.train.grad_checkpointing:  # block-level: the adapters sit inside the checkpointed blocks
        backbone.set_grad_checkpointing(True)
    return modules


def _baseline_checks(cfg: RunConfig, backbone: Backbone, plan: EvaluationPlan) -> list[str]:
    """A baseline trains no encoder weight: freeze them all, and refuse what it cannot do (CoOp: a context or class
    prompt that does not fit the text tower, for every class list the run scores). Returns [] (no module is
    adapted)."""
    method = cfg.adapter.method
    if cfg.train.init_adapter:
        raise ConfigError(f"method {method} trains no LoRA adapter: drop --init-adapter (or train lora / block_lora)")
    if cfg.train.loss != "softmax":
        raise ConfigError(f"method {method} trains with its paper's softmax cross-entropy: drop train.loss="
                          f"{cfg.train.loss} (it applies to lora / block_lora)")
    rec = record(method)
    if not rec.other_classes and (cfg.data.classes != "all" or cfg.eval.datasets):
        what = "base-to-new (data.classes)" if cfg.data.classes != "all" else "cross-dataset (--eval-datasets)"
        raise ConfigError(f"method {method} has one output per trained class, so {what} evaluation, which scores "
                          "other classes, does not apply: use coop, lora or block_lora for it")
    for param in backbone.model.parameters():
        param.requires_grad_(False)
    if method == "coop":  # before any image is read: the same checks the head makes when it is built and scores
        from ..methods import coop

        coop.token_embedding(backbone)  # a text tower without a token embedding table
        _, n_ctx = coop.context(backbone, cfg.baseline.n_ctx, cfg.baseline.ctx_init)
        for target in plan.targets():
            coop.check_room(backbone, list(target.data.classnames), n_ctx)
    return []
