"""`--method coop`: learnable prompt context through the frozen text tower (CoOp, Zhou et al., IJCV 2022,
github.com/KaiyangZhou/CoOp, trainers/coop.py), unified context, class token at the end.

    prompt text    "X X ... X {class}."            n_ctx placeholders ("X"), then the class name and a period
    tokens         the family's own tokenizer: t = tokenize(prompt text); a prompt it would cut (the context and the
                   class name longer than the text context) is refused (check_room), as CoOp's clip.tokenize does
    embedding      E = token_embedding(t); E[:, start:start + n_ctx] = ctx      (C, L, width)
                   start = the number of tokens the tokenizer puts before the text (CLIP's SOT, BERT's [CLS]: 1;
                   SigLIP: 0); the rest of E (class name, ".", EOT, padding) is the frozen embedding of t
    text feature   the family's text tower on E, pooled where it pools t (CLIP: the EOT position t.argmax(-1);
                   BERT: the mean over the attention mask), projected
    logits         s f normalize(text)^T

The context replaces the embedding module's output through a forward hook, so every family's own encode_texts
(open_clip, transformers, effnet-minilm's MiniLM) runs unchanged: positions, masks, truncation and pooling are the
family's. ctx: (n_ctx, width) ~ N(0, 0.02^2) (CoOp: nn.init.normal_(ctx_vectors, std=0.02)), or, with ctx_init, the
token embeddings of those words (CoOp: "a photo of a", n_ctx = its number of tokens; words of no tokens are refused,
context()).

Recipe (configs/trainers/CoOp/*.yaml, Dassl's defaults, scripts/coop/main.sh): SGD lr 0.002, momentum 0.9, weight
decay 5e-4, batch 32, cosine over epochs (CosineAnnealingLR(T_max = epochs), stepped per epoch) after 1 warm-up
epoch at constant lr 1e-5; 50 epochs at K = 1, 100 at K = 2 or 4, 200 at K >= 8 (rn50_ep50 / _ep100 / rn50).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .. import checks
from ..backbones.base import move
from ..config.run_config import BaselineConfig
from ..data.layout import prompt_name
from ..errors import ConfigError
from .base import FitData, Head, cosine_lr, set_lr, train_epoch

LR, MOMENTUM, WEIGHT_DECAY, BATCH = 0.002, 0.9, 5e-4, 32  # CoOp configs OPTIM.LR; Dassl SGD defaults; TRAIN_X batch
WARMUP_EPOCHS, WARMUP_LR = 1, 1e-5  # OPTIM.WARMUP_EPOCH 1, WARMUP_TYPE constant, WARMUP_CONS_LR 1e-5
INIT_STD = 0.02  # nn.init.normal_(ctx_vectors, std=0.02)
EMBEDDING_NAMES = ("token_embedding", "word_embeddings", "embed_tokens")  # open_clip / HF CLIP, BERT, others


def epochs_for(shots: int) -> int:
    """CoOp's scripts/coop/main.sh: rn50_ep50 at 1 shot, rn50_ep100 at 2 and 4, rn50 (200 epochs) at 8 and 16."""
    return 50 if shots <= 1 else 100 if shots <= 4 else 200


def token_embedding(backbone) -> nn.Embedding:
    """The text tower's token embedding table (the module CoOp's prompts replace the output of)."""
    for name, module in backbone.model.named_modules():
        if isinstance(module, nn.Embedding) and name.rsplit(".", 1)[-1] in EMBEDDING_NAMES:
            return module
    raise ConfigError(f"coop needs the text tower's token embedding, and {backbone.name} has none named "
                      f"{' / '.join(EMBEDDING_NAMES)}: use another method for this model")


def prompt_texts(classnames: list[str], prefix: str) -> list[str]:
    """CoOp's prompts: prompt_prefix + " " + name + "." (name with "_" as spaces)."""
    return [f"{prefix} {prompt_name(c)}." for c in classnames]


def ids_of(tokens: Any) -> torch.Tensor:
    return tokens["input_ids"] if isinstance(tokens, dict) else tokens


def context_start(backbone) -> int:
    """How many tokens the tokenizer puts before the text: where "X" and "X X" first differ, minus one."""
    one, two = (ids_of(backbone.tokenize([t]))[0].tolist() for t in ("X", "X X"))
    return next(i for i, (a, b) in enumerate(zip(one, two)) if a != b) - 1


def count_tokens(backbone, texts: list[str]) -> list[int]:
    """Tokens of each text alone, as the family's tokenizer gives them (its special tokens and padding left out, its
    truncation applied); one tokenizer call for all."""
    start = context_start(backbone)
    bare = ids_of(backbone.tokenize(["", "X"]))[0].tolist()  # "" padded to "X": the padding id is among them
    special = set(bare[:start]) | set(bare[start:])
    return [sum(1 for i in row if i not in special) for row in ids_of(backbone.tokenize(list(texts))).tolist()]


