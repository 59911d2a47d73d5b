"""CPU precision: bf16 autocast (train.precision=bf16) against fp32 on the CPU, side by side in one run.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/cpu_precision.py --threads 1        # step time, a few minutes
    .venv/bin/python benchmarks/cpu_precision.py --accuracy-seeds 1,2,3 --no-step-time  # the demo cell, 6 runs

Step time: per model, the training step of benchmarks/step_cost.py (Block-LoRA defaults on both towers, forward
and loss under Runtime.autocast(), backward through the runtime's GradScaler, AdamW) built once per precision in
ONE process and stepped in turn (round-robin: load changes on a shared machine hit both alike), median of --rounds
steps after --warmup. Models: ViT-B/16 (open_clip, random weights, 224 px, batch 8, 100 class prompts) and the
demo's model with its packaged weights (blocklora.pipeline.demo: batch 8, its dataset's 10 classes). Also one matrix
product alone in fp32 and bf16 (does this CPU's bf16 GEMM pay at all?).

Accuracy (--accuracy-seeds): the demo's run (blocklora.pipeline.demo.demo_config: model, dataset, shots, steps, test
subset) once per seed and precision, zero-shot skipped; top-1 mean and standard deviation per precision, and the
training wall time of each run (the real loop, data loading included). Finished runs in --work are read back, not
redone.

Writes --output (default benchmarks/results/cpu_precision.json; the part not rerun is kept) and prints a table.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path[:0] = [str(ROOT / "src"), str(HERE)]

import step_cost  # noqa: E402

PRECISIONS = ("fp32", "bf16")


def cpu_info() -> dict[str, Any]:
    import torch

    flags = ""
    with contextlib.suppress(OSError, StopIteration):
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    return {"machine": f"{platform.machine()}, {os.cpu_count()} cores", "torch": torch.__version__,
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "amx_bf16": " amx_bf16" in flags, "avx512_bf16": " avx512_bf16" in flags}


def gemm_times(threads: int, reps: int = 5) -> dict[str, Any]:
    """One matrix product alone, fp32 against bf16 operands, in turn: ViT-B/16's fused q/k/v projection at batch 8
    ((8 x 197, 768) @ (768, 2304): 5.6 GFLOP). Tells whether the CPU's bf16 GEMM is faster at all."""
    import torch
    import torch.nn.functional as F

    torch.set_num_threads(threads)
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(8 * 197, 768, generator=g), torch.randn(2304, 768, generator=g)
    operands = {"fp32": (x, w), "bf16": (x.bfloat16(), w.bfloat16())}
    times: dict[str, list[float]] = {p: [] for p in PRECISIONS}
    for i in range(reps + 1):
        for precision, (a, b) in operands.items():
            t = time.perf_counter()
            F.linear(a, b)
            if i:
                times[precision].append(time.perf_counter() - t)
    med = {p: statistics.median(v) for p, v in times.items()}
    flop = 2 * x.shape[0] * x.shape[1] * w.shape[0]
    return {"shape": [list(x.shape), list(w.shape)], "ms": {p: round(1e3 * v, 2) for p, v in med.items()},
            "gflop_per_s": {p: round(flop / v / 1e9, 1) for p, v in med.items()},
            "bf16_vs_fp32": round(med["bf16"] / med["fp32"], 3)}


def step_times(models: list[dict[str, Any]], threads: int, warmup: int, rounds: int) -> list[dict[str, Any]]:
    import torch

    torch.set_num_threads(threads)
    out = []
    for m in models:
        base = step_cost.base_model(m["family"], m["model"], m.get("pretrained"))
        steps = {}
        for precision in PRECISIONS:
            spec = {**m, "config": "block_lora", "device": "cpu", "precision": precision}
            steps[precision] = step_cost.prepare(spec, base)[0]
        times: dict[str, list[float]] = {p: [] for p in PRECISIONS}
        losses: dict[str, list[float]] = {p: [] for p in PRECISIONS}
        load = os.getloadavg()[0]
        for i in range(warmup + rounds):
            for precision, step in steps.items():
                t = time.perf_counter()
                losses[precision].append(step())
                if i >= warmup:
                    times[precision].append(time.perf_counter() - t)
            print(f"  {m['model']} round {i + 1}/{warmup + rounds}: " +
                  ", ".join(f"{p} {v[-1]:.2f} s" for p, v in times.items() if v), file=sys.stderr, flush=True)
        med = {p: statistics.median(v) for p, v in times.items()}
        out.append({"model": m["model"], "family": m["family"], "batch": m["batch_size"], "classes": m["classes"],
                    "step_s": {p: round(v, 4) for p, v in med.items()},
                    "times_s": {p: [round(x, 4) for x in v] for p, v in times.items()},
                    "bf16_vs_fp32": round(med["bf16"] / med["fp32"], 3), "losses": losses,
                    "load_average": [round(load, 2), round(os.getloadavg()[0], 2)]})
    return out


