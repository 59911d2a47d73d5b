"""RunResult: the schema of a run's results.json, for its one writer (api.run) and every reader (the CLI, summarize,
sweep, the demo, benchmarks/accuracy.py).

Accuracies are percentages in [0, 100] (top-1 over the evaluated images; mean_per_class: the mean of the per-class
top-1, engine/evaluate.summarize); times are seconds, memory MiB. The file is the dataclass's fields in order; the
optional protocol fields (zero-shot, base-to-new, cross-dataset) are left out when the run did not measure them,
and keys this version does not know (a later version's, or a tool's) are kept in `extra` and written back.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from ..errors import BlockLoRAError

_OMIT_NONE = {"omit_if_none": True}  # written only when measured


@dataclass(frozen=True, kw_only=True)
class RunResult:
    """What a run measured and how (results.json, its keys in this order). `from_json(to_json())` is the identity.

    Required: top1, shots, seed, dataset (every version wrote them); the rest is None / empty in earlier files."""

    blocklora_version: str | None = None
    # zero-shot, on the same images before training (eval.zero_shot); with the dataset's template (CoOp)
    zero_shot_top1: float | None = field(default=None, metadata=_OMIT_NONE)
    zero_shot_per_class: list[dict[str, Any]] | None = field(default=None, metadata=_OMIT_NONE)
    zero_shot_dataset_template_top1: float | None = field(default=None, metadata=_OMIT_NONE)
    top1: float  # adapted, on the trained classes' test images
    mean_per_class: float | None = None
    per_class: list[dict[str, Any]] = field(default_factory=list)  # {"class", "top1", "n"} per class
    n_test: int | None = None
    # base-to-new (data.classes = base): top1 is base_top1; harmonic mean 2bn / (b + n) (CoCoOp, Zhou et al. 2022)
    base_top1: float | None = field(default=None, metadata=_OMIT_NONE)
    new_top1: float | None = field(default=None, metadata=_OMIT_NONE)
    harmonic_mean: float | None = field(default=None, metadata=_OMIT_NONE)
    # cross-dataset / domain generalization (eval.datasets): target -> top-1, and n, classes, mean_per_class
    cross_dataset: dict[str, float] | None = field(default=None, metadata=_OMIT_NONE)
    cross_dataset_detail: dict[str, dict[str, Any]] | None = field(default=None, metadata=_OMIT_NONE)
    # measured on the saved adapter by a caller of api.run (`finish`): the demo's one evaluated image per class
    examples: list[dict[str, Any]] | None = field(default=None, metadata=_OMIT_NONE)
    trainable_params: int | None = None
    adapted_modules: int | None = None
    split_sha256: str | None = None
    split_file: str | None = None
    shots: int
    seed: int
    sampler: str | None = None
    # {"allowed", "used", "classes"}: whether classes with fewer images than shots were drawn with replacement
    replacement: dict[str, Any] | None = field(default=None, metadata=_OMIT_NONE)
    # {"used", "val_shots", "as" | "why"}: whether a validation set is used (pipeline/prepare.Prepared.validation)
    validation: dict[str, Any] | None = field(default=None, metadata=_OMIT_NONE)
    iters: int | None = None  # steps done
    skipped_steps: int | None = None  # non-finite losses skipped (train.nan_policy = skip)
    final_loss: float | None = None  # the last step's loss: its mean over the global batch (all ranks' samples)
    dataset: dict[str, Any]  # name, root, classes, classes_subset, n_train, n_test
    skipped_images: list[dict[str, str]] = field(default_factory=list)  # {"path", "reason"} (data.skip_bad_images)
    backbone: dict[str, Any] = field(default_factory=dict)  # Backbone.describe()
    device: str | None = None
    precision: str | None = None
    world_size: int | None = None
    wall_time_s: dict[str, float] = field(default_factory=dict)  # total, train, eval
    peak_memory: dict[str, float] = field(default_factory=dict)  # cpu_rss_mb, cuda_max_allocated_mb
    config: dict[str, Any] = field(default_factory=dict)  # RunConfig.to_dict() of the resolved config
    config_hash: str | None = None
    logits: dict[str, Any] = field(default_factory=dict)  # engine/logits.Logits.to_dict()
    extra: dict[str, Any] = field(default_factory=dict)  # keys this version does not know, kept as read

    @property
    def base_to_new(self) -> bool:
        return self.new_top1 is not None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name == "extra" or (value is None and f.metadata.get("omit_if_none")):
                continue
            out[f.name] = value
        return {**out, **self.extra}

    @classmethod
    def from_json(cls, data: Any, where: str = "results.json") -> RunResult:
        """Read a results.json object (of this or an earlier version). Raises BlockLoRAError naming `where` and the
        field when it is not one: not an object, no numeric top1, integer shots and seed, and dataset object, or a
        known field outside what it may hold (_FIELD_RULES: accuracies in [0, 100], shots 1..10000, counts >= 0, the
        objects and lists by type); null is accepted for every optional field."""
        if not isinstance(data, Mapping):
            raise BlockLoRAError(f"{where} is not a JSON object: not a blocklora results file")
        known = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        missing = [k for k in ("top1", "shots", "seed", "dataset") if k not in data]
        if missing:
            raise BlockLoRAError(f"{where} has no {missing[0]!r}: not a complete blocklora results file")
        for name, value in data.items():
            if name in _FIELD_CHECKS and not (value is None and name not in _REQUIRED) and \
                    not _FIELD_CHECKS[name](value):
                shown = repr(value) if len(repr(value)) <= 60 else repr(value)[:57] + "..."
                raise BlockLoRAError(f"{where}: {name} has the wrong type or value ({shown}): it must be "
                                     f"{_FIELD_RULES[name]}; the file is damaged")
        _check_config(data, where)
        return cls(**{k: v for k, v in data.items() if k in known},
                   extra={k: v for k, v in data.items() if k not in known})


_SECTIONS = ("adapter", "data", "train", "eval")


def _version(text: Any) -> tuple[int, ...] | None:
    """"0.1.0" -> (0, 1, 0); None for anything else."""
    parts = text.split(".") if isinstance(text, str) else []
    return tuple(int(p) for p in parts) if parts and all(p.isdigit() for p in parts) else None


def _check_config(data: Mapping[str, Any], where: str) -> None:
    """The recorded config is what summarize groups and labels runs by: it must be a config blocklora accepts
    (RunConfig.from_dict: every value of the right type and range; NaN, "x" or an unknown method refused). A file of
    this version must also hold the config's four sections and, with a config_hash, the config that hash names: a
    valid value edited after the run would otherwise file the run under another configuration, silently. A later
    version's config (another schema) is not judged. Raises BlockLoRAError naming `where` and the fault."""
    config = data.get("config")
    from .._version import __version__

    written, ours = _version(data.get("blocklora_version")), _version(__version__)
    if not config or (written is not None and ours is not None and written > ours):
        return
    from ..config.run_config import RunConfig

    current = written is not None and written == ours
    missing = [s for s in _SECTIONS if not isinstance(config.get(s), Mapping)]
    if current and missing:
        raise BlockLoRAError(f"{where}: config has no {missing[0]!r} section; the file is damaged")
    try:
        resolved = RunConfig.from_dict(config)
    except BlockLoRAError as e:
        raise BlockLoRAError(f"{where}: config: {e}; the file is damaged") from None
    except (TypeError, ValueError) as e:  # a dataclass given a value it cannot hold
        raise BlockLoRAError(f"{where}: config: {type(e).__name__}: {e}; the file is damaged") from None
    recorded = data.get("config_hash")
    if current and isinstance(recorded, str) and resolved.hash() != recorded:
        raise BlockLoRAError(f"{where}: config does not match its config_hash ({recorded}; the config recorded "
                             f"hashes to {resolved.hash()}): it was edited after the run; the file is damaged")