def text_room(backbone) -> int:
    """How many tokens the text tower reads besides its special ones (CLIP: 77 - SOT - EOT = 75): the count of a
    text longer than any context, cut by the tokenizer's own truncation."""
    return count_tokens(backbone, [" ".join(["X"] * 1024)])[0]


def context(backbone, n_ctx: int, ctx_init: str = "") -> tuple[str, int]:
    """(the prompt prefix, the context length) of a CoOp head: ctx_init's words and their token count (CoOp: n_ctx =
    len(tokenize(ctx_init))), else n_ctx placeholders "X". Raises ConfigError for a ctx_init of no tokens, a context
    that fills the text tower's room, and a tokenizer that does not make one token of each "X"."""
    words = ctx_init.strip().replace("_", " ")
    if ctx_init and not words.strip():
        raise ConfigError(f"baseline.ctx_init {ctx_init!r} has no words: give the words to start the context from "
                          "(e.g. 'a photo of a'), or leave it empty for a random context of baseline.n_ctx vectors")
    room = text_room(backbone)
    if words:
        tokens = count_tokens(backbone, [words])[0]
        if tokens == 0:
            raise ConfigError(f"baseline.ctx_init {ctx_init!r} gives no tokens with {backbone.name}'s tokenizer (it "
                              "drops such characters): give words, e.g. 'a photo of a', or leave it empty for a "
                              "random context")
        if n_ctx != tokens and n_ctx != BaselineConfig().n_ctx:  # the default is CoOp's n_ctx for a random context
            raise ConfigError(f"baseline.n_ctx={n_ctx} and baseline.ctx_init {ctx_init!r} ({tokens} tokens with "
                              f"{backbone.name}'s tokenizer) disagree: a context from ctx_init has one vector per "
                              "token (CoOp); leave baseline.n_ctx out, or drop ctx_init for a random context of "
                              "n_ctx vectors")
        n_ctx = tokens
        if n_ctx >= room:
            raise ConfigError(f"baseline.ctx_init fills {backbone.name}'s text context ({room} tokens besides its "
                              "special ones) and leaves no room for the class names: shorten baseline.ctx_init")
        return words, n_ctx
    prefix = " ".join(["X"] * n_ctx)
    count = count_tokens(backbone, [prefix])[0]
    if n_ctx >= room:
        raise ConfigError(f"baseline.n_ctx={n_ctx} context tokens do not fit in {backbone.name}'s text context (at "
                          f"most {room} tokens besides its special ones, and the class names need some): lower "
                          "baseline.n_ctx")
    if count != n_ctx:
        raise ConfigError(f"{backbone.name}'s tokenizer does not make one token of each 'X': coop cannot place its "
                          "context; use another method for this model")
    return prefix, n_ctx


def check_room(backbone, classnames: list[str], n_ctx: int) -> None:
    """Refuse class names whose prompt "CONTEXT {name}." would not fit in the text tower's context: the tokenizer
    would cut the prompt (the class name, ".", and with CLIP's argmax pooling the feature is read at the cut), and
    CoOp's own clip.tokenize raises on such prompts. A name's tokens are counted alone ("{name}."): words are
    tokenized apart from each other, so the prompt is the context's tokens followed by these."""
    room = text_room(backbone) - n_ctx
    needs = count_tokens(backbone, [f"{prompt_name(c)}." for c in classnames]) if classnames else []
    longest, need = max(zip(classnames, needs), key=lambda x: x[1], default=("", 0))
    if need > room:
        raise ConfigError(f"coop's prompt for the class {longest!r} does not fit in {backbone.name}'s text context: "
                          f"the name takes {need} tokens and {max(room, 0)} are left beside the {n_ctx} context tokens "
                          f"({room + n_ctx} in all); lower baseline.n_ctx (or shorten baseline.ctx_init) or shorten "
                          "the class name")


