"""GPU check: the CUDA paths exercised and the real job's cost measured, in ONE device call inside a time budget.

    bash benchmarks/gpu_check.sh "$OUT"                                      # on the GPU machine (BENCHMARKS.md)
    .venv/bin/python benchmarks/gpu_check.py --dry-run --output /tmp/gpu     # here: the same code, CPU, tiny sizes

Writes OUTPUT/gpu_check.json (rewritten after every section, so a killed run keeps what it measured) and
OUTPUT/gpu_check.md (the tables, also printed last). Sections, in priority order; each is skipped with a note when
the budget left is shorter than what it needs (a cost section also checks before each configuration), so the run
outlasts --budget-s by at most one section's overrun (gpu_check.sh adds a hard `timeout`). Exit status 1 when a
check fails or a section breaks (its traceback is in the JSON; the other sections still run), 2 on bad arguments:


  env          torch / CUDA / GPU versions, TF32 and attention-kernel settings, the CUDA context's memory
  train_amp    30 steps of the real training loop (engine.fit.Trainer) on ViT-B/16 with random weights, both towers,
               Block-LoRA defaults, batch 32, 100 classes, fp16 autocast + GradScaler: losses and adapters finite,
               the scaler's scale at every step (a drop = a step skipped for inf/NaN gradients), adapters moved
  first_step   one step's loss and adapter gradients (GradScaler-unscaled) under fp16 and bf16 autocast against a
               float32 step (TF32 off, math attention): relative error of the loss and of the gradient vector
               (||g - g32|| / ||g32||), within TOLERANCES (calibrated on the CPU: fp16 5e-4 / 3e-3, bf16 5e-3 / 3e-2)
  merge        image and text features with adapters merged into the weights == unmerged (fp32, and under the
               autocast dtype), and unmerge restores the frozen weights
  deterministic  `blocklora train --deterministic` twice, at once, in fresh processes: adapters bit-identical
  cost_<model> one training step (median of 10 after 3 warm-up, synchronized) and peak allocated / reserved memory,
               side by side, via benchmarks/step_cost.py's configurations: floor, block_lora, lora, dense_lora
               (CLIP-LoRA's formulation), full (attention fine-tuning) on open_clip, and floor, block_lora, peft_lora
               on transformers CLIP; 100 and 1000 classes; batch 32, fp16 autocast + GradScaler
  eval_<model> images/s through the image tower (no grad, fp16 autocast, batch 256): frozen, Block-LoRA
               unmerged (what evaluation runs), merged
  projection   ImageNet 16-shot (8,000 steps of 32, 1000 classes, both towers; 50,000 test images) from the
               measured step and throughput, and its peak memory + CUDA context against the paper's 24 GB GPU

--dry-run: CPU, tiny-clip for every model, 10 / 20 classes, batch 4, 3 training steps, bf16 autocast (blocklora
runs fp16 autocast on CUDA only; the disabled GradScaler path is what runs), memory not measured. It is in the test
suite (tests/test_gpu_check.py), so this script cannot rot between the times a GPU is lent.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path[:0] = [str(ROOT / "src"), str(HERE)]

import gpu_cost  # noqa: E402
import gpu_report  # noqa: E402
import gpu_sections as sec  # noqa: E402
import step_cost  # noqa: E402  (the configurations and the training step, shared with the CPU step-cost benchmark)


@dataclass(frozen=True)
class Plan:
    device: str
    models: tuple[str, ...]  # the first one also serves the correctness sections
    classes: tuple[int, int]  # (the few-shot benchmarks' 100, ImageNet's 1000)
    batch: int
    train_steps: int
    warmup: int
    timed: int
    eval_batch: int
    eval_reps: int
    amp: str  # the autocast dtype of the recipe on this device
    det_iters: int
    workers: int


GPU = Plan("cuda", ("ViT-B-16", "ViT-L-14"), (100, 1000), 32, 30, 3, 10, 256, 10, "fp16", 8, 6)
DRY = Plan("cpu", ("tiny-clip",), (10, 20), 4, 3, 1, 2, 8, 2, "bf16", 3, 0)
# Seconds a section needs at least on the H200 (generous; a cost section then also checks before each config).
NEEDS = {"env": 5, "train_amp": 40, "first_step": 30, "merge": 20, "deterministic": 80, "cost": 30, "eval": 20,
         "projection": 0}


class Check:
    """Runs sections inside the budget and rewrites the JSON and the tables after each one."""

    def __init__(self, output: Path, budget_s: float, plan: Plan, dry_run: bool) -> None:
        self.output, self.plan, self.dry_run = output, plan, dry_run
        self.t0 = time.monotonic()
        self.budget_s = budget_s
        self.result: dict[str, Any] = {
            "meta": {"date": time.strftime("%Y-%m-%d %H:%M"), "dry_run": dry_run, "budget_s": budget_s,
                     "plan": asdict(plan), "tolerances": {"first_step": sec.TOLERANCES, "merge": sec.MERGE_TOLERANCE}},
            "sections": {}}

    def left(self) -> float:
        return self.budget_s - (time.monotonic() - self.t0)

    def run(self, name: str, needs_s: float, fn: Callable[[], dict[str, Any]]) -> None:
        if self.left() < needs_s:
            self.result["sections"][name] = {"status": "skipped", "note": f"needs about {needs_s:.0f} s, "
                                             f"{max(self.left(), 0):.0f} s of the budget left"}
        else:
            print(f"[gpu_check] {name} ({self.left():.0f} s left)", file=sys.stderr, flush=True)
            t = time.monotonic()
            try:
                out = fn()
            except Exception as e:  # noqa: BLE001 - one broken section must not cost the others their minutes
                out = {"status": "error", "error": f"{type(e).__name__}: {e}"[:2000],
                       "traceback": traceback.format_exc()[-4000:]}
            sec.free(self.plan.device)  # the section's models are gone with its frame
            out["wall_s"] = round(time.monotonic() - t, 1)
            self.result["sections"][name] = out
            print(f"[gpu_check] {name}: {out.get('status')} in {out['wall_s']} s", file=sys.stderr, flush=True)
        self.write()

    def write(self) -> None:
        """The JSON first (whatever happens to the tables), then the tables; each replaced atomically."""
        self.result["meta"]["wall_s"] = round(time.monotonic() - self.t0, 1)
        self.output.mkdir(parents=True, exist_ok=True)
        self._replace("gpu_check.json", json.dumps(self.result, indent=1) + "\n")
        try:
            table = gpu_report.markdown(self.result)
        except Exception:  # noqa: BLE001 - a table bug must not cost the run its results
            table = f"# GPU check\n\nthe tables could not be built:\n\n    {traceback.format_exc()[-1500:]}\n"
        self._replace("gpu_check.md", table)

    def _replace(self, name: str, text: str) -> None:
        tmp = self.output / f".{name}.tmp"
        tmp.write_text(text)
        os.replace(tmp, self.output / name)


# -- main --------------------------------------------------------------------------------------------------------------
SECTIONS = ("env", "train_amp", "first_step", "merge", "deterministic", "cost", "eval", "projection")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--output", required=True, help="folder for gpu_check.json and gpu_check.md")
    ap.add_argument("--budget-s", type=float, default=300.0, help="seconds for the whole check (default 300)")
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny sizes: the same code paths in seconds")
    ap.add_argument("--sections", default=",".join(SECTIONS), help=f"comma list among {', '.join(SECTIONS)}")
    ap.add_argument("--models", default="", help="comma list of open_clip architectures (default ViT-B-16,ViT-L-14)")
    args = ap.parse_args(argv)
    wanted = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = sorted(set(wanted) - set(SECTIONS))
    if unknown or not wanted:
        what = f"unknown section(s) {', '.join(unknown)}" if unknown else "no section given"
        print(f"error: {what}: use {', '.join(SECTIONS)}", file=sys.stderr)
        return 2
    import torch

    if not args.dry_run and not torch.cuda.is_available():
        print("error: no CUDA device here: run on the GPU machine, or pass --dry-run for the CPU check",
              file=sys.stderr)
        return 2
    plan = DRY if args.dry_run else GPU
    if args.dry_run:
        torch.set_num_threads(1)  # tiny sizes gain nothing from threads; a shared CI machine loses to spinning
    import gc

    import open_clip  # noqa: F401 - the libraries every section uses, imported before the freeze below
    import peft  # noqa: F401
    import transformers  # noqa: F401

    import blocklora.pipeline.run  # noqa: F401

    gc.freeze()  # the libraries' objects stay out of every later gc.collect (free() runs one per configuration)
    if args.models:
        plan = Plan(**{**asdict(plan), "models": tuple(m.strip() for m in args.models.split(",") if m.strip())})
    check = Check(Path(args.output), args.budget_s, plan, args.dry_run)
    check.write()  # the output folder is writable, and a run killed in its first section still leaves both files
    bases: dict[str, Any] = {}

    def base(model: str):  # the open_clip Backbone with random weights, built once per architecture
        if model not in bases:
            bases[model] = step_cost.base_model("open_clip", model)
        return bases[model]

    first = plan.models[0]
    runs: list[tuple[str, float, Callable[[], dict[str, Any]]]] = [
        ("env", NEEDS["env"], lambda: sec.env_section(plan)),
        ("train_amp", NEEDS["train_amp"], lambda: sec.train_amp_section(plan, base(first))),
        ("first_step", NEEDS["first_step"], lambda: sec.first_step_section(plan, base(first))),
        ("merge", NEEDS["merge"], lambda: sec.merge_section(plan, base(first))),
        ("deterministic", NEEDS["deterministic"], lambda: sec.deterministic_section(plan, check.left))]
    for model in plan.models:
        runs.append((f"cost_{model}", NEEDS["cost"],
                     lambda m=model: gpu_cost.cost_section(plan, m, check.left, base(m))))
        runs.append((f"eval_{model}", NEEDS["eval"], lambda m=model: gpu_cost.eval_section(plan, m, base(m))))
    runs.append(("projection", 0, lambda: gpu_report.projection(check.result)))
    for name, needs, fn in runs:
        if (name.split("_")[0] if name.startswith(("cost_", "eval_")) else name) in wanted:
            check.run(name, needs, fn)
        if name in ("deterministic",) or name.startswith("eval_"):
            bases.clear()  # a model whose sections are done: give its CPU copy back
    print((check.output / "gpu_check.md").read_text())
    statuses = [s.get("status") for s in check.result["sections"].values()]
    return 1 if any(s in ("fail", "error") for s in statuses) else 0


if __name__ == "__main__":
    raise SystemExit(main())
