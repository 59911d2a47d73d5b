"""`--method tip_adapter` and `--method tip_adapter_f`: the cache model of Tip-Adapter (Zhang et al., ECCV 2022,
github.com/gaopengcuhk/Tip-Adapter), training-free, and with its keys fine-tuned.

    keys    F: (NK, D), the mean over `views` augmented views of each shot's raw feature, L2-normalised
            (build_cache_model: augment_epoch 10, mean over epochs, then normalised)
    values  L: (NK, C), the shots' one-hot labels
    A       = exp(-beta (1 - f F^T))              (N, NK) affinity of normalised test features f to the keys
    logits  = s f T^T + alpha A L                 s T: the zero-shot classifier (s = the logit scale, Tip's 100)

alpha and beta start at the paper's ImageNet values (init_alpha 1.17, init_beta 1; configs/imagenet.yaml) and are
searched on the validation shots (search_hp): beta over 200 values i (7 - 0.1) / 200 + 0.1, alpha over 20 values
i (3 - 0.1) / 20 + 0.1 (search_scale [7, 3], search_step [200, 20]), beta outer, the first best kept.

Tip-Adapter-F trains F (an nn.Linear(D, NK) initialised with the keys, not re-normalised) for 20 epochs with
AdamW(lr 1e-3, eps 1e-4), cosine over every step (CosineAnnealingLR(T_max = epochs x batches)), batch 256, on the
augmented shots with alpha and beta at their initial values, then searches alpha and beta as above. Each epoch reads
one of the precomputed views (features.py) instead of a fresh crop.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .. import checks
from .base import FitData, Head, cosine_lr, set_lr, train_epoch

INIT_ALPHA, INIT_BETA = 1.17, 1.0  # configs/imagenet.yaml
SEARCH_SCALE, SEARCH_STEP = (7.0, 3.0), (200, 20)  # (beta, alpha): configs/imagenet.yaml
EPOCHS, LR, EPS, BATCH = 20, 1e-3, 1e-4, 256  # train_epoch, lr; main_imagenet.py: AdamW eps=1e-4, batch 256


def affinity(feats: torch.Tensor, keys: torch.Tensor, beta: float) -> torch.Tensor:
    """A = exp(-beta (1 - f F^T)): (N, D) x (NK, D) -> (N, NK)."""
    return torch.exp(-beta * (1.0 - feats @ keys.T))


def search_grid() -> tuple[list[float], list[float]]:
    """(betas, alphas) of Tip-Adapter's search_hp."""
    betas = [i * (SEARCH_SCALE[0] - 0.1) / SEARCH_STEP[0] + 0.1 for i in range(SEARCH_STEP[0])]
    alphas = [i * (SEARCH_SCALE[1] - 0.1) / SEARCH_STEP[1] + 0.1 for i in range(SEARCH_STEP[1])]
    return betas, alphas


