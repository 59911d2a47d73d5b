"""Start-up cost on a large test set: seconds from `blocklora train` to its first training step.

Generates (once, under --tree) a folder dataset of --images small PNG files, most of them test images (--train per
class; the rest of each class is test), then times `blocklora train` (tiny-clip, no weights) until the first line
of metrics.jsonl appears, and kills it. Each --src (a blocklora source tree, e.g. a `git worktree` of an older
commit) is run --repeats times, alternating, so that both see the same machine load.

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


def time_to_first_step(src: str, tree: Path, zero_shot: bool, timeout: float) -> float:
    work = Path(tempfile.mkdtemp(prefix="bl-startup-"))
    out = work / "run"
    env = {**os.environ, "PYTHONPATH": str(Path(src).resolve()), "BLOCKLORA_CACHE": str(work / "cache"),
           "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "blocklora", "train", "--model", "tiny-clip", "--pretrained", "none",
           "--dataset", "folder", "--root", str(tree), "--shots", "4", "--iters", "1000", "--batch-size", "8",
           "--workers", "0", "--output", str(out), *([] if zero_shot else ["--no-zero-shot"])]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        while time.perf_counter() - t0 < timeout:
            metrics = out / "metrics.jsonl"
            if metrics.exists() and metrics.stat().st_size > 0:
                return time.perf_counter() - t0
            if proc.poll() is not None:
                raise RuntimeError(f"train exited with {proc.returncode}: {proc.stderr.read()[-2000:]}")
            time.sleep(0.05)
        raise RuntimeError(f"no training step within {timeout} s")
    finally:
        proc.kill()
        proc.wait()
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
    times: dict[str, dict[str, list[float]]] = {m: {s: [] for s in args.src} for m in args.modes.split(",")}
    for mode in times:
        for _ in range(args.repeats):
            for src in args.src:  # alternating: both trees see the same machine load
                seconds = time_to_first_step(src, tree, mode == "zero_shot", args.timeout)
                times[mode][src].append(seconds)
                print(f"  {mode:<13} {src:<40} {seconds:8.1f} s", flush=True)
    print(f"\n{'mode':<13} " + " ".join(f"{s[-28:]:>30}" for s in args.src) + "   ratio (first / last)")
    rows = {}
    for mode, per_src in times.items():
        medians = {s: statistics.median(v) for s, v in per_src.items()}
        first, last = medians[args.src[0]], medians[args.src[-1]]
        rows[mode] = {"median_s": medians, "runs_s": per_src, "ratio_first_over_last": round(first / last, 2)}
        print(f"{mode:<13} " + " ".join(f"{medians[s]:>28.1f} s" for s in args.src) + f"   {first / last:.2f}x")
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps({
            "what": "seconds from `blocklora train` to the first training step (first metrics.jsonl line)",
            "images": args.images, "classes": args.classes, "train_per_class": args.train, "size": args.size,
            "machine": {"cpus": os.cpu_count(), "platform": platform.platform()}, "results": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
