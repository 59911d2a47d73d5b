"""Tables of benchmarks/gpu_check.py's result: floor ratios, the ImageNet 16-shot projection, markdown."""

from __future__ import annotations

from typing import Any

# The real job: ImageNet 16-shot with the reference recipe (500 x K steps of 32, both towers, all 1000 class prompts
# through the text tower every step), tested on the 50,000 validation images.
JOB = {"steps": 8000, "batch": 32, "classes": 1000, "test_images": 50_000}
# The paper: "CLIP can be fine-tuned on ImageNet few-shot on one 24 GB GPU" (RTX 3090 / 4090, A10: 24 GiB cards).
CARD_GIB = 24.0
PROJECTED = ("block_lora", "lora", "dense_lora", "full", "floor")


def add_floor_ratios(rows: list[dict[str, Any]]) -> None:
    """time_x_floor / peak_x_floor for every measured row against the floor of its family at its class count."""
    floors = {(r["family"], r["classes"]): r for r in rows if r["config"] == "floor" and "step_ms" in r}
    for r in rows:
        floor = floors.get((r["family"], r["classes"]))
        if "step_ms" not in r or floor is None:
            continue
        r["time_x_floor"] = round(r["step_ms"] / floor["step_ms"], 3)
        if r.get("peak_alloc_mib") and floor.get("peak_alloc_mib"):
            r["peak_x_floor"] = round(r["peak_alloc_mib"] / floor["peak_alloc_mib"], 3)


def projection(result: dict[str, Any]) -> dict[str, Any]:
    """Training hours, evaluation minutes and memory of the real job from the measured cost and throughput."""
    sections, meta = result["sections"], result["meta"]
    large = meta["plan"]["classes"][1]
    context = sections.get("env", {}).get("cuda_context_mib")
    rows = []
    for name, sec in sections.items():
        if not name.startswith("cost_") or "rows" not in sec:
            continue
        ips = sections.get(f"eval_{sec['model']}", {}).get("block_lora")
        for r in sec["rows"]:
            if r["family"] != "open_clip" or r["classes"] != large or r["config"] not in PROJECTED \
                    or "step_ms" not in r:
                continue
            row = {"model": sec["model"], "config": r["config"], "step_ms": r["step_ms"],
                   "train_h": round(JOB["steps"] * r["step_ms"] / 3.6e6, 2),
                   "eval_min": round(JOB["test_images"] / ips / 60, 2) if ips else None}
            if r.get("peak_reserved_mib") is not None and context is not None:
                need = (r["peak_reserved_mib"] + context) / 1024
                row.update(peak_alloc_gib=round(r["peak_alloc_mib"] / 1024, 2), card_gib_needed=round(need, 2),
                           fits_24gb=need <= CARD_GIB)
            rows.append(row)
    if not rows:
        return {"status": "skipped", "note": f"no open_clip step measured at {large} classes"}
    out: dict[str, Any] = {"status": "done", "job": JOB, "card_gib": CARD_GIB, "cuda_context_mib": context,
                           "rows": rows}
    if meta.get("dry_run"):
        out["note"] = "dry run: tiny model and sizes, the figures are not a projection"
    return out


def _sci(x: float | None) -> str:
    return "" if x is None else f"{x:.2e}"


def _correctness(sections: dict[str, Any]) -> list[str]:
    lines = ["| check | measured | bound | result |", "|---|---|---|---|"]
    t = sections.get("train_amp", {})
    if "losses" in t:
        scale = f"scale {t['scales'][0]:g} -> {t['scales'][-1]:g}, {t['scale_drops']} skipped" \
            if t["scaler_enabled"] else "GradScaler disabled (a no-op)"
        lines.append(f"| {t['steps']} training steps, {t['precision']} autocast ({t['model']}, batch {t['batch']}, "
                     f"{t['classes']} classes) | loss {t['losses'][0]:.4f} -> {t['losses'][-1]:.4f}; {scale}; "
                     f"adapters finite: {t['finite_adapters']}, moved: {t['adapters_moved']} | all finite | "
                     f"{t['status']} |")
    f = sections.get("first_step", {})
    for precision in ("fp16", "bf16"):
        r = f.get(precision)
        if isinstance(r, dict) and "loss_rel_err" in r:
            lines.append(f"| first step {precision} vs fp32 (loss; adapter gradients) | {_sci(r['loss_rel_err'])}; "
                         f"{_sci(r['grad_rel_err'])} (cosine {r['grad_cosine']:.6f}) | "
                         f"{_sci(r['tolerance']['loss'])}; {_sci(r['tolerance']['grad'])} | {r['status']} |")
        elif isinstance(r, dict):
            lines.append(f"| first step {precision} vs fp32 | {r.get('note', '')} | | {r.get('status')} |")
    m = sections.get("merge", {})
    for precision in ("fp32", "fp16", "bf16"):
        r = m.get(precision)
        if isinstance(r, dict):
            lines.append(f"| merged == unmerged features, {precision} | rel. {_sci(r['rel_err'])} | "
                         f"{_sci(r['tolerance'])} | {r['status']} |")
    if "unmerge_max_rel_change" in m:
        lines.append(f"| unmerge restores the frozen weights | max rel. {_sci(m['unmerge_max_rel_change'])} | "
                     f"1.00e-06 | {'pass' if m['unmerge_max_rel_change'] <= 1e-6 else 'fail'} |")
    d = sections.get("deterministic", {})
    if "bit_identical" in d:
        lines.append(f"| `train --deterministic` twice ({d['model']}, {d['precision']}, {d['iters']} steps) | "
                     f"{d['tensors']} adapter tensors, max abs diff {d['max_abs_diff']:g} | bit-identical | "
                     f"{d['status']} |")
    return lines


