"""The linear-probe baseline of benchmarks/accuracy.py: multinomial logistic regression on frozen image features.

CoOp's linear probe (Zhou et al. 2022) with its validation split replaced by 2-fold cross-validation over the K
shots (there is no other labelled data in a few-shot task): the L2 penalty is chosen among PENALTIES by that
cross-validation (K >= 2; K = 1 uses the middle value), then the probe is refit on all shots.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

PENALTIES = (1e-4, 1e-3, 1e-2, 1e-1, 1.0)


def _fit_probe(x: torch.Tensor, y: torch.Tensor, n_classes: int, penalty: float) -> torch.Tensor:
    """Multinomial logistic regression with an L2 penalty, full-batch L-BFGS; returns (D + 1, C) weights."""
    xb = torch.cat([x, torch.ones(len(x), 1)], 1).double()
    w = torch.zeros(xb.shape[1], n_classes, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w], lr=1, max_iter=500, tolerance_grad=1e-9, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(xb @ w, y) + penalty * (w[:-1] ** 2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach()


def _probe_predict(w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return (torch.cat([x, torch.ones(len(x), 1)], 1).double() @ w).argmax(1)


def linear_probe(train_x, train_y, test_x, test_y, n_classes: int, seed: int) -> dict[str, float]:
    """Top-1 of the probe, the penalty chosen by 2-fold cross-validation over the shots (per class halves)."""
    per_class = torch.bincount(train_y, minlength=n_classes)
    if int(per_class.min()) >= 2:
        g = torch.Generator().manual_seed(seed)
        fold_of = torch.empty(len(train_y), dtype=torch.long)
        for c in range(n_classes):
            idx = (train_y == c).nonzero().flatten()
            idx = idx[torch.randperm(len(idx), generator=g)]
            fold_of[idx] = torch.arange(len(idx)) % 2
        scores = {}
        for penalty in PENALTIES:
            correct = 0
            for f in (0, 1):
                tr, va = fold_of != f, fold_of == f
                w = _fit_probe(train_x[tr], train_y[tr], n_classes, penalty)
                correct += int((_probe_predict(w, train_x[va]) == train_y[va]).sum())
            scores[penalty] = correct
        best = max(PENALTIES, key=lambda p: (scores[p], p))  # ties: the stronger penalty
    else:
        best = PENALTIES[len(PENALTIES) // 2]
    w = _fit_probe(train_x, train_y, n_classes, best)
    return {"top1": round(100 * float((_probe_predict(w, test_x) == test_y).double().mean()), 2), "penalty": best}
