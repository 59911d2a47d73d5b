"""One record per `--method`: what it trains, whether it merges, and how a run trains, saves, loads and scores it.

block_lora and lora inject adapters into the encoders (adapters/, engine/fit.py) and merge into the weights on
export. The baselines (this package) leave the encoders frozen and train on the frozen L2-normalised image features:

    probe          a linear head initialised from the zero-shot text classifier            probe.py
    tip_adapter    a cache of the K-shot features, training-free                            tip_adapter.py
    tip_adapter_f  the same cache with trainable keys                                       tip_adapter.py
    coop           learnable prompt context through the frozen text tower                   coop.py

A baseline's adapter folder holds its tensors in blocklora's adapter format (methods/io.py); nothing of it can be
merged into the encoders (a head or a cache is not a weight update; CoOp's context is an input, not a weight), so
`export` writes the frozen model with a note of what it leaves out (pipeline/trained.py).

Which config keys a method reads (`reads`) is part of its record: the one source for the commands that must not act
on a key a method ignores (train's warning, sweep's axes, summarize's grouping and tables, the model card).
"""

from __future__ import annotations

import importlib
from collections.abc import Iterable
from dataclasses import dataclass

# Keys every run reads whatever its method: the backbone, the data, the evaluation (the cell and the test set) and
# the template of the zero-shot classifier every run measures (eval.zero_shot).
EVERY_METHOD = ("model", "pretrained", "quick_gelu", "tokenizer", "device", "adapter.method", "train.template",
                "data.*", "eval.*")
# An adapter method reads every adapter and training key (adapters/, engine/fit.py); no baseline.* key.
ADAPTER_READS = ("adapter.*", "train.*")
# What a baseline reads of train.*: its zero-shot part's logit scale (methods/fit.py), the frozen
# encoders' precision and dtype when computing the features once, determinism; train.loss and train.init_adapter only
# to refuse what it cannot do (pipeline/prepare.py). The optimiser, schedule, steps, batch and augmentation keys are
# the adapters' (a baseline's own are baseline.*, its paper's recipe).
BASELINE_TRAIN = ("train.logit_scale", "train.loss", "train.init_adapter", "train.precision",
                  "train.frozen_dtype", "train.deterministic")


@dataclass(frozen=True)
class MethodRecord:
    name: str
    trains: str  # what is trained, in words (`blocklora params`, docs)
    merges: bool  # whether export merges it into the encoder weights
    module: str | None  # methods/ module holding the Head class (None: an adapter method, adapters/)
    paper: str  # the source of the method and its recipe
    # the config keys it reads besides EVERY_METHOD's ("section.*": a whole section): a baseline's baseline.* keys
    # are the ones its head's fit() reads (methods/*.py); baseline.views: it trains on augmented views of the shots
    # (features.py); baseline.search: it chooses hyper-parameters on the validation shots
    keys: tuple[str, ...] = ADAPTER_READS
    ignores: tuple[str, ...] = ()  # keys inside `keys`' sections that it does not read after all
    other_classes: bool = False  # can score classes it was not trained on (cross-dataset, base-to-new)
    # the tensors its adapter folder holds (methods/io.py for the baselines; adapters/io.py's factors otherwise)
    saves: tuple[str, ...] = ()
    # how eval / predict score an image: the adapted towers' cosine (adapters) or the head's logits (baselines)
    scores: str = "s cos(image, class prompt) of the adapted towers"

    @property
    def is_adapter(self) -> bool:
        return self.module is None

    @property
    def views(self) -> bool:
        """Whether it trains on the features of augmented views of the shots (else on the plain features)."""
        return self.reads("baseline.views")

    @property
    def searches(self) -> bool:
        """Whether it chooses hyper-parameters on the validation shots (baseline.search)."""
        return self.reads("baseline.search")

    def reads(self, key: str) -> bool:
        """Whether a run of this method reads the config key `key` ("train.lr", "adapter.n_blocks", "model")."""
        section = key.rpartition(".")[0]
        return key not in self.ignores and \
            any(p == key or (p.endswith(".*") and p[:-2] == section) for p in (*EVERY_METHOD, *self.keys))

    def head_class(self):
        """The Head subclass of a baseline (methods/base.py)."""
        if self.module is None:
            raise ValueError(f"{self.name} is an adapter method, not a head")
        module = importlib.import_module(f"{__package__}.{self.module}")
        return module.HEADS[self.name]