def _cost(sec: dict[str, Any]) -> list[str]:
    lines = [f"Step cost, {sec['model']}: batch {sec['batch']}, {sec['precision']} autocast, median of "
             f"{sec['timed']} steps after {sec['warmup']} warm-up", "",
             "| family | config | C | step ms | x floor | peak alloc MiB | x floor | peak reserved MiB | trainable |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in sec["rows"]:
        head = f"| {r['family']} | {r['config']} | {r['classes']} |"
        if "step_ms" not in r:
            lines.append(f"{head} {r.get('error') or 'skipped: ' + r.get('skipped', '')} | | | | | |")
            continue
        lines.append(f"{head} {r['step_ms']:.1f} | {r.get('time_x_floor', '')} | {r.get('peak_alloc_mib', '')} | "
                     f"{r.get('peak_x_floor', '')} | {r.get('peak_reserved_mib', '')} | {r['trainable']:,} |")
    return lines


def markdown(result: dict[str, Any]) -> str:
    meta, sections = result["meta"], result["sections"]
    env = sections.get("env", {})
    where = env.get("gpu") or ("CPU dry run (tiny sizes)" if meta["dry_run"] else "?")
    out = [f"# GPU check: {where}", "",
           f"{meta['date']}; torch {env.get('torch', '?')}, CUDA {env.get('cuda') or '-'}, "
           f"open_clip {env.get('open_clip_torch', '?')}, transformers {env.get('transformers', '?')}, "
           f"peft {env.get('peft', '?')}; {meta.get('wall_s', 0):.0f} s of a {meta['budget_s']:.0f} s budget.", "",
           "## Correctness", "", *_correctness(sections), ""]
    for name, sec in sections.items():
        if name.startswith("cost_") and "rows" in sec:
            out += [f"## {name}", "", *_cost(sec), ""]
    evals = [s for n, s in sections.items() if n.startswith("eval_") and "frozen" in s]
    if evals:
        out += ["## Evaluation throughput (image tower, no grad)", "",
                "| model | batch | precision | frozen img/s | Block-LoRA unmerged img/s | merged img/s | "
                "50,000 images s |", "|---|---|---|---|---|---|---|"]
        out += [f"| {s['model']} | {s['batch']} | {s['precision']} | {s['frozen']} | {s['block_lora']} | "
                f"{s['block_lora_merged']} | {50_000 / s['block_lora']:.0f} |" for s in evals]
        out.append("")
    p = sections.get("projection", {})
    if p.get("rows"):
        out += ["## ImageNet 16-shot, projected (8,000 steps of 32, 1000 classes, both towers; 50,000 test images)",
                "", p.get("note", f"memory = peak reserved + CUDA context ({p.get('cuda_context_mib')} MiB), "
                                  f"against a {CARD_GIB:.0f} GiB card"), "",
                "| model | config | step ms | training h | evaluation min | peak alloc GiB | card GiB needed | "
                "fits 24 GB |", "|---|---|---|---|---|---|---|---|"]
        out += [f"| {r['model']} | {r['config']} | {r['step_ms']:.1f} | {r['train_h']} | {r['eval_min'] or ''} | "
                f"{r.get('peak_alloc_gib', '')} | {r.get('card_gib_needed', '')} | {r.get('fits_24gb', '')} |"
                for r in p["rows"]]
        out.append("")
    other = [f"- {n}: {s['status']}: {s.get('note') or s.get('error', '')}" for n, s in sections.items()
             if s.get("status") in ("skipped", "error", "fail", "partial")]
    if other:
        out += ["## Not passed, skipped or partial", "", *other, ""]
    return "\n".join(out)
