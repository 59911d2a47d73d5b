"""effnet-minilm's image-to-text projection, fitted in closed form from the packaged weights alone (no images).

EfficientNet-Lite0 ends in a classifier: logits = W f + b, one row [w_j, b_j] per ImageNet-1k class j, over the
pooled 1280-d features f. MiniLM embeds each class name as t_j (384-d, L2-normalised: the "class bank"). The
projection P (384 x 1280, bias c) is the ridge regression that sends every class's classifier row to its name's
embedding, with the bias treated as a feature that is always 1 (DeViSE's idea, Frome et al. 2013, solved in closed
form instead of trained):

    [P c]^T = argmin_M  || X M - T ||^2 + lambda ||M||^2,   X = [W b] (1000 x 1281), T = bank (1000 x 384)
            = X^T (X X^T + lambda I)^-1 T                 (the dual form: one 1000 x 1000 solve)

so an image's embedding P f + c lies in the text space, near the names of the ImageNet classes it resembles, and
prompts are compared with it by cosine similarity as in CLIP. lambda = RIDGE trades zero-shot for few-shot
signal; it is measured in the module docstring of effnet_minilm.py (the mean squared norm of a row of X is 5.3).

Deterministic: the bank is computed in float64 (a thread count cannot change a value) and the solve is float64;
both are cast to float32 once. Cached: the result depends only on the packaged files, the class names, the bank
template, RIDGE and FIT_VERSION, which name the cache file ($BLOCKLORA_CACHE/effnet-minilm/<key>.safetensors);
a missing, unreadable or unwritable cache only costs the few seconds of computing it again.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)

RIDGE = 30.0
BANK_TEMPLATE = "{}"  # the bare class name: "a photo of a {}." lowers zero-shot on Fashion-MNIST (docstring there)
FIT_VERSION = 1  # bump whenever the computation below changes: old cache files are then ignored
MAX_TOKENS = 128


def mean_pooled(text: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Mean of a BertModel's last hidden states over the real tokens (sentence-transformers' pooling). (C, D)."""
    hidden = text(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # (C, L, D)
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)  # (C, L, 1)
    return (hidden * mask).sum(1) / mask.sum(1).clamp_min(1e-9)


@torch.no_grad()
def class_bank(text: nn.Module, tokenizer, names: Sequence[str], template: str = BANK_TEMPLATE,
               batch_size: int = 250) -> torch.Tensor:
    """(len(names), D) float64 L2-normalised embeddings of `template.format(name)` by a float64 copy of `text`."""
    text64 = copy.deepcopy(text).double().eval()
    texts = [template.format(n) for n in names]
    # Batches of similar length (mean pooling reads only real tokens, so padding changes no value, only the cost).
    order = sorted(range(len(texts)), key=lambda i: len(tokenizer.tokenize(texts[i])))
    out = torch.empty(len(texts), text64.config.hidden_size, dtype=torch.float64)
    for i in range(0, len(order), batch_size):
        chunk = order[i:i + batch_size]
        tokens = tokenizer([texts[j] for j in chunk], padding=True, truncation=True, max_length=MAX_TOKENS,
                           return_tensors="pt")
        out[chunk] = mean_pooled(text64, tokens["input_ids"], tokens["attention_mask"])
    return F.normalize(out, dim=-1)


def fit_projection(classifier: nn.Linear, bank: torch.Tensor, ridge: float = RIDGE) -> nn.Linear:
    """The frozen Linear(in_features, D) that maps each classifier row [w_j, b_j] closest to bank_j (formula above).

    classifier: Linear(F, C) (EfficientNet's _fc, C = 1000); bank: (C, D). Raises ValueError on a row mismatch.
    """
    if classifier.out_features != len(bank):
        raise ValueError(f"{classifier.out_features} classifier rows but {len(bank)} class-name embeddings")
    x = torch.cat([classifier.weight.detach(), classifier.bias.detach()[:, None]], 1).double()  # (C, F + 1)
    gram = x @ x.T + ridge * torch.eye(len(x), dtype=x.dtype)
    m = x.T @ torch.linalg.solve(gram, bank.double())  # (F + 1, D)
    projection = nn.Linear(classifier.in_features, bank.shape[1])
    with torch.no_grad():
        projection.weight.copy_(m[:-1].T)
        projection.bias.copy_(m[-1])
    return projection.requires_grad_(False)


def cache_key(files: Sequence[Path], names: Sequence[str], template: str, ridge: float) -> str:
    """Everything the fit depends on: the packaged files' bytes, the names, the template, RIDGE, FIT_VERSION."""
    h = hashlib.sha256(json.dumps({"names": list(names), "template": template, "ridge": ridge,
                                   "version": FIT_VERSION}).encode())
    for path in files:
        with open(path, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 22), b""):
                h.update(chunk)
    return h.hexdigest()[:24]


def cached_projection(key: str, compute) -> nn.Linear:
    """The projection stored under `key` in the cache, else compute() and store it (best effort)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file, save

    from ..engine.evaluate import cache_dir  # lazy: the engine imports backbones
    from ..engine.files import atomic_write

    path = cache_dir() / "effnet-minilm" / f"projection-{key}.safetensors"
    try:
        state = load_file(str(path))
        projection = nn.Linear(state["weight"].shape[1], state["weight"].shape[0])
        projection.load_state_dict(state, strict=True)
        return projection.requires_grad_(False)
    except (OSError, SafetensorError, KeyError, RuntimeError):
        pass  # absent or damaged: compute it
    projection = compute()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        blob = save({k: v.contiguous() for k, v in projection.state_dict().items()}, metadata={"key": key})
        atomic_write(path, lambda fh: fh.write(blob))
    except OSError as e:
        log.info("effnet-minilm projection not cached (%s): it is computed again at the next load", e)
    return projection