# -- what each field may hold: a reader (summarize, sweep, the CLI) trusts nothing beyond it --------------------------
_REQUIRED = ("top1", "shots", "seed", "dataset")


def _num(x: Any, lo: float = -math.inf, hi: float = math.inf) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and lo <= x <= hi


def _int(x: Any, lo: int = 0, hi: int = 2**63 - 1) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and lo <= x <= hi


def _percent(x: Any) -> bool:
    return _num(x, 0.0, 100.0)


def _str_map(values: Callable[[Any], bool]) -> Callable[[Any], bool]:
    return lambda x: isinstance(x, Mapping) and all(isinstance(k, str) and values(v) for k, v in x.items())


def _records(x: Any) -> bool:
    return isinstance(x, list) and all(isinstance(i, Mapping) for i in x)


def _dataset(x: Any) -> bool:
    return isinstance(x, Mapping) and isinstance(x.get("name"), str) and bool(x["name"].strip()) and \
        x.get("classes_subset", "all") in ("all", "base", "new")


_PERCENT_RULE = "a percentage (a finite number in [0, 100])"
_FIELD_RULES: dict[str, str] = {
    **dict.fromkeys(("top1", "mean_per_class", "zero_shot_top1", "zero_shot_dataset_template_top1", "base_top1",
                     "new_top1", "harmonic_mean"), _PERCENT_RULE),
    "shots": "an integer from 1 to 10000 (images per class)", "seed": "an integer from 0 to 2^63 - 1",
    **dict.fromkeys(("n_test", "trainable_params", "adapted_modules", "iters", "skipped_steps", "world_size"),
                    "an integer >= 0"),
    "final_loss": "a finite number",
    "dataset": "an object whose name is a non-empty string (classes_subset: all, base or new)",
    "cross_dataset": f"an object of dataset name -> {_PERCENT_RULE}",
    **dict.fromkeys(("wall_time_s", "peak_memory"), "an object of name -> a finite number >= 0 (or null)"),
    **dict.fromkeys(("backbone", "config", "logits", "replacement", "validation", "cross_dataset_detail"),
                    "an object"),
    **dict.fromkeys(("per_class", "skipped_images", "examples", "zero_shot_per_class"), "a list of objects"),
    **dict.fromkeys(("blocklora_version", "split_sha256", "split_file", "sampler", "device", "precision",
                     "config_hash"), "a string"),
}
_FIELD_CHECKS: dict[str, Callable[[Any], bool]] = {
    **dict.fromkeys(("top1", "mean_per_class", "zero_shot_top1", "zero_shot_dataset_template_top1", "base_top1",
                     "new_top1", "harmonic_mean"), _percent),
    "shots": lambda x: _int(x, 1, 10_000), "seed": _int,  # DataConfig's ranges (config/run_config.py, checks.py)
    **dict.fromkeys(("n_test", "trainable_params", "adapted_modules", "iters", "skipped_steps", "world_size"), _int),
    "final_loss": _num,
    "dataset": _dataset,
    "cross_dataset": _str_map(_percent),
    **dict.fromkeys(("wall_time_s", "peak_memory"), _str_map(lambda v: v is None or _num(v, 0.0))),
    **dict.fromkeys(("backbone", "config", "logits", "replacement", "validation", "cross_dataset_detail"),
                    lambda x: isinstance(x, Mapping)),
    **dict.fromkeys(("per_class", "skipped_images", "examples", "zero_shot_per_class"), _records),
    **dict.fromkeys(("blocklora_version", "split_sha256", "split_file", "sampler", "device", "precision",
                     "config_hash"), lambda x: isinstance(x, str)),
}
