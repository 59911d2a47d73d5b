"""The measuring sections of benchmarks/gpu_check.py: step cost and memory of every configuration, evaluation
throughput. Each returns a dict for the JSON with "status": done, or partial when the budget cut rows."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import gpu_report
import step_cost
from gpu_sections import adapted, free, sync


def cost_section(plan, model: str, left: Callable[[], float], open_clip_base) -> dict[str, Any]:
    """Every configuration's step time and peak memory, one after the other in this process (peak statistics
    reset after each configuration's warm-up; freed in between). Projection-critical rows first."""
    c_small, c_large = plan.classes
    rows = [("open_clip", cfg, c) for c in (c_small, c_large) for cfg in ("floor", "block_lora")]
    rows += [(fam, cfg, c) for c in (c_small, c_large) for fam, cfg in (
        ("open_clip", "lora"), ("open_clip", "dense_lora"), ("open_clip", "full"), ("transformers", "floor"),
        ("transformers", "block_lora"), ("transformers", "peft_lora"))]
    bases: dict[str, Any] = {"open_clip": open_clip_base}
    results: list[dict[str, Any]] = []
    per_row = None
    for family, config, classes in rows:
        if per_row is not None and left() < per_row * 1.5 + 5:
            results.append({"family": family, "config": config, "classes": classes, "skipped": "budget"})
            continue
        t = time.monotonic()
        if family not in bases:
            bases[family] = step_cost.base_model(family, model)
        results.append({"family": family, "config": config, "classes": classes,
                        **measure(plan, model, family, config, classes, bases[family])})
        per_row = max(per_row or 0.0, time.monotonic() - t)
    gpu_report.add_floor_ratios(results)
    missing = sum("step_ms" not in r for r in results)
    return {"status": "partial" if missing else "done", "model": model, "batch": plan.batch, "precision": plan.amp,
            "warmup": plan.warmup, "timed": plan.timed, "rows": results,
            **({"note": f"{missing} of {len(results)} rows not measured (budget or error)"} if missing else {})}


def measure(plan, model: str, family: str, config: str, classes: int, base) -> dict[str, Any]:
    import torch

    free(plan.device)
    spec = {"family": family, "config": config, "model": model, "device": plan.device, "classes": classes,
            "batch_size": plan.batch, "precision": plan.amp}
    try:
        step, info = step_cost.prepare(spec, base)
        for _ in range(plan.warmup):
            step()
        cuda = plan.device == "cuda"
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        times = []
        for _ in range(plan.timed):
            t = time.perf_counter()
            loss = step()  # synchronizes on CUDA
            times.append(time.perf_counter() - t)
        out: dict[str, Any] = {"step_ms": round(1e3 * statistics.median(times), 2),
                               "times_ms": [round(1e3 * x, 2) for x in times], "trainable": info["trainable"],
                               "text_length": info["text_length"], "finite": bool(torch.isfinite(torch.tensor(loss)))}
        if cuda:
            out.update(peak_alloc_mib=round(torch.cuda.max_memory_allocated() / 2**20),
                       peak_reserved_mib=round(torch.cuda.max_memory_reserved() / 2**20))
        del step
    except torch.OutOfMemoryError:
        out = {"error": "out of memory"}
    free(plan.device)
    return out


def eval_section(plan, model: str, base) -> dict[str, Any]:
    import torch

    from blocklora.adapters.inject import adapters_disabled, merge, unmerge
    from blocklora.engine.runtime import make_runtime

    bb = adapted(base, plan.device)
    bb.model.eval()
    rt = make_runtime(plan.device, plan.amp)
    images = torch.randn(plan.eval_batch, 3, bb.image_size, bb.image_size, device=plan.device)

    def images_per_s() -> float:
        times = []
        with torch.no_grad(), rt.autocast():
            for i in range(2 + plan.eval_reps):
                t = time.perf_counter()
                bb.encode_images(images)
                sync(plan.device)
                if i >= 2:
                    times.append(time.perf_counter() - t)
        return round(plan.eval_batch / statistics.median(times), 1)

    out: dict[str, Any] = {"status": "done", "model": model, "batch": plan.eval_batch, "precision": plan.amp}
    with adapters_disabled(bb.model):
        out["frozen"] = images_per_s()
    out["block_lora"] = images_per_s()
    merge(bb.model)
    out["block_lora_merged"] = images_per_s()
    unmerge(bb.model)
    return out