TIP_TENSORS = ("tip.keys", "tip.text", "tip.values")
TIP_SCORES = "s f T^T + alpha exp(-beta (1 - f F^T)) L on the frozen image feature f"
TIP_KEYS = (*BASELINE_TRAIN, "baseline.views", "baseline.search")
TRAINS_KEYS = ("baseline.method_lr", "baseline.epochs")  # tip_adapter_f's and coop's optimiser (their papers')
METHODS: dict[str, MethodRecord] = {r.name: r for r in (
    MethodRecord("block_lora", "Block-LoRA factors in the attention projections (A shared by n blocks)", True, None,
                 "docs/method.md", other_classes=True),
    # n_blocks = 1: the fold of a single chunk (sum or mean) and A's fan-in (its own width or d_in) are one thing
    # (adapters/core.py: fold_factor, init_factors)
    MethodRecord("lora", "LoRA factors in the attention projections", True, None,
                 "Hu et al. 2022; CLIP-LoRA, Zanella & Ben Ayed 2024", other_classes=True,
                 ignores=("adapter.fold", "adapter.a_init")),
    MethodRecord("probe", "a linear head (C x D weights + C biases) on the frozen image features, initialised from "
                 "the zero-shot classifier", False, "probe",
                 "CoOp's lpclip (Zhou et al. 2022, search of the L2 weight on val); zero-shot init as LP++ (Huang et "
                 "al. 2024) and CLAP (Silva-Rodriguez et al. 2024)", keys=(*BASELINE_TRAIN, "baseline.search"),
                 saves=("probe.bias", "probe.weight"), scores="f W^T + b on the frozen image feature f"),
    MethodRecord("tip_adapter", "nothing (a cache of the K-shot features; alpha and beta searched on val)", False,
                 "tip_adapter", "Tip-Adapter, Zhang et al. 2022 (github.com/gaopengcuhk/Tip-Adapter)", keys=TIP_KEYS,
                 saves=TIP_TENSORS, scores=TIP_SCORES),
    MethodRecord("tip_adapter_f", "the cache keys (N_shots x D)", False, "tip_adapter",
                 "Tip-Adapter-F, Zhang et al. 2022 (github.com/gaopengcuhk/Tip-Adapter)",
                 keys=(*TIP_KEYS, *TRAINS_KEYS), saves=TIP_TENSORS, scores=TIP_SCORES),
    MethodRecord("coop", "n_ctx context vectors of the text tower's token width, shared by all classes", False,
                 "coop", "CoOp, Zhou et al. 2022 (github.com/KaiyangZhou/CoOp)",
                 keys=(*BASELINE_TRAIN, "baseline.views", "baseline.n_ctx", "baseline.ctx_init", *TRAINS_KEYS),
                 other_classes=True, saves=("coop.ctx",),
                 scores="s cos(f, text tower of the prompts with the learned context)"),
)}


def record(name: str) -> MethodRecord:
    """The record of a method name (adapters/config.py has checked it)."""
    return METHODS[name]


def is_baseline(name: str) -> bool:
    return not METHODS[name].is_adapter


def reads(method: str, key: str) -> bool:
    """Whether a run of `method` reads the config key `key` (dotted, canonical: "train.lr"). A method name outside
    METHODS (a results.json of another version) reads every key: nothing of it is hidden or merged."""
    rec = METHODS.get(method)
    return True if rec is None else rec.reads(key)


def unread(method: str, keys: Iterable[str]) -> list[str]:
    """The keys of `keys` that `method` does not read, in their order, each once."""
    return [k for k in dict.fromkeys(keys) if not reads(method, k)]
