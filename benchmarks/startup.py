"""Start-up cost on a large test set: seconds from `blocklora train` to its first training step.

Generates (once, under --tree) a folder dataset of --images small PNG files, most of them test images (--train per
class; the rest of each class is test), then runs `blocklora train` (tiny-clip, no weights) until its first training
step has finished, and stops it. Two times per run: from the process start ("wall", what a user waits) and from the
end of the library imports (torch, open_clip, blocklora: the same for every version, and on a busy machine the
noisiest part). Each --src (a blocklora source tree, e.g. an older commit's) is run --repeats times, alternating,
so that all see the same machine load; the table gives medians.

Two modes: --no-zero-shot (only the image checks stand before the first step) and with the zero-shot pass (not
cached: a fresh BLOCKLORA_CACHE), which decodes and encodes every test image before training.

Usage:
  mkdir /tmp/bl-base && git archive <old commit> src | tar -x -C /tmp/bl-base
  .venv/bin/python benchmarks/startup.py --tree /tmp/bl-50k --src /tmp/bl-base/src --src src \\
      --output benchmarks/results/startup.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def make_tree(root: Path, images: int, classes: int, train: int, size: int) -> Path:
    """root/train/<class>/*.png (`train` per class) and root/test/<class>/*.png (the rest): `images` in all."""
    import numpy as np
    from PIL import Image

    done = root / ".complete"
    if done.exists():
        return root
    rng = np.random.default_rng(0)
    per_class = images // classes
    for c in range(classes):
        base = rng.integers(0, 256, 3)
        for i in range(per_class):
            split = "train" if i < train else "test"
            folder = root / split / f"class_{c:03d}"
            folder.mkdir(parents=True, exist_ok=True)
            pixels = np.clip(base + rng.integers(-40, 40, (size, size, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(folder / f"{i:04d}.png")
    done.touch()
    return root


# The child: imports first, then `blocklora train` with Trainer.fit stopped after the first step. It prints the
# seconds from the end of the imports to that step, and the imports' own seconds.
CHILD = """
import os, sys, time
t0 = time.perf_counter()
import torch, torchvision, open_clip
import blocklora.engine.fit as fit
from blocklora.cli.main import main
t1 = time.perf_counter()
real = fit.Trainer.fit
def until_first_step(self, on_step=None, checkpoint=None):
    def first(metrics):
        print(f"FIRST_STEP {time.perf_counter() - t1:.3f} {t1 - t0:.3f}", flush=True)
        os._exit(0)
    return real(self, on_step=first, checkpoint=checkpoint)
fit.Trainer.fit = until_first_step
sys.exit(main(sys.argv[1:]))
"""


def time_to_first_step(src: str, tree: Path, zero_shot: bool, timeout: float) -> dict[str, float]:
    """{"wall": process start -> first step, "after_imports": end of imports -> first step, "imports": ...}."""
    work = Path(tempfile.mkdtemp(prefix="bl-startup-"))
    env = {**os.environ, "PYTHONPATH": str(Path(src).resolve()), "BLOCKLORA_CACHE": str(work / "cache"),
           "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-c", CHILD, "train", "--model", "tiny-clip", "--pretrained", "none",
           "--dataset", "folder", "--root", str(tree), "--shots", "4", "--iters", "1000", "--batch-size", "8",
           "--workers", "0", "--output", str(work / "run"), *([] if zero_shot else ["--no-zero-shot"])]
    try:
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
        wall = time.perf_counter() - t0
        line = next((x for x in proc.stdout.splitlines() if x.startswith("FIRST_STEP")), None)
        if line is None:
            raise RuntimeError(f"train exited with {proc.returncode} before a step: {proc.stderr[-2000:]}")
        after, imports = map(float, line.split()[1:])
        return {"wall": round(wall, 2), "after_imports": after, "imports": imports}
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tree", type=Path, default=Path(tempfile.gettempdir()) / "blocklora-startup-tree")
    ap.add_argument("--images", type=int, default=50_000)
    ap.add_argument("--classes", type=int, default=100)
    ap.add_argument("--train", type=int, default=10, help="training images per class (the rest are test images)")
    ap.add_argument("--size", type=int, default=32, help="image side in pixels")
    ap.add_argument("--src", action="append", required=True, help="blocklora source tree to time (repeatable)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--modes", default="no_zero_shot,zero_shot")
    ap.add_argument("--timeout", type=float, default=1800)
    ap.add_argument("--output", type=Path, default=None)
    args = ap.parse_args()
    t = time.perf_counter()
    tree = make_tree(args.tree, args.images, args.classes, args.train, args.size)
    print(f"tree {tree}: {args.images} images ({time.perf_counter() - t:.0f} s to make or find)", flush=True)
    runs: dict[str, dict[str, list[dict[str, float]]]] = {m: {s: [] for s in args.src} for m in args.modes.split(",")}
    for mode in runs:
        for _ in range(args.repeats):
            for src in args.src:  # alternating: every tree sees the same machine load
                r = time_to_first_step(src, tree, mode == "zero_shot", args.timeout)
                runs[mode][src].append(r)
                print(f"  {mode:<13} {src:<32} wall {r['wall']:7.1f} s   after imports {r['after_imports']:7.1f} s "
                      f"(imports {r['imports']:.1f} s)", flush=True)
    print(f"\nmedian seconds to the first step ({args.repeats} runs each; ratio = first --src / last --src)")
    print(f"{'mode':<13} {'--src':<32} {'wall':>8} {'after imports':>14}")
    rows = {}
    for mode, per_src in runs.items():
        med = {src: {k: statistics.median(r[k] for r in rs) for k in ("wall", "after_imports", "imports")}
               for src, rs in per_src.items()}
        for src in args.src:
            print(f"{mode:<13} {src[-32:]:<32} {med[src]['wall']:>7.1f}s {med[src]['after_imports']:>13.1f}s")
        first, last = med[args.src[0]], med[args.src[-1]]
        ratios = {k: round(first[k] / last[k], 2) for k in ("wall", "after_imports")}
        print(f"{mode:<13} {'ratio':<32} {ratios['wall']:>7.2f}x {ratios['after_imports']:>13.2f}x")
        rows[mode] = {"median_s": med, "runs": per_src, "ratio_first_over_last": ratios}
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps({
            "what": "seconds from `blocklora train` to the end of its first training step: wall (from the process "
                    "start) and after_imports (from the end of the torch / open_clip / blocklora imports)",
            "srcs": args.src,
            "images": args.images, "classes": args.classes, "train_per_class": args.train, "size": args.size,
            "machine": {"cpus": os.cpu_count(), "platform": platform.platform()}, "results": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