class TipAdapterHead(Head):
    method = "tip_adapter"
    trainable_keys = False
    record_shapes = {"tip.keys": ("shots", "feature_dim"), "tip.values": ("shots", "classes"),
                     "tip.text": ("classes", "feature_dim")}
    # the search grid's range (search_grid) with room to spare; a negative or huge weight is a damaged record
    record_fields = {"alpha": checks.num(0, 1e4), "beta": checks.num(0, 1e4)}

    @classmethod
    def record_problem(cls, tensors: dict[str, torch.Tensor]) -> str | None:
        """The cache values are the shots' one-hot labels (Tip-Adapter's `cache_values`): any other row scales or moves
        the cache term alpha A L, so the scores would be silently other ones."""
        values = tensors["tip.values"]
        one_hot = ((values == 0) | (values == 1)).all(dim=1) & (values.sum(dim=1) == 1)
        if not bool(one_hot.all()):
            row = int((~one_hot).nonzero()[0])
            return f"tip.values row {row} is not a one-hot label (the cache's values are the shots' one-hot labels)"
        return None

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, text: torch.Tensor, scale: float,
                 classnames: list[str], alpha: float = INIT_ALPHA, beta: float = INIT_BETA) -> None:
        super().__init__()
        self.classnames = list(classnames)
        self.keys = nn.Parameter(keys.detach().float().clone(), requires_grad=self.trainable_keys)  # (NK, D)
        self.register_buffer("values", values.detach().float().clone())  # (NK, C)
        self.register_buffer("text", text.detach().float().clone())  # (C, D)
        self.scale, self.alpha, self.beta = float(scale), float(alpha), float(beta)

    @classmethod
    def build(cls, data: FitData) -> TipAdapterHead:
        keys = F.normalize(data.views.mean(0), dim=-1)  # mean of the raw view features, then normalised
        values = F.one_hot(data.labels, len(data.classnames)).float()
        return cls(keys, values, data.text, data.scale, data.classnames)

    def logits(self, feats: torch.Tensor, alpha: float | None = None, beta: float | None = None) -> torch.Tensor:
        alpha = self.alpha if alpha is None else alpha
        beta = self.beta if beta is None else beta
        feats = feats.float()
        return self.scale * feats @ self.text.T + alpha * affinity(feats, self.keys, beta) @ self.values

    def search(self, data: FitData) -> list[dict[str, Any]]:
        """Tip-Adapter's search_hp on the validation shots: the first (beta, alpha) of the best accuracy."""
        if not data.cfg.search or not len(data.val_labels):
            return []
        betas, alphas = search_grid()
        best = (-1.0, self.alpha, self.beta)
        with torch.no_grad():
            clip_logits = self.scale * data.val @ self.text.T
            for beta in betas:
                cache = affinity(data.val, self.keys, beta) @ self.values
                for alpha in alphas:
                    acc = float(((clip_logits + alpha * cache).argmax(-1) == data.val_labels).float().mean())
                    if acc > best[0]:
                        best = (acc, alpha, beta)
        _, self.alpha, self.beta = best
        return [{"search": "alpha,beta", "alpha": self.alpha, "beta": self.beta, "val_top1": round(100 * best[0], 4)}]

    def fit(self, data: FitData) -> list[dict[str, Any]]:
        return self.search(data)

    def tensors(self) -> dict[str, torch.Tensor]:
        # the zero-shot classifier too: the frozen text tower gives it again, but a reload then needs no tokenizer
        return {"tip.keys": self.keys.detach().float().cpu(), "tip.values": self.values.cpu(),
                "tip.text": self.text.cpu()}

    def meta(self) -> dict[str, Any]:
        return {"alpha": self.alpha, "beta": self.beta}

    @property
    def trainable_params(self) -> int:
        return self.keys.numel() if self.trainable_keys else 0

    @classmethod
    def from_saved(cls, tensors, meta, backbone, classnames, template, scale) -> TipAdapterHead:
        return cls(tensors["tip.keys"], tensors["tip.values"], tensors["tip.text"], scale, classnames,
                   meta["alpha"], meta["beta"])


class TipAdapterFHead(TipAdapterHead):
    method = "tip_adapter_f"
    trainable_keys = True

    def fit(self, data: FitData) -> list[dict[str, Any]]:
        epochs = data.cfg.epochs or EPOCHS
        lr = data.cfg.method_lr or LR
        opt = torch.optim.AdamW([self.keys], lr=lr, eps=EPS)
        g = torch.Generator().manual_seed(data.seed)
        n = len(data.labels)
        batches = -(-n // BATCH)
        total, step, history = epochs * batches, 0, []
        for epoch in range(epochs):
            feats = F.normalize(data.views[epoch % len(data.views)], dim=-1)
            order = torch.randperm(n, generator=g).to(feats.device)
            loss, acc, step = train_epoch(feats, data.labels, order, BATCH, batches, self.logits, opt, step,
                                          set_lr=lambda s: set_lr(opt, cosine_lr(s, total, lr)))
            history.append({"step": step, "epoch": epoch + 1, "loss": loss, "acc": acc,
                            "lr": cosine_lr(step - 1, total, lr)})
        return history + self.search(data)


HEADS = {"tip_adapter": TipAdapterHead, "tip_adapter_f": TipAdapterFHead}
