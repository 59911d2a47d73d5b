"""`--method probe`: a linear head on the frozen L2-normalised image features, initialised from the zero-shot
text classifier, its L2 weight chosen on the validation shots as CoOp's linear probe does.

    logits = f W^T + b                       f: (N, D) normalised image features; W: (C, D); b: (C,)
    init   W0 = s T, b0 = 0                  T: (C, D) normalised zero-shot text features, s the logit scale: the
                                             head starts as the zero-shot classifier (LP++, Huang et al. 2024;
                                             CLAP's ZS-LP, Silva-Rodriguez et al. 2024)
    loss   mean CE(f W^T + b, y) + |W - W0|^2 / (2 C_reg N)
                                             scikit-learn's LogisticRegression objective (C_reg sum CE + |w|^2 / 2,
                                             divided by C_reg N) with the penalty pulling toward the zero-shot
                                             weights instead of 0 (CLAP's constraint); b is not penalised (sklearn)

C_reg is searched as CoOp's lpclip/linear_probe.py does: the grid 1e6, 1e4, ..., 1e-6 (the first best on val), then
8 binary-search steps in log space between 0.1x and 10x the peak (lpclip's --num_step 8). Each fit is full-batch
L-BFGS from the zero-shot init, at most 1000 iterations (lpclip: max_iter=1000). Without validation shots (or with
baseline.search=false) C_reg = 1, scikit-learn's default.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .. import checks
from .base import FitData, Head

GRID = (1e6, 1e4, 1e2, 1.0, 1e-2, 1e-4, 1e-6)  # lpclip/linear_probe.py: search_list
STEPS = 8  # lpclip's README: --num_step 8
MAX_ITER = 1000  # lpclip: LogisticRegression(solver="lbfgs", max_iter=1000)
DEFAULT_C = 1.0  # scikit-learn LogisticRegression's default C
TOLERANCE = 1e-5  # L-BFGS stops within about this of the optimum (scikit-learn's lbfgs: tol 1e-4 on the gradient)


def fit_weights(x: torch.Tensor, y: torch.Tensor, w0: torch.Tensor, c_reg: float
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """argmin over (W, b) of mean CE(x W^T + b, y) + |W - w0|^2 / (2 c_reg N), from (w0, 0), full-batch L-BFGS in
    float64. x: (N, D), y: (N,), w0: (C, D). Returns (W, b) in x's dtype."""
    dtype = x.dtype
    x, w0 = x.double(), w0.double()
    w = w0.clone().requires_grad_(True)
    b = torch.zeros(w0.shape[0], dtype=torch.float64, device=x.device, requires_grad=True)
    weight = 1.0 / (2 * c_reg * len(y))
    # Stop when the gradient is small next to the objective's curvature (at most 1/2 from the cross-entropy of unit
    # features, 2 weight from the penalty): W is then within about TOLERANCE of the optimum, whatever C_reg; a fixed
    # gradient tolerance would ask the strongly pulled fits for precision float64 cannot give.
    opt = torch.optim.LBFGS([w, b], lr=1, max_iter=MAX_ITER, tolerance_grad=TOLERANCE * (0.5 + 2 * weight),
                            tolerance_change=1e-12, history_size=20, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(x @ w.T + b, y) + weight * ((w - w0) ** 2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach().to(dtype), b.detach().to(dtype)


class ProbeHead(Head):
    method = "probe"
    record_shapes = {"probe.weight": ("classes", "feature_dim"), "probe.bias": ("classes",)}
    record_fields = {"C": checks.num(0, lo_open=True, optional=True)}  # the chosen penalty (informative)
    record_defaults = {"C": None}

    def __init__(self, text: torch.Tensor, scale: float, classnames: list[str]) -> None:
        super().__init__()
        self.classnames = list(classnames)
        self.weight = nn.Parameter(scale * text.detach().float().clone())  # (C, D): starts as zero-shot
        self.bias = nn.Parameter(torch.zeros(text.shape[0], device=text.device))
        self.c_reg: float | None = None

    def logits(self, feats: torch.Tensor) -> torch.Tensor:
        return feats.to(self.weight.dtype) @ self.weight.T + self.bias

    def _fit_one(self, data: FitData, c_reg: float) -> tuple[torch.Tensor, torch.Tensor]:
        return fit_weights(data.train, data.labels, data.scale * data.text, c_reg)

    def _val_acc(self, data: FitData, wb: tuple[torch.Tensor, torch.Tensor]) -> float:
        w, b = wb
        return float(((data.val @ w.T + b).argmax(-1) == data.val_labels).float().mean())

    def fit(self, data: FitData) -> list[dict[str, Any]]:
        history: list[dict[str, Any]] = []
        if not data.cfg.search or not len(data.val_labels):
            best, wb = DEFAULT_C, self._fit_one(data, DEFAULT_C)
        else:
            accs = []
            for c in GRID:
                accs.append(self._val_acc(data, self._fit_one(data, c)))
                history.append({"step": len(history) + 1, "C": c, "val_top1": round(100 * accs[-1], 4)})
            peak = GRID[max(range(len(GRID)), key=lambda i: (accs[i], -i))]  # np.argmax: the first best
            left, right = 0.1 * peak, 10.0 * peak
            best, wb = peak, None
            for _ in range(STEPS):  # lpclip's binary_search, step by step
                wl, wr = self._fit_one(data, left), self._fit_one(data, right)
                al, ar = self._val_acc(data, wl), self._val_acc(data, wr)
                mid = 0.5 * (math.log10(right) + math.log10(left))
                if al < ar:
                    best, wb = right, wr
                    left = 10 ** mid
                else:
                    best, wb = left, wl
                    right = 10 ** mid
                history.append({"step": len(history) + 1, "C": best, "val_top1": round(100 * max(al, ar), 4)})
        with torch.no_grad():
            self.weight.copy_(wb[0])
            self.bias.copy_(wb[1])
        self.c_reg = best
        loss = F.cross_entropy(self.logits(data.train), data.labels).item()
        history.append({"step": len(history) + 1, "C": best, "loss": loss})
        return history

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"probe.weight": self.weight.detach().float().cpu(), "probe.bias": self.bias.detach().float().cpu()}

    def meta(self) -> dict[str, Any]:
        return {"C": self.c_reg}

    @classmethod
    def from_saved(cls, tensors, meta, backbone, classnames, template, scale) -> ProbeHead:
        head = cls(torch.zeros_like(tensors["probe.weight"]), 1.0, classnames)
        with torch.no_grad():
            head.weight.copy_(tensors["probe.weight"])
            head.bias.copy_(tensors["probe.bias"])
        head.c_reg = meta.get("C")
        return head


HEADS = {"probe": ProbeHead}