def accuracy(seeds: list[int], work: Path) -> dict[str, Any]:
    from blocklora.engine.rundir import RunDir
    from blocklora.pipeline.demo import MODEL, demo_config
    from blocklora.pipeline.run import run

    cells = []
    for seed in seeds:
        for precision in PRECISIONS:
            out = work / f"{precision}-seed{seed}"
            cfg = demo_config(seed=seed, overrides=(f"train.precision={precision}", "eval.zero_shot=false"))
            if RunDir(out).complete:
                r = RunDir(out).read_results()
            else:
                print(f"  accuracy: {precision} seed {seed} -> {out}", file=sys.stderr, flush=True)
                r = run(cfg, out, overwrite=out.exists())
            cells.append({"seed": seed, "precision": precision, "top1": r.top1,
                          "train_s": r.wall_time_s["train"], "iters": r.iters})
    summary = {}
    for precision in PRECISIONS:
        top = [c["top1"] for c in cells if c["precision"] == precision]
        summary[precision] = {"mean": round(statistics.mean(top), 2),
                              "std": round(statistics.stdev(top), 2) if len(top) > 1 else 0.0,
                              "train_s_mean": round(statistics.mean(c["train_s"] for c in cells
                                                                    if c["precision"] == precision), 1)}
    return {"model": MODEL, "recipe": "blocklora.pipeline.demo.demo_config, eval.zero_shot=false", "seeds": seeds,
            "cells": cells, "summary": summary}


def table(result: dict[str, Any]) -> str:
    lines = []
    if "step_time" in result:
        lines += ["| model | batch | C | fp32 s/step | bf16 s/step | bf16 / fp32 | load average (start, end) |",
                  "|---|---|---|---|---|---|---|"]
        lines += [f"| {r['model']} | {r['batch']} | {r['classes']} | {r['step_s']['fp32']:.3f} | "
                  f"{r['step_s']['bf16']:.3f} | {r['bf16_vs_fp32']:.2f} | {r['load_average'][0]}, "
                  f"{r['load_average'][1]} |" for r in result["step_time"]["rows"]]
        g = result["step_time"]["gemm"]
        lines.append(f"| one GEMM {g['shape'][0]} x {g['shape'][1]}^T | | | {g['ms']['fp32'] / 1e3:.3f} | "
                     f"{g['ms']['bf16'] / 1e3:.3f} | {g['bf16_vs_fp32']:.2f} | |")
    if "accuracy" in result:
        s = result["accuracy"]["summary"]
        lines += ["", "| precision | top-1 mean | std | training s (mean) |", "|---|---|---|---|"]
        lines += [f"| {p} | {s[p]['mean']:.2f} | {s[p]['std']:.2f} | {s[p]['train_s_mean']} |" for p in PRECISIONS]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    from blocklora.pipeline.demo import BATCH, MODEL

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "1")))
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=3, help="timed steps per precision (median)")
    ap.add_argument("--models", default=f"ViT-B-16,{MODEL}", help="comma list (open_clip names get random weights)")
    ap.add_argument("--no-step-time", action="store_true", help="skip the step-time part")
    ap.add_argument("--accuracy-seeds", default="", help="comma list of seeds: run the demo cell per seed and "
                                                          "precision (about 5 min per run on 2 cores)")
    ap.add_argument("--work", default="runs/cpu_precision", help="run directories of the accuracy part")
    ap.add_argument("--output", default=str(HERE / "results" / "cpu_precision.json"))
    args = ap.parse_args(argv)
    output = Path(args.output)
    result: dict[str, Any] = json.loads(output.read_text()) if output.exists() else {}
    result["cpu"] = cpu_info()
    if not args.no_step_time:
        models = []
        for name in (m.strip() for m in args.models.split(",") if m.strip()):
            demo = name == MODEL
            models.append({"family": "backbone" if demo else "open_clip", "model": name,
                           "pretrained": "packaged" if demo else None, "batch_size": BATCH if demo else 8,
                           "classes": 10 if demo else 100})
        t0 = time.perf_counter()
        gemm = gemm_times(args.threads)
        rows = step_times(models, args.threads, args.warmup, args.rounds)
        result["step_time"] = {"date": time.strftime("%Y-%m-%d"), "threads": args.threads, "warmup": args.warmup,
                               "rounds": args.rounds, "config": "block_lora (n 8, r 2, q/k/v, both towers)",
                               "wall_s": round(time.perf_counter() - t0, 1), "gemm": gemm, "rows": rows}
    if args.accuracy_seeds:
        seeds = [int(s) for s in args.accuracy_seeds.split(",") if s.strip()]
        result["accuracy"] = {"date": time.strftime("%Y-%m-%d"), **accuracy(seeds, Path(args.work))}
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(result, indent=1) + "\n")
    print(table(result))
    print(f"wrote {output}", file=sys.stderr)
    return result


if __name__ == "__main__":
    main()