class CoOpHead(Head):
    method = "coop"
    record_shapes = {"coop.ctx": ("n_ctx", "token_width")}
    record_fields = {"n_ctx": checks.num(1, 256, integer=True), "ctx_init": checks.text(),
                     "class_token_position": checks.one_of("end")}
    record_defaults = {"ctx_init": "", "class_token_position": "end"}

    def __init__(self, backbone, classnames: list[str], scale: float, n_ctx: int, ctx_init: str = "",
                 ctx: torch.Tensor | None = None) -> None:
        super().__init__()
        self.backbone, self.classnames, self.scale = backbone, list(classnames), float(scale)
        self.embedding = token_embedding(backbone)
        self.start = context_start(backbone)
        self.ctx_init = ctx_init.strip().replace("_", " ")
        width = self.embedding.weight.shape[1]
        self.prefix, n_ctx = context(backbone, n_ctx, ctx_init)
        self.n_ctx = n_ctx
        if ctx is None:
            if self.ctx_init:  # CoOp: embedding[0, 1:1 + n_ctx] of the tokenized ctx_init
                with torch.no_grad():
                    ids = ids_of(backbone.tokenize([self.ctx_init]))[0, self.start:self.start + n_ctx]
                    ctx = self.embedding(ids.to(self.embedding.weight.device)).float()
            else:
                ctx = torch.empty(n_ctx, width).normal_(0, INIT_STD)  # the run has seeded the generator
        self.ctx = nn.Parameter(ctx.detach().float().clone().to(self.embedding.weight.device))
        self._frozen_text: torch.Tensor | None = None

    def tokens(self, classnames: list[str]) -> Any:
        """The tokenized prompts, on the backbone's device. Raises ConfigError for a class name that does not fit
        beside the context (check_room)."""
        key = tuple(classnames)
        cache = self.__dict__.setdefault("_tokens", {})
        if key not in cache:  # every training step encodes the same prompts
            check_room(self.backbone, classnames, self.n_ctx)
            tokens = self.backbone.tokenize(prompt_texts(classnames, self.prefix))
            cache.clear()
            cache[key] = move(tokens, self.backbone.device)
        return cache[key]

    @contextlib.contextmanager
    def _context(self) -> Iterator[None]:
        start, n = self.start, self.n_ctx

        def hook(module, inputs, out):
            ctx = self.ctx.to(out.dtype).unsqueeze(0).expand(out.shape[0], -1, -1)
            return torch.cat([out[:, :start], ctx, out[:, start + n:]], dim=1)

        handle = self.embedding.register_forward_hook(hook)
        try:
            yield
        finally:
            handle.remove()

    def prompt_embeddings(self, classnames: list[str]) -> torch.Tensor:
        """(C, L, width) what the text tower reads: the token embeddings with the context in place (for tests)."""
        ids = ids_of(self.tokens(classnames))
        with self._context():
            return self.embedding(ids)

    def text_features(self, classnames: list[str] | None = None) -> torch.Tensor:
        """(C, D) normalised text features of the prompts with the learned context (grad flows to ctx)."""
        tokens = self.tokens(classnames or self.classnames)
        with self._context():
            return F.normalize(self.backbone.encode_texts(tokens).float(), dim=-1)

    def logits(self, feats: torch.Tensor) -> torch.Tensor:
        if self._frozen_text is None:  # the context is fixed outside fit(): its text features once
            with torch.no_grad():
                self._frozen_text = self.text_features()
        return self.scale * feats.float() @ self._frozen_text.T

    def for_classes(self, classnames: list[str]) -> CoOpHead:
        if list(classnames) == self.classnames:
            return self
        head = CoOpHead(self.backbone, classnames, self.scale, self.n_ctx, self.ctx_init, ctx=self.ctx.detach())
        head.tokens(classnames)  # a class name that does not fit is refused now, before any image is read
        return head

    def fit(self, data: FitData) -> list[dict[str, Any]]:
        with _frozen(self.backbone.model):  # gradients reach the context only, never the tower's weights
            return self._fit(data)

    def _fit(self, data: FitData) -> list[dict[str, Any]]:
        epochs = data.cfg.epochs or epochs_for(data.shots)
        lr = data.cfg.method_lr or LR
        opt = torch.optim.SGD([self.ctx], lr=lr, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)
        g = torch.Generator().manual_seed(data.seed)
        n = len(data.labels)
        batches = n // BATCH if n >= BATCH else 1  # Dassl: drop_last when there are at least batch_size images
        history, step = [], 0
        self._frozen_text = None
        for epoch in range(epochs):
            epoch_lr = WARMUP_LR if epoch < WARMUP_EPOCHS else cosine_lr(epoch - WARMUP_EPOCHS, epochs, lr)
            set_lr(opt, epoch_lr)
            feats = F.normalize(data.views[epoch % len(data.views)], dim=-1)
            order = torch.randperm(n, generator=g).to(feats.device)
            loss, acc, step = train_epoch(feats, data.labels, order, BATCH, batches,
                                          lambda f: self.scale * f @ self.text_features().T, opt, step)
            history.append({"step": step, "epoch": epoch + 1, "loss": loss, "acc": acc, "lr": epoch_lr})
        self._frozen_text = None
        return history

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"coop.ctx": self.ctx.detach().float().cpu()}

    def meta(self) -> dict[str, Any]:
        return {"n_ctx": self.n_ctx, "ctx_init": self.ctx_init, "class_token_position": "end"}

    @classmethod
    def from_saved(cls, tensors, meta, backbone, classnames, template, scale) -> CoOpHead:
        ctx = tensors["coop.ctx"]
        head = cls(backbone, classnames, scale, meta["n_ctx"], meta["ctx_init"], ctx=ctx)
        if head.n_ctx != ctx.shape[0]:
            raise ConfigError(f"coop.ctx has {ctx.shape[0]} context vectors, but ctx_init {head.ctx_init!r} is "
                              f"{head.n_ctx} tokens for this tokenizer")
        return head


@contextlib.contextmanager
def _frozen(model: nn.Module) -> Iterator[None]:
    """Every parameter of `model` without requires_grad for the block; restored after."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    for p in trainable:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in trainable:
            p.requires_grad_(True)


HEADS = {"coop": CoOpHead}
