"""Per-image predictions of an evaluation, its confusion matrix, and a run's training curve, as files.

    write_predictions(path, items, labels, cosines, classnames, logits)  -> predictions.csv
    plot_confusion(path, labels, predicted, classnames, title)           -> confusion.png (matplotlib; else skipped)
    plot_curve(metrics_path, path, title)                                -> curve.png (matplotlib; else skipped)

predictions.csv has one row per evaluated image, in evaluation order: path, label, predicted (class names), prob
(the predicted class's probability under the run's logits: softmax over the classes, or SigLIP's per-class
sigmoid), correct (0/1); as Dassl's and timm's per-sample outputs. The confusion matrix counts (true row, predicted
column), each row shaded by its share of the class (rows normalised), raw counts written in small matrices.
matplotlib is the `plot` extra: without it the plots are skipped with one note, the CSV is always written.
"""

from __future__ import annotations

import csv
import io
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ..data.types import Item
from .files import atomic_write
from .logits import Logits

log = logging.getLogger("blocklora")
PREDICTIONS, CONFUSION, CURVE = "predictions.csv", "confusion.png", "curve.png"


def predictions_rows(items: Sequence[Item], cosines: torch.Tensor, classnames: Sequence[str],
                     logits: Logits) -> list[dict[str, Any]]:
    """One row per item: path, label, predicted, prob, correct. `cosines`: (N, C) image-class cosine similarities."""
    probs = logits.probabilities(logits(cosines.float()))
    prob, pred = probs.max(dim=-1)
    return [{"path": item.path, "label": classnames[item.label], "predicted": classnames[int(p)],
             "prob": round(float(q), 6), "correct": int(int(p) == item.label)}
            for item, p, q in zip(items, pred, prob)]


def predictions_csv(rows: Sequence[dict[str, Any]]) -> bytes:
    """predictions.csv's bytes (UTF-8; a path that is not UTF-8 with \\xNN escapes)."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=["path", "label", "predicted", "prob", "correct"], lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue().encode("utf-8", "backslashreplace")


def write_predictions(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    data = predictions_csv(rows)
    atomic_write(Path(path), lambda fh: fh.write(data))


def confusion(labels: Sequence[int], predicted: Sequence[int], n_classes: int) -> torch.Tensor:
    """(C, C) counts: row = true class, column = predicted class."""
    m = torch.zeros(n_classes, n_classes, dtype=torch.long)
    for t, p in zip(labels, predicted):
        m[t, p] += 1
    return m


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        log.info("note: matplotlib is not installed (pip install 'blocklora[plot]'): plots skipped")
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_confusion(path: Path, rows: Sequence[dict[str, Any]], classnames: Sequence[str], title: str) -> bool:
    """confusion.png from predictions rows; False when matplotlib is missing."""
    data = confusion_png(rows, classnames, title)
    if data is not None:
        atomic_write(Path(path), lambda fh: fh.write(data))
    return data is not None


def confusion_png(rows: Sequence[dict[str, Any]], classnames: Sequence[str], title: str) -> bytes | None:
    """confusion.png's bytes from predictions rows; None when matplotlib is missing."""
    plt = _pyplot()
    if plt is None:
        return None
    index = {c: i for i, c in enumerate(classnames)}  # two classes sharing a name plot as one: rare, named by warning
    m = confusion([index[r["label"]] for r in rows], [index[r["predicted"]] for r in rows], len(classnames))
    share = m.float() / m.sum(dim=1, keepdim=True).clamp(min=1)
    n = len(classnames)
    size = min(16.0, 2.5 + 0.4 * n)
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(share.numpy(), cmap="Blues", vmin=0, vmax=1)
    if n <= 40:
        ax.set_xticks(range(n), classnames, rotation=60, ha="right", fontsize=8)
        ax.set_yticks(range(n), classnames, fontsize=8)
    if n <= 20:
        for i in range(n):
            for j in range(n):
                if m[i, j]:
                    ax.text(j, i, int(m[i, j]), ha="center", va="center", fontsize=7,
                            color="white" if share[i, j] > 0.5 else "black")
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()


def plot_curve(metrics: Path, path: Path, title: str) -> bool:
    """curve.png: a run's training loss and batch accuracy per step (metrics.jsonl); False without matplotlib."""
    plt = _pyplot()
    if plt is None:
        return False
    steps = [json.loads(line) for line in Path(metrics).read_text(encoding="utf-8").splitlines() if line.strip()]
    # a skipped step (nan_policy=skip) has no loss; a baseline's records (methods/: per epoch or per searched
    # value) may have no step, loss or batch accuracy: only what a record holds is drawn
    steps = [s for s in steps if isinstance(s.get("step"), int) and s.get("loss") is not None]
    if not steps:
        return False
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([s["step"] for s in steps], [s["loss"] for s in steps], color="#1f77b4", label="loss")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (mean over the batch)")
    with_acc = [s for s in steps if s.get("acc") is not None]
    if with_acc:
        acc = ax.twinx()
        acc.plot([s["step"] for s in with_acc], [s["acc"] for s in with_acc], color="#ff7f0e", alpha=0.5,
                 label="batch accuracy")
        acc.set_ylabel("batch accuracy (%)")
        acc.set_ylim(0, 100)
    ax.set_title(title, fontsize=10)
    fig.legend(loc="upper right")
    fig.tight_layout()
    atomic_write(Path(path), lambda fh: fig.savefig(fh, format="png", dpi=100))
    plt.close(fig)
    return True
