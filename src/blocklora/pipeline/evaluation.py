"""What a run tests, and its two evaluation steps: the frozen model before training, the adapted one after.

    EvaluationPlan
      trained  the trained classes (all, or the base half under base-to-new) on eval.split, cut to eval.limit
      new      base-to-new only: the unseen half, tested with the same adapter (CoCoOp, Zhou et al. 2022)
      cross    eval.datasets: the adapter as trained on other datasets, each with its own class names encoded with
               the training template (CoOp's cross-dataset and domain-generalization protocols: ImageNet -> the
               other 10 datasets; ImageNet -> ImageNet-V2/-Sketch/-A/-R, A and R scored over their 200 classes),
               read under data.root (CoOp's $DATA holds them all)

Accuracies are percentages (engine/evaluate.summarize). Images a pass cannot decode go to `on_unreadable` (the
run's Prepared.skip_unreadable: an error, or recorded and left out of every later pass).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, Literal

from ..backbones import Backbone
from ..config.run_config import RunConfig
from ..data import DatasetSplits, limit_split, load_dataset, subsample_classes
from ..engine import evaluate as ev
from ..engine.evaluate import Features
from ..engine.runtime import Runtime
from ..errors import DataError

Unreadable = Callable[[list[tuple[str, str]]], None]


@dataclass(frozen=True)
class Target:
    """One dataset a run is tested on."""

    role: Literal["trained", "new", "cross"]
    data: DatasetSplits  # its class names and reader; the evaluated split limited, unreadable images dropped
    split: str  # "test" or "val" (eval.split)

    @property
    def name(self) -> str:
        return self.data.name

    @property
    def items(self) -> list[Any]:
        return getattr(self.data, self.split)

    def without(self, bad: set[str]) -> Target:
        keep = lambda items: [i for i in items if i.path not in bad]  # noqa: E731
        return replace(self, data=replace(self.data, train=keep(self.data.train), val=keep(self.data.val),
                                          test=keep(self.data.test)))

    def accuracy(self, backbone: Backbone, template: str, runtime: Runtime, batch_size: int, workers: int,
                 features: Features | None = None) -> dict[str, Any]:
        desc = {"trained": "eval", "new": "eval new"}.get(self.role, f"eval {self.name}")
        return ev.accuracy(backbone, self.items, self.data.image_reader, self.data.classnames, [template], runtime,
                           batch_size, workers, desc, features=features, keep=self.role == "trained")


@dataclass(frozen=True)
class EvaluationPlan:
    trained: Target
    new: Target | None = None
    cross: tuple[Target, ...] = ()

    @classmethod
    def of(cls, cfg: RunConfig, full: DatasetSplits, data: DatasetSplits) -> EvaluationPlan:
        """The plan of a resolved config: `full` is the whole dataset, `data` its trained classes. Every problem
        with a cross-dataset target (missing, no images in the split) raises DataError here, before any work."""
        split, limit = cfg.eval.split, cfg.eval.limit
        new = None
        if cfg.data.classes == "base":  # base-to-new: the same adapter is also tested on the unseen half
            new = Target("new", limit_split(subsample_classes(full, "new"), split, limit), split)
        cross = []
        for name in cfg.eval.datasets:
            try:
                target = load_dataset(name, cfg.data.root)
            except DataError as e:
                raise DataError(f"eval dataset {name} (--eval-datasets): {e}") from None
            if not getattr(target, split):
                raise DataError(f"eval dataset {name} at {target.root} has no {split} images: drop it from "
                                "--eval-datasets")
            cross.append(Target("cross", limit_split(target, split, limit), split))
        return cls(Target("trained", limit_split(data, split, limit), split), new, tuple(cross))

    def targets(self) -> tuple[Target, ...]:
        return (self.trained, *([self.new] if self.new else []), *self.cross)

    def without(self, bad: set[str]) -> EvaluationPlan:
        """The plan with the images at the paths `bad` left out everywhere."""
        return EvaluationPlan(self.trained.without(bad), self.new.without(bad) if self.new else None,
                              tuple(t.without(bad) for t in self.cross))


@dataclass(frozen=True)
class ZeroShot:
    """The frozen model on the trained classes' test images (before any training; cached per input)."""

    top1: float
    per_class: list[dict[str, Any]]
    dataset_template_top1: float | None  # with the dataset's hand-made template (eval.dataset_templates, CoOp)
    cached: bool
    features: Features | None  # the frozen image features, when a text-only adapter can reuse them after training
    seconds: float


def zero_shot(backbone: Backbone, plan: EvaluationPlan, cfg: RunConfig, runtime: Runtime, workers: int,
              on_unreadable: Unreadable) -> ZeroShot:
    """Zero-shot accuracy with the training template (and, with eval.dataset_templates, the dataset's own, on the
    same decoded images). Its pass is also the first decode of the test images: unreadable ones surface here."""
    t0 = time.perf_counter()
    target, template = plan.trained, cfg.train.template
    # the image features do not change in training (a text-only adapter, a baseline's frozen encoder): keep them
    from ..methods import is_baseline

    text_only = "vision" not in cfg.adapter.towers or is_baseline(cfg.adapter.method)
    zs, features = ev.zero_shot(backbone, target.data, target.items, [template], runtime, cfg.eval.batch_size,
                                workers, need_features=text_only, split=target.split)
    on_unreadable(zs["unreadable"])
    own = None
    if cfg.eval.dataset_templates and target.data.template != template:
        own, features = ev.zero_shot(backbone, target.data, target.items, [target.data.template], runtime,
                                     cfg.eval.batch_size, workers, features=features, split=target.split)
    return ZeroShot(zs["top1"], zs["per_class"], own["top1"] if own else None, bool(zs.get("cached")),
                    features if text_only else None, time.perf_counter() - t0)


@dataclass(frozen=True)
class Evaluation:
    """The adapted model on every target of the plan (the last iterate: no model selection on the test set)."""

    trained: dict[str, Any]  # engine/evaluate.summarize: top1, n, mean_per_class, per_class
    new: dict[str, Any] | None
    cross: dict[str, dict[str, Any]]  # target name -> summarize
    seconds: float

    @property
    def harmonic_mean(self) -> float | None:
        """Base-to-new's harmonic mean 2bn / (b + n) of base and new top-1 (CoCoOp, Zhou et al. 2022)."""
        if self.new is None:
            return None
        b, n = self.trained["top1"], self.new["top1"]
        return round(2 * b * n / (b + n), 4) if b + n else 0.0


def evaluate(backbone: Backbone, plan: EvaluationPlan, cfg: RunConfig, runtime: Runtime, workers: int,
             on_unreadable: Unreadable, features: Features | None = None) -> Evaluation:
    """Every target with the training template. `features`: the trained target's frozen image features, reused
    when only the text tower was adapted."""
    t0 = time.perf_counter()

    def measured(target: Target, reuse: Features | None = None) -> dict[str, Any]:
        result = target.accuracy(backbone, cfg.train.template, runtime, cfg.eval.batch_size, workers, reuse)
        on_unreadable(result["unreadable"])
        return result

    trained = measured(plan.trained, features)
    new = measured(plan.new) if plan.new else None
    cross = {t.name: measured(t) for t in plan.cross}
    return Evaluation(trained, new, cross, time.perf_counter() - t0)
