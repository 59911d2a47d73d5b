"""Few-shot accuracy on real data that exists offline: effnet-minilm on Fashion-MNIST.

    .venv/bin/python benchmarks/accuracy.py                  # the full grid (about an hour on 2 CPU cores)
    .venv/bin/python benchmarks/accuracy.py --report-only    # tables and plot from the runs already done

Finished cells are read from the run directories in --work and, failing those, from the committed
benchmarks/results/accuracy.json when its recipe matches this script's: a fresh checkout runs only what is new.

Compares, on a fixed subset of real Fashion-MNIST test images (evenly spaced, the same for every run), for K in
{1, 4, 16} shots per class and seeds {1, 2, 3}:
- zero-shot (the frozen model, prompts "a photo of a {}.");
- a linear probe: multinomial logistic regression on the frozen model's L2-normalised image features of the K-shot
  training images, L2 penalty chosen by 2-fold cross-validation on those shots (K >= 2; K = 1 uses the grid's
  middle value), as CoOp's linear-probe baseline does with a validation split;
- LoRA (r = 2) and Block-LoRA (r = 2) with n_blocks in {2, 4, 8}: every adapter method runs the same recipe
  (demo.py's: AdamW, cosine schedule, lr 2e-3, q/k/v placement, both towers, dropout 0.25; here batch 8) with
  the same step budget per K. n = 32 and more do not divide the 144- and 240-channel widths;
- ablations at K = 4 for Block-LoRA n = 8: fold "mean" instead of "sum", A initialised with the full input width's
  fan-in ("kaiming_full") instead of the block's.
Every adapter cell is an ordinary `blocklora train` run (api.run) in --work DIR; a rerun skips finished cells.
Writes benchmarks/results/accuracy.{json,md,png}.

Recipe choices are measured as variants: `--variant NAME=METHOD,key=value,...` adds a row NAME that runs METHOD's
overrides plus the given config keys over the same shots and seeds (e.g. the Block-LoRA recipe keys of
docs/recipe.md: `--variant n8_keep_last=block_lora_n8,train.drop_last=false`, `--variant
n8_own_masks=block_lora_n8,adapter.dropout_mask=per_projection`; `train.frozen_dtype` matters on GPU only).
A cell is reused only when the recipe it recorded is the one the current code resolves for it.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from blocklora.api import run  # noqa: E402
from blocklora.demo import BATCH, LR, TEST_IMAGES, demo_config  # noqa: E402  (the demo: the n=8, K=16 cell)
from blocklora.engine.files import write_json  # noqa: E402

SHOTS = (1, 4, 16)
SEEDS = (1, 2, 3)
ITERS = {1: 60, 4: 120, 16: 200}  # the same for every adapter method at a given K
METHODS: dict[str, tuple[str, ...]] = {
    "lora": ("adapter.method=lora", "adapter.n_blocks=1"),
    "block_lora_n2": ("adapter.n_blocks=2",),
    "block_lora_n4": ("adapter.n_blocks=4",),
    "block_lora_n8": ("adapter.n_blocks=8",),
    "block_lora_n16": ("adapter.n_blocks=16",),
}
ABLATIONS: dict[str, tuple[str, ...]] = {
    "block_lora_n8_fold_mean": ("adapter.n_blocks=8", "adapter.fold=mean"),
    "block_lora_n8_kaiming_full": ("adapter.n_blocks=8", "adapter.a_init=kaiming_full"),
}
ABLATION_SHOTS = 4
# Where a gap between LoRA and Block-LoRA comes from: the text tower alone (cheap: the frozen image features are
# computed once per run and reused) at K = 16.
DIAGNOSTICS: dict[str, tuple[str, ...]] = {
    "lora_text_only": ("adapter.method=lora", "adapter.n_blocks=1", "adapter.towers=text"),
    "block_lora_n8_text_only": ("adapter.n_blocks=8", "adapter.towers=text"),
}
DIAGNOSTIC_SHOTS = 16
PENALTIES = (1e-4, 1e-3, 1e-2, 1e-1, 1.0)
OUT = ROOT / "benchmarks" / "results"


# -- linear probe ------------------------------------------------------------------------------------------------------
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


def probe_cells(seeds, shots, work: Path) -> dict[str, dict[str, Any]]:
    """Linear probe per (K, seed) on the frozen image features of the same K-shot draws the adapter runs use."""
    from blocklora.backbones import load_backbone
    from blocklora.data import evenly_spaced, load_dataset, sample_few_shot
    from blocklora.engine.evaluate import image_features
    from blocklora.engine.runtime import make_runtime

    cache = work / "probe.json"
    done = json.loads(cache.read_text()) if cache.exists() else {}
    todo = [(k, s) for s in seeds for k in shots if f"K{k}_s{s}" not in done]
    if not todo:
        return done
    cfg = demo_config().resolved()
    data = load_dataset(cfg.data.dataset, cfg.data.root)
    backbone = load_backbone(cfg.model, cfg.pretrained)
    rt = make_runtime("cpu")
    test = evenly_spaced(data.test, TEST_IMAGES)
    test_x, test_y = image_features(backbone, test, data.image_reader, rt, 100, 0, "probe: test features")
    for k, s in todo:
        t0 = time.perf_counter()
        train = sample_few_shot(data, k, s, cfg.data.sampler, cfg.data.replace).train
        x, y = image_features(backbone, train, data.image_reader, rt, 100, 0, "probe: train features")
        result = linear_probe(x, y, test_x, test_y, len(data.classnames), s)
        done[f"K{k}_s{s}"] = {**result, "shots": k, "seed": s, "wall_s": round(time.perf_counter() - t0, 1),
                              "n_test": len(test), "params": (x.shape[1] + 1) * len(data.classnames)}
        print(f"linear probe K={k} seed={s}: {result['top1']:.2f}% (penalty {result['penalty']})", flush=True)
        write_json(cache, done)
    return done


# -- adapter runs ---------------------------------------------------------------------------------------------------
# The recipe keys whose values a cell records (config.METHOD_DEFAULTS), and what every cell measured before those
# keys existed ran: the last partial batch dropped, one shared dropout mask, fp32 frozen weights.
RECIPE_KEYS = ("train.drop_last", "adapter.dropout_mask", "train.frozen_dtype")
LEGACY_RECIPE = {"train.drop_last": True, "adapter.dropout_mask": "shared", "train.frozen_dtype": "fp32"}


def recipe_of(config: dict[str, Any]) -> dict[str, Any]:
    """The RECIPE_KEYS values of a resolved config dict (results.json's "config")."""
    return {key: config[key.split(".")[0]][key.split(".")[1]] for key in RECIPE_KEYS}


def expected_recipe(overrides: tuple[str, ...]) -> dict[str, Any]:
    return recipe_of(demo_config(overrides=overrides).resolved().to_dict())


def adapter_cell(work: Path, name: str, overrides: tuple[str, ...], k: int, seed: int) -> dict[str, Any]:
    out = work / f"{name}_K{k}_s{seed}"
    if (out / "results.json").exists():
        r = json.loads((out / "results.json").read_text())
    else:
        if out.exists():  # an interrupted cell: start it again
            import shutil

            shutil.rmtree(out)
        cfg = demo_config(shots=k, seed=seed, iters=ITERS[k], batch_size=BATCH, lr=LR, test_images=TEST_IMAGES,
                          device="cpu", overrides=(*overrides, "data.workers=0"))
        r = run(cfg, out)
        print(f"{name} K={k} seed={seed}: zero-shot {r['zero_shot_top1']:.2f}% -> {r['top1']:.2f}% "
              f"({r['trainable_params']} params, {r['wall_time_s']['total']:.0f} s)", flush=True)
    return {"top1": r["top1"], "zero_shot_top1": r["zero_shot_top1"], "trainable_params": r["trainable_params"],
            "wall_s": r["wall_time_s"]["total"], "train_s": r["wall_time_s"]["train"], "iters": r["iters"],
            "n_test": r["n_test"], "split_sha256": r["split_sha256"], "recipe": recipe_of(r["config"])}


def committed_cells(name: str = "accuracy") -> tuple[dict[str, Any], dict[str, Any]]:
    """Cells and probe results from the committed accuracy.json when it was made with this script's recipe, so
    that a fresh checkout re-reports them, or runs only the cells the grid gained since, without redoing an hour."""
    path = OUT / f"{name}.json"
    if not path.exists():
        return {}, {}
    old = json.loads(path.read_text())
    c = old.get("config", {})
    same = (c.get("iters") == {str(k): v for k, v in ITERS.items()} and c.get("batch_size") == BATCH
            and c.get("lr") == LR and c.get("test_images") == TEST_IMAGES)
    return (old.get("cells", {}), old.get("linear_probe", {})) if same else ({}, {})


def collect(work: Path, seeds, shots, with_ablations: bool, run_missing: bool, methods=tuple(METHODS),
            previous: dict[str, Any] | None = None) -> dict[str, Any]:
    """Every cell of the grid: from its run directory, else from `previous` (committed cells), else run it."""
    cells: dict[str, Any] = {}
    previous = previous or {}
    jobs = [(name, METHODS[name], k, s) for s in seeds for k in shots for name in methods]
    if with_ablations:
        jobs += [(name, ov, ABLATION_SHOTS, s) for s in seeds for name, ov in ABLATIONS.items()]
        jobs += [(name, ov, DIAGNOSTIC_SHOTS, s) for s in seeds for name, ov in DIAGNOSTICS.items()]
    for name, ov, k, s in jobs:
        key = f"{name}_K{k}_s{s}"
        done = (work / key / "results.json").exists()
        fresh = key in previous and previous[key].get("recipe", LEGACY_RECIPE) == expected_recipe(ov)
        if not done and fresh:
            cells[key] = previous[key]
        elif done or run_missing:
            cells[key] = {"method": name, "shots": k, "seed": s, **adapter_cell(work, name, ov, k, s)}
    return cells


# -- report ---------------------------------------------------------------------------------------------------------
def _stats(values: list[float]) -> dict[str, float]:
    return {"mean": round(statistics.fmean(values), 2), "std": round(statistics.stdev(values), 2)
            if len(values) > 1 else 0.0, "n": len(values)}


def aggregate(cells: dict[str, Any], probe: dict[str, Any], shots) -> dict[str, Any]:
    table: dict[str, dict[str, Any]] = {}
    zs = sorted({c["zero_shot_top1"] for c in cells.values()})
    for k in shots:
        row: dict[str, Any] = {}
        if zs:
            row["zero_shot"] = {"mean": zs[0], "std": 0.0, "n": 1, "params": 0}
        lp = [v["top1"] for v in probe.values() if v["shots"] == k]
        if lp:
            row["linear_probe"] = {**_stats(lp), "params": next(v["params"] for v in probe.values())}
        for name in dict.fromkeys((*METHODS, *ABLATIONS, *DIAGNOSTICS, *(c["method"] for c in cells.values()))):
            runs = [c for c in cells.values() if c["method"] == name and c["shots"] == k]
            if runs:
                row[name] = {**_stats([c["top1"] for c in runs]), "params": runs[0]["trainable_params"],
                             "wall_s": round(statistics.fmean(c["wall_s"] for c in runs), 1),
                             "train_s": round(statistics.fmean(c["train_s"] for c in runs), 1)}
        table[str(k)] = row
    return table


def markdown(table: dict[str, Any], shots) -> str:
    names = list(dict.fromkeys(["zero_shot", "linear_probe", *METHODS, *ABLATIONS, *DIAGNOSTICS,
                                *(n for row in table.values() for n in row)]))
    label = {"zero_shot": "zero-shot", "linear_probe": "linear probe", "lora": "LoRA r=2",
             "block_lora_n2": "Block-LoRA n=2", "block_lora_n4": "Block-LoRA n=4", "block_lora_n8": "Block-LoRA n=8",
             "block_lora_n16": "Block-LoRA n=16",
             "block_lora_n8_fold_mean": "Block-LoRA n=8, fold mean", "block_lora_n8_kaiming_full":
             "Block-LoRA n=8, A init kaiming_full", "lora_text_only": "LoRA r=2, text tower only",
             "block_lora_n8_text_only": "Block-LoRA n=8, text tower only"}
    head = "| method | trainable params | " + " | ".join(f"K={k}" for k in shots) + " | wall s / run (K=16) |"
    lines = [head, "|" + "---|" * (len(shots) + 3)]
    for name in names:
        rows = [table[str(k)].get(name) for k in shots]
        if not any(rows):
            continue
        params = next(r["params"] for r in rows if r)
        cells = [f"{r['mean']:.2f} ± {r['std']:.2f}" if r else "" for r in rows]
        wall = next((r.get("wall_s") for r in reversed(rows) if r and r.get("wall_s")), None)
        lines.append(f"| {label.get(name, name)} | {params:,} | " + " | ".join(cells) + f" | {wall if wall else ''} |")
    return "\n".join(lines) + "\n"


def plot(table: dict[str, Any], shots, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for name, style in (("zero_shot", "k--"), ("linear_probe", "s-"), ("lora", "o-"), ("block_lora_n2", "^-"),
                        ("block_lora_n4", "v-"), ("block_lora_n8", "D-"), ("block_lora_n16", "x-")):
        ks = [k for k in shots if name in table[str(k)]]
        if not ks:
            continue
        mean = [table[str(k)][name]["mean"] for k in ks]
        std = [table[str(k)][name]["std"] for k in ks]
        ax.errorbar(ks, mean, yerr=std, fmt=style, capsize=3, label=name.replace("_", " "))
    ax.set_xscale("log", base=2)
    ax.set_xticks(list(shots), [str(k) for k in shots])
    ax.set_xlabel("shots per class")
    ax.set_ylabel(f"top-1 on {TEST_IMAGES} test images (%)")
    n = max(v["n"] for row in table.values() for v in row.values())
    ax.set_title(f"Fashion-MNIST, effnet-minilm (mean ± std, {n} seeds)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", default=str(ROOT / "runs" / "bench-accuracy"), help="run directories (resumable)")
    p.add_argument("--seeds", default=",".join(map(str, SEEDS)))
    p.add_argument("--shots", default=",".join(map(str, SHOTS)))
    p.add_argument("--no-ablations", action="store_true")
    p.add_argument("--report-only", action="store_true", help="tables from finished runs; run nothing")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--methods", default=",".join(METHODS), help=f"adapter rows to run, among {', '.join(METHODS)}")
    p.add_argument("--variant", action="append", default=[], metavar="NAME=METHOD,key=value,...",
                   help="an extra row, run like --methods': METHOD's overrides plus these config keys (repeatable)")
    p.add_argument("--name", default="accuracy",
                   help="output benchmarks/results/NAME.{json,md,png}; only NAME.json's cells are reused")
    args = p.parse_args(argv)
    for spec in args.variant:
        name, sep, rest = spec.partition("=")
        base, *keys = rest.split(",")
        if not sep or base not in METHODS or not all("=" in k for k in keys):
            p.error(f"bad --variant {spec!r}: write NAME=METHOD,key=value,... with METHOD among {', '.join(METHODS)}")
        METHODS[name] = (*METHODS[base], *keys)
    methods = tuple(args.methods.split(",")) + tuple(s.partition("=")[0] for s in args.variant
                                                      if s.partition("=")[0] not in args.methods.split(","))
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        p.error(f"unknown method(s) {', '.join(unknown)}: use {', '.join(METHODS)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    seeds = [int(s) for s in args.seeds.split(",")]
    shots = [int(k) for k in args.shots.split(",")]
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    import os

    os.environ.setdefault("BLOCKLORA_CACHE", str(work / "cache"))  # zero-shot computed once for the whole grid
    t0 = time.perf_counter()
    previous, previous_probe = committed_cells(args.name)
    if not (work / "probe.json").exists() and previous_probe:
        write_json(work / "probe.json", previous_probe)
    probe = probe_cells(seeds, shots, work) if not args.report_only else (
        json.loads((work / "probe.json").read_text()) if (work / "probe.json").exists() else {})
    cells = collect(work, seeds, shots, not args.no_ablations, run_missing=not args.report_only, methods=methods,
                    previous=previous)
    table = aggregate(cells, probe, shots)
    OUT.mkdir(parents=True, exist_ok=True)
    config = {"model": "effnet-minilm (packaged)", "dataset": "fashion-mnist", "test_images": TEST_IMAGES,
              "test_subset": "evenly spaced through the test file (eval.limit)", "shots": shots, "seeds": seeds,
              "iters": ITERS, "batch_size": BATCH, "lr": LR, "recipe": demo_config().resolved().to_dict(),
              "probe_penalties": PENALTIES, "machine": f"{os.cpu_count()} CPU cores, torch {torch.__version__}",
              "date": time.strftime("%Y-%m-%d")}
    write_json(OUT / f"{args.name}.json", {"config": config, "table": table, "cells": cells, "linear_probe": probe})
    md = markdown(table, shots)
    (OUT / f"{args.name}.md").write_text(md)
    if cells:
        plot(table, shots, OUT / f"{args.name}.png")
    print(md)
    _targets(table, shots)
    print(f"done in {time.perf_counter() - t0:.0f} s; {OUT / f'{args.name}.json'}")
    return 0


def _targets(table: dict[str, Any], shots) -> None:
    """The issue's targets, as measured: Block-LoRA within 1 point of LoRA with <= 60% of its parameters."""
    for k in shots:
        row = table[str(k)]
        if "lora" not in row:
            continue
        for name in ("block_lora_n2", "block_lora_n4", "block_lora_n8", "block_lora_n16"):
            if name in row:
                gap = row[name]["mean"] - row["lora"]["mean"]
                share = row[name]["params"] / row["lora"]["params"]
                probe = row.get("linear_probe", {}).get("mean", math.nan)
                print(f"K={k} {name}: {gap:+.2f} points vs LoRA, {100 * share:.0f}% of its parameters, "
                      f"{row[name]['mean'] - probe:+.2f} vs linear probe")


if __name__ == "__main__":
    raise SystemExit(main())
