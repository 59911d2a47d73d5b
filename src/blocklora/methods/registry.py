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
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass


@dataclass(frozen=True)
class MethodRecord:
    name: str
    trains: str  # what is trained, in words (`blocklora params`, docs)
    merges: bool  # whether export merges it into the encoder weights
    module: str | None  # methods/ module holding the Head class (None: an adapter method, adapters/)
    paper: str  # the source of the method and its recipe
    views: bool = False  # trains on the features of augmented views of the shots (else on the plain features)
    other_classes: bool = False  # can score classes it was not trained on (cross-dataset, base-to-new)
    # the tensors its adapter folder holds (methods/io.py for the baselines; adapters/io.py's factors otherwise)
    saves: tuple[str, ...] = ()
    # how eval / predict score an image: the adapted towers' cosine (adapters) or the head's logits (baselines)
    scores: str = "s cos(image, class prompt) of the adapted towers"

    @property
    def is_adapter(self) -> bool:
        return self.module is None

    def head_class(self):
        """The Head subclass of a baseline (methods/base.py)."""
        if self.module is None:
            raise ValueError(f"{self.name} is an adapter method, not a head")
        module = importlib.import_module(f"{__package__}.{self.module}")
        return module.HEADS[self.name]


TIP_TENSORS = ("tip.keys", "tip.text", "tip.values")
TIP_SCORES = "s f T^T + alpha exp(-beta (1 - f F^T)) L on the frozen image feature f"
METHODS: dict[str, MethodRecord] = {r.name: r for r in (
    MethodRecord("block_lora", "Block-LoRA factors in the attention projections (A shared by n blocks)", True, None,
                 "docs/method.md", other_classes=True),
    MethodRecord("lora", "LoRA factors in the attention projections", True, None,
                 "Hu et al. 2022; CLIP-LoRA, Zanella & Ben Ayed 2024", other_classes=True),
    MethodRecord("probe", "a linear head (C x D weights + C biases) on the frozen image features, initialised from "
                 "the zero-shot classifier", False, "probe",
                 "CoOp's lpclip (Zhou et al. 2022, search of the L2 weight on val); zero-shot init as LP++ (Huang et "
                 "al. 2024) and CLAP (Silva-Rodriguez et al. 2024)", saves=("probe.bias", "probe.weight"),
                 scores="f W^T + b on the frozen image feature f"),
    MethodRecord("tip_adapter", "nothing (a cache of the K-shot features; alpha and beta searched on val)", False,
                 "tip_adapter", "Tip-Adapter, Zhang et al. 2022 (github.com/gaopengcuhk/Tip-Adapter)", views=True,
                 saves=TIP_TENSORS, scores=TIP_SCORES),
    MethodRecord("tip_adapter_f", "the cache keys (N_shots x D)", False, "tip_adapter",
                 "Tip-Adapter-F, Zhang et al. 2022 (github.com/gaopengcuhk/Tip-Adapter)", views=True,
                 saves=TIP_TENSORS, scores=TIP_SCORES),
    MethodRecord("coop", "n_ctx context vectors of the text tower's token width, shared by all classes", False,
                 "coop", "CoOp, Zhou et al. 2022 (github.com/KaiyangZhou/CoOp)", views=True, other_classes=True,
                 saves=("coop.ctx",), scores="s cos(f, text tower of the prompts with the learned context)"),
)}


def record(name: str) -> MethodRecord:
    """The record of a method name (adapters/config.py has checked it)."""
    return METHODS[name]


def is_baseline(name: str) -> bool:
    return not METHODS[name].is_adapter
