"""The main job as one function, and the other user actions (evaluate, predict, export) as small ones.

    run(cfg, output):  config -> backbone -> data (K shots, split file) -> zero-shot (cached) -> inject -> fit
                       -> evaluate -> save adapter + results.json
The CLI and the tests call these; nothing here parses argv.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import resource
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ._version import __version__
from .adapters.inject import count_trainable, merged_state_dict
from .adapters.io import read_adapter_meta
from .backbones import Backbone, load_backbone
from .backbones.fingerprint import load_adapter, save_adapter
from .config import RunConfig
from .cross import PREFIX as CROSS
from .cross import evaluate_targets, load_targets
from .data import (
    DATASETS,
    DatasetSplits,
    Item,
    evenly_spaced,
    limit_split,
    load_dataset,
    read_split_file,
    read_split_header,
    sample_few_shot,
    subsample_classes,
    subsample_fewshot,
    verify_images,
    write_split_file,
)
from .data.fewshot import split_file_bytes
from .engine import evaluate as ev
from .engine.distributed import all_ranks
from .engine.files import JsonlWriter, atomic_write, load_torch, run_lock, save_torch, write_json
from .engine.fit import Trainer, TrainingDiverged
from .engine.logits import Logits
from .engine.logits import resolve as resolve_logits
from .engine.runtime import Runtime, default_workers, deterministic, make_runtime, seed_everything
from .errors import BlockLoRAError, DataError

log = logging.getLogger("blocklora")

RESULTS, CONFIG, SPLIT, METRICS, LOG, CHECKPOINT, ADAPTER = (
    "results.json", "config.json", "split.json", "metrics.jsonl", "train.log", "checkpoint.pt", "adapter")


@dataclass
class Prepared:
    """Everything a run needs, built and validated before anything is written."""

    cfg: RunConfig  # resolved (RunConfig.resolved): what the run uses and records
    request: RunConfig  # as asked (None = unset): what --resume compares
    backbone: Backbone
    data: DatasetSplits  # classes as trained (all, or the base half)
    fewshot: Any  # data.fewshot.FewShotSplit as drawn (or read from the split file)
    train_items: list[Item]  # fewshot.train minus skipped unreadable images
    split_sha256: str | None  # of the split file given by the user
    eval_sets: dict[str, DatasetSplits]  # name -> dataset to test on ("" = the trained classes)
    runtime: Runtime
    bad_images: list[tuple[str, str]]
    modules: list[str]  # the adapted modules (injected, probed)
    logits: Logits


def resolve(cfg: RunConfig) -> tuple[RunConfig, DatasetSplits]:
    """The config the run uses (RunConfig.resolved: the split file's draw, the method's recipe) and the full dataset.

    With a split file its dataset, shots, seed, sampler, replace and class subset (found by comparing its class
    names with the dataset's halves) are the run's; an explicit option that contradicts them is an error.
    """
    if not cfg.data.split_file:
        cfg = cfg.resolved()
        return cfg, load_dataset(cfg.data.dataset, cfg.data.root)
    header = read_split_header(cfg.data.split_file)
    draw = {k: header[k] for k in ("shots", "seed", "sampler", "replace")}
    cfg.resolved(draw)  # a conflicting option fails before any dataset is read
    # The file names the dataset as read (DatasetSplits.name): a benchmark key, or a folder / CSV dataset's own name.
    key = cfg.data.dataset or (header["dataset"] if header["dataset"] in DATASETS else
                               "csv" if Path(cfg.data.root).is_file() else "folder")
    full = load_dataset(key, cfg.data.root)
    if full.name != header["dataset"]:
        raise DataError(f"the split file {cfg.data.split_file} was drawn from dataset {header['dataset']!r}, not "
                        f"{full.name!r}: use the split file of this dataset, or the matching --dataset/--root")
    draw["dataset"] = key
    subset = next((c for c in ("all", "base", "new") if subsample_classes(full, c).classnames == header["classnames"]),
                  None)  # None: read_split_file names the first differing class
    return cfg.resolved({**draw, **({"classes": subset} if subset else {})}), full


def prepare(cfg: RunConfig, rank: int = 0, world_size: int = 1, recorded_quick_gelu: bool | None = None) -> Prepared:
    """Resolve the config, build backbone, data and few-shot split and check that the adapter fits: every user
    error surfaces here. `recorded_quick_gelu`: the activation a resumed run started with."""
    runtime = make_runtime(cfg.device, cfg.train.precision, rank, world_size)
    request = cfg
    cfg, full = resolve(cfg)
    data = subsample_classes(full, cfg.data.classes) if cfg.data.classes != "all" else full
    eval_sets = {"": limit_split(data, cfg.eval.split, cfg.eval.limit)}
    if cfg.data.classes == "base":  # base-to-new: the same adapter is also tested on the unseen half
        eval_sets["new"] = limit_split(subsample_classes(full, "new"), cfg.eval.split, cfg.eval.limit)
    if cfg.data.split_file:
        fewshot, sha = read_split_file(cfg.data.split_file, data)
    else:
        # CoCoOp draws the K shots over all classes, then keeps the base half: the same draws as peers.
        fewshot = sample_few_shot(full, cfg.data.shots, cfg.data.seed, cfg.data.sampler, cfg.data.replace)
        fewshot = subsample_fewshot(fewshot, len(full.classnames), cfg.data.classes)
        sha = None
    backbone = load_backbone(cfg.model, cfg.pretrained, cfg.quick_gelu, recorded_quick_gelu, tokenizer=cfg.tokenizer)
    backbone.tokenizer  # noqa: B018 - a tokenizer out of reach fails here, before any work
    logits = resolve_logits(cfg.train.logit_scale, cfg.train.loss, backbone.learned_logit_scale(),
                            backbone.learned_logit_bias(), backbone.name)
    # n_blocks vs widths, towers, layers, and a probe forward proving every adapter is called: fail before any
    # work. Seeded: the adapters' initial values are a function of the seed.
    seed_everything(cfg.data.seed)
    modules = backbone.inject(cfg.adapter)
    if cfg.train.grad_checkpointing:  # block-level: the adapters sit inside the checkpointed blocks
        backbone.set_grad_checkpointing(True)
    test_items = [i for s in eval_sets.values() for i in getattr(s, cfg.eval.split)]
    if not test_items:
        raise DataError(f"dataset {data.name} at {data.root} has no {cfg.eval.split} images to evaluate on")
    to_check = list(fewshot.train) + test_items
    bad = verify_images(to_check, data.image_reader)
    # cross-dataset / DG test sets (eval.datasets), checked like the rest
    targets = {k: limit_split(t, cfg.eval.split, cfg.eval.limit) for k, t in load_targets(cfg).items()}
    for target in targets.values():
        bad += verify_images(getattr(target, cfg.eval.split), target.image_reader)
    eval_sets.update(targets)
    train_items = list(fewshot.train)
    if bad:
        if not cfg.data.skip_bad_images:
            path, why = bad[0]
            raise DataError(f"unreadable image {path} ({why}; {len(bad)} bad in all): fix or remove it, or pass "
                            "data.skip_bad_images=true to skip such files")
        bad_paths = {p for p, _ in bad}
        train_items = [i for i in train_items if i.path not in bad_paths]
        for name, s in eval_sets.items():
            eval_sets[name] = _without(s, bad_paths)
        if not train_items:
            raise DataError("every training image is unreadable: nothing to train on")
    return Prepared(cfg, request, backbone, data, fewshot, train_items, sha, eval_sets, runtime, bad, modules,
                    logits)


def _without(splits: DatasetSplits, bad: set[str]) -> DatasetSplits:
    from dataclasses import replace

    keep = lambda items: [i for i in items if i.path not in bad]  # noqa: E731
    return replace(splits, train=keep(splits.train), val=keep(splits.val), test=keep(splits.test))


def _peak_memory_mb(runtime: Runtime) -> dict[str, float]:
    out = {"cpu_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}
    if runtime.device.type == "cuda":
        out["cuda_max_allocated_mb"] = round(torch.cuda.max_memory_allocated(runtime.device) / 2**20, 1)
    return out


def _log_to(directory: Path, append: bool) -> logging.Handler:
    handler = logging.FileHandler(directory / LOG, mode="a" if append else "w")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    return handler


def zero_shot(backbone: Backbone, data: DatasetSplits, items: Sequence[Item], templates: Sequence[str],
              runtime: Runtime, batch_size: int, workers: int, use_cache: bool = True,
              features: dict | None = None, split: str = "test") -> dict[str, Any]:
    """Accuracy of the frozen model (adapters, if any, switched off) on `items` of `split`, cached by every input
    (ev.zero_shot_key). No items is an error: an accuracy over nothing is not 0%."""
    from .adapters.inject import adapters_disabled

    if not items:
        raise DataError(f"dataset {data.name} at {data.root} has no {split} images: check --root and the "
                        f"dataset's layout, or choose another --split")
    backbone.tokenizer  # noqa: B018 - a tokenizer out of reach fails here, before the images are read
    key = ev.zero_shot_key(backbone, runtime, data, split, items, templates)
    cached = ev.read_cached(key) if use_cache else None
    if runtime.world_size > 1 and not all_ranks(cached is not None, runtime.device):
        cached = None  # a cache on some ranks only (node-local homes): all compute, as the evaluation is collective
    if cached is not None and features is None:
        return {**cached, "cached": True}
    with adapters_disabled(backbone.model):
        feats = ev.image_features(backbone, items, data.image_reader, runtime, batch_size, workers, "zero-shot")
        if features is not None:
            features["frozen"] = feats
        result = ev.accuracy(backbone, items, data.image_reader, data.classnames, templates, runtime,
                             features=feats)
    if runtime.is_main:
        ev.write_cached(key, result)
    return {**result, "cached": False}


def run(cfg: RunConfig, output: str | Path, overwrite: bool = False, resume: bool = False,
        rank: int = 0, world_size: int = 1) -> dict[str, Any]:
    """Train an adapter on K shots and report accuracy. Writes output/{results.json, adapter/, split.json, ...}."""
    output = Path(output)
    if output.exists() and not output.is_dir():
        raise BlockLoRAError(f"--output {output} is a file: choose a directory path")
    if output.exists() and not (overwrite or resume):
        raise BlockLoRAError(f"{output} already exists: choose another --output, --resume it, or --overwrite")
    resume = resume and (output / CONFIG).exists()  # --resume on a run that never started: start it
    saved: dict[str, Any] = {}
    if resume:
        saved = json.loads((output / CONFIG).read_text())
        asked = saved.get("request_hash", saved.get("config_hash"))
        if asked != cfg.hash():
            raise BlockLoRAError(f"{output} was started with another configuration (hash {asked} vs "
                                 f"{cfg.hash()}): resume with the same options")
        if (output / RESULTS).exists():
            log.info("%s is complete: nothing to resume", output)
            return json.loads((output / RESULTS).read_text())
    with deterministic(cfg.train.deterministic):  # the process's own settings come back afterwards
        return _prepare_and_run(cfg, output, overwrite, resume, rank, world_size, saved)


def _prepare_and_run(cfg: RunConfig, output: Path, overwrite: bool, resume: bool, rank: int,
                     world_size: int, saved: dict[str, Any]) -> dict[str, Any]:
    main = rank == 0
    t0 = time.perf_counter()
    # every user error surfaces here, before anything is written; a resumed run keeps its recorded activation
    p = prepare(cfg, rank, world_size, saved.get("quick_gelu"))
    if saved and saved.get("config_hash") != p.cfg.hash():
        raise BlockLoRAError(f"{output} resolves to another configuration now (hash {saved.get('config_hash')} vs "
                             f"{p.cfg.hash()}: blocklora's defaults changed since it started): start it again with "
                             "--overwrite")
    _barrier(world_size)  # every rank has looked at `output` before rank 0 creates it
    created = not output.exists()
    if main:
        output.mkdir(parents=True, exist_ok=True)
    _barrier(world_size)
    try:
        with run_lock(output) if main else contextlib.nullcontext():
            if main and overwrite and not resume and not created:
                _clear(output)  # only once we hold the lock: never under a run that is still writing
            return _run_locked(p, output, resume, t0)
    except BlockLoRAError as e:
        # A user error after the directory was made (not a diverged run, whose checkpoint is worth keeping):
        # leave nothing behind.
        if main and created and not isinstance(e, TrainingDiverged) and not (output / CHECKPOINT).exists():
            shutil.rmtree(output, ignore_errors=True)
        raise


def _truncate_metrics(path: Path, step: int) -> None:
    """Keep the metric lines of steps <= `step` (a resumed run redoes the steps after its checkpoint)."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["step"] <= step:
                kept.append(line)
        except (ValueError, KeyError, TypeError):
            break  # a line cut by a kill: drop it and what follows
    text = "".join(k + "\n" for k in kept)
    atomic_write(path, lambda fh: fh.write(text.encode()))


def _clear(directory: Path) -> None:
    for child in directory.iterdir():
        if child.name == ".lock":
            continue
        shutil.rmtree(child) if child.is_dir() and not child.is_symlink() else child.unlink()


def _run_locked(p: Prepared, output: Path, resume: bool, t0: float) -> dict[str, Any]:
    cfg, rt, backbone, data = p.cfg, p.runtime, p.backbone, p.data
    main = rt.is_main
    handler = _log_to(output, append=resume) if main else None
    if main:
        for stale in output.glob(".*.tmp"):  # a temporary file of a write that a kill interrupted
            stale.unlink(missing_ok=True)
    try:
        workers = cfg.data.workers if cfg.data.workers >= 0 else default_workers()
        if main:
            act = backbone.activation
            write_json(output / CONFIG, {"config": cfg.to_dict(), "config_hash": cfg.hash(),
                                         "request": p.request.to_dict(), "request_hash": p.request.hash(),
                                         "quick_gelu": act.quick_gelu if act else None,
                                         "blocklora_version": __version__})
            split_path = output / SPLIT
            if p.split_sha256 is None:  # the drawn split, byte-identical for the same seed: its hash names it
                sha = write_split_file(split_path, data, p.fewshot)
            else:  # the user's split file, kept verbatim beside the results
                sha = p.split_sha256
                if Path(cfg.data.split_file).resolve() != split_path.resolve():
                    shutil.copyfile(cfg.data.split_file, split_path)
            log.info("run %s: %s on %s (%d classes), %d shots, seed %d, split %s", output, backbone.name,
                     data.name, len(data.classnames), cfg.data.shots, cfg.data.seed, sha[:12])
        else:  # the hash rank 0 writes: every rank checks it against a checkpoint on --resume
            sha = p.split_sha256 or hashlib.sha256(split_file_bytes(data, p.fewshot)).hexdigest()
        results: dict[str, Any] = {"blocklora_version": __version__}
        test_items = getattr(p.eval_sets[""], cfg.eval.split)  # limited to eval.limit, unreadable files dropped
        backbone.to(rt.device)
        backbone.cast_frozen(rt.frozen_dtype(cfg.train.frozen_dtype))  # before zero-shot: it runs the same model
        # 1. zero-shot on the frozen model (cached per backbone fingerprint + dataset + prompts)
        features: dict[str, Any] = {}
        vision_adapted = "vision" in cfg.adapter.towers
        t_eval = time.perf_counter()
        if cfg.eval.zero_shot:
            zs = zero_shot(backbone, data, test_items, [cfg.train.template], rt, cfg.eval.batch_size, workers,
                           features=None if vision_adapted else features, split=cfg.eval.split)
            results["zero_shot_top1"] = zs["top1"]
            results["zero_shot_per_class"] = zs["per_class"]
            if cfg.eval.dataset_templates and data.template != cfg.train.template:
                zs2 = zero_shot(backbone, data, test_items, [data.template], rt, cfg.eval.batch_size, workers,
                                features=None if vision_adapted or "frozen" in features else features,
                                split=cfg.eval.split)
                results["zero_shot_dataset_template_top1"] = zs2["top1"]
            log.info("zero-shot top-1 %.2f%%%s", zs["top1"], " (cached)" if zs.get("cached") else "")
        eval_s = time.perf_counter() - t_eval
        # 2. train the adapters (injected by prepare); the training RNG starts from the seed, cached zero-shot or not
        seed_everything(cfg.data.seed)
        modules = p.modules  # the factors are fp32 (injected before cast_frozen, which leaves them alone)
        backbone.to(rt.device)
        total = cfg.train.total_iters(cfg.data.shots)
        trainer = Trainer(backbone, p.train_items, data.image_reader, data.classnames, cfg.train, rt,
                          cfg.data.seed, total, workers, p.logits)
        ckpt_path = output / CHECKPOINT
        if resume and ckpt_path.exists():
            state = load_torch(ckpt_path)
            if state.get("split_sha256") != sha:
                raise BlockLoRAError(f"{ckpt_path} belongs to another K-shot split ({state.get('split_sha256')}"
                                     f" vs {sha}): start the run again with --overwrite")
            trainer.load_state_dict(state)
            log.info("resumed at step %d of %d", trainer.state.step, total)
        if main:
            _truncate_metrics(output / METRICS, trainer.state.step)  # steps after the checkpoint are redone
        metrics = JsonlWriter(output / METRICS, append=True) if main else None
        last_saved = [trainer.state.step if resume and ckpt_path.exists() else None]

        def save_checkpoint(t: Trainer) -> None:
            if main:  # adapter, optimizer, scheduler, scaler, RNG states, step, split hash: all a resume needs
                save_torch(ckpt_path, {**t.state_dict(), "split_sha256": sha, "config_hash": cfg.hash()})
                last_saved[0] = t.state.step

        t_train = time.perf_counter()
        try:
            trainer.fit(on_step=metrics.write if metrics else None, checkpoint=save_checkpoint)
        except TrainingDiverged as e:
            kept = (f"the last good checkpoint (step {last_saved[0]}) is kept in {ckpt_path}"
                    if last_saved[0] is not None else "no checkpoint had been written yet")
            raise TrainingDiverged(f"{e}; {kept}") from None
        finally:
            if metrics:
                metrics.close()
        train_s = time.perf_counter() - t_train
        # 3. evaluate the last iterate (no model selection on the test set)
        t_eval = time.perf_counter()
        reuse = features.get("frozen") if not vision_adapted else None
        adapted = ev.accuracy(backbone, test_items, data.image_reader, data.classnames, [cfg.train.template], rt,
                              cfg.eval.batch_size, workers, "eval", features=reuse)
        results.update(top1=adapted["top1"], mean_per_class=adapted["mean_per_class"],
                       per_class=adapted["per_class"], n_test=adapted["n"])
        if "new" in p.eval_sets:  # base-to-new
            new = p.eval_sets["new"]
            new_acc = ev.accuracy(backbone, getattr(new, cfg.eval.split), new.image_reader, new.classnames,
                                  [cfg.train.template], rt, cfg.eval.batch_size, workers, "eval new")
            b, n = adapted["top1"], new_acc["top1"]
            results.update(base_top1=b, new_top1=n, harmonic_mean=round(2 * b * n / (b + n), 4) if b + n else 0.0)
        if any(k.startswith(CROSS) for k in p.eval_sets):  # cross-dataset / domain generalization
            results["cross_dataset"], results["cross_dataset_detail"] = evaluate_targets(
                backbone, p.eval_sets, cfg, rt, workers)
        eval_s += time.perf_counter() - t_eval
        log.info("adapted top-1 %.2f%% after %d steps", adapted["top1"], trainer.state.step)
        results.update(
            trainable_params=count_trainable(backbone.model), adapted_modules=len(modules),
            split_sha256=sha, split_file=str(output / SPLIT), shots=cfg.data.shots, seed=cfg.data.seed,
            sampler=cfg.data.sampler,
            iters=trainer.state.step, skipped_steps=trainer.state.skipped, final_loss=trainer.state.last_loss,
            dataset={"name": data.name, "root": str(data.root), "classes": len(data.classnames),
                     "classes_subset": cfg.data.classes, "n_train": len(p.train_items), "n_test": adapted["n"]},
            skipped_images=[{"path": a, "reason": b} for a, b in p.bad_images],
            backbone=backbone.describe(), device=str(rt.device), precision=rt.precision, world_size=rt.world_size,
            wall_time_s={"total": round(time.perf_counter() - t0, 2), "train": round(train_s, 2),
                         "eval": round(eval_s, 2)},
            peak_memory=_peak_memory_mb(rt), config=cfg.to_dict(), config_hash=cfg.hash(), logits=p.logits.to_dict(),
        )
        if main:
            # the RESOLVED activation and precision mode: every reload (eval, predict, export) reproduces them
            quick_gelu = backbone.activation.flag if backbone.activation else cfg.quick_gelu
            run_meta = {"model": cfg.model, "pretrained": backbone.pretrained, "quick_gelu": quick_gelu,
                        "frozen_dtype": cfg.train.frozen_dtype,
                        "dataset": data.name, "classnames": data.classnames, "template": cfg.train.template,
                        "logit_scale": p.logits.scale, "logit_bias": p.logits.bias, "loss": p.logits.kind,
                        "tokenizer": cfg.tokenizer, "split_sha256": sha}
            save_adapter(backbone.model, output / ADAPTER, backbone=backbone.name, extra={"run": run_meta},
                         overwrite=True, weights_fingerprint=backbone.fingerprint)  # of the weights as loaded
            write_json(output / RESULTS, results)
            if ckpt_path.exists():
                ckpt_path.unlink()  # the run is complete: results and adapter replace the resumable state
        return results
    finally:
        if handler is not None:
            log.removeHandler(handler)
            handler.close()


def _barrier(world_size: int) -> None:
    if world_size > 1:
        import torch.distributed as dist

        dist.barrier()


# -- using a trained adapter ------------------------------------------------------------------------------------------
def load_trained(adapter_dir: str | Path, pretrained: str | None = None, force: bool = False,
                 device: str = "auto", tokenizer: str | None = None) -> tuple[Backbone, dict[str, Any], Runtime]:
    """The backbone an adapter was trained on (or `pretrained` / `tokenizer` instead), with the adapter loaded."""
    meta = read_adapter_meta(adapter_dir)
    run_meta = meta.get("run", {})
    if "model" not in run_meta:
        raise BlockLoRAError(f"{adapter_dir} does not record its backbone: load it with the Python API "
                             "(load_adapter) on the model it was trained for")
    weights = pretrained if pretrained is not None else run_meta.get("pretrained")
    recorded = run_meta.get("quick_gelu")
    tokenizer = tokenizer or run_meta.get("tokenizer")
    if recorded in ("yes", "no"):  # the activation training resolved: the weights must not say otherwise
        backbone = load_backbone(run_meta["model"], weights, recorded_quick_gelu=recorded == "yes",
                                 tokenizer=tokenizer)
    else:  # adapters written before the activation was recorded
        backbone = load_backbone(run_meta["model"], weights, recorded or "auto", tokenizer=tokenizer)
    load_adapter(backbone.model, adapter_dir, force=force)
    runtime = make_runtime(device)
    backbone.to(runtime.device)
    backbone.cast_frozen(runtime.frozen_dtype(run_meta.get("frozen_dtype", "fp32")))
    return backbone, meta, runtime


def evaluate_adapter(adapter_dir: str | Path, dataset: str, root: str, split: str = "test",
                     pretrained: str | None = None, batch_size: int = 128, workers: int = -1,
                     classes: str = "all", template: str | None = None, force: bool = False,
                     device: str = "auto", limit: int | None = None, tokenizer: str | None = None) -> dict[str, Any]:
    """Top-1 of a trained adapter on any dataset (cross-dataset: the text side encodes the new class names)."""
    backbone, meta, rt = load_trained(adapter_dir, pretrained, force, device, tokenizer)
    backbone.tokenizer  # noqa: B018 - a tokenizer out of reach fails here, before the images are read
    data = load_dataset(dataset, root)
    if classes != "all":
        data = subsample_classes(data, classes)
    items = evenly_spaced(getattr(data, split), limit)
    if not items:
        raise DataError(f"dataset {dataset} at {root} has no {split} images")
    workers = workers if workers >= 0 else default_workers()
    template = template or meta["run"].get("template", "a photo of a {}.")
    result = ev.accuracy(backbone, items, data.image_reader, data.classnames, [template], rt, batch_size, workers)
    return {"adapter": str(adapter_dir), "dataset": data.name, "split": split, "classes": classes, **result}


@torch.no_grad()
def predict(backbone: Backbone, runtime: Runtime, images: Sequence[str], classnames: Sequence[str],
            template: str, logit_scale: float = 100.0, topk: int = 5, logits: Logits | None = None
            ) -> list[dict[str, Any]]:
    """Top-k class names with probabilities for each image file; each row says which probabilities they are.

    "softmax": over the classes, softmax(scale * cos) (they sum to 1). "sigmoid" (`logits` of kind sigmoid, as a
    SigLIP adapter trained with train.loss=sigmoid records): each class's own sigma(scale * cos + bias).
    """
    logits = logits or Logits(logit_scale)
    from .data.types import open_image_file

    txt = ev.encode_classes(backbone, classnames, [template], runtime)
    transform = backbone.eval_transform()
    out = []
    backbone.model.eval()
    for start in range(0, len(images), 64):
        chunk = list(images[start:start + 64])
        pixels = []
        for path in chunk:
            try:
                pixels.append(transform(open_image_file(path)))
            except (OSError, ValueError) as e:
                raise DataError(f"cannot read image {path}: {e}") from None
        with runtime.autocast():
            img = F.normalize(backbone.encode_images(torch.stack(pixels).to(runtime.device)).float(), dim=-1)
        probs = logits.probabilities(logits(img @ txt.T)).cpu()
        top = probs.topk(min(topk, probs.shape[1]), dim=-1)
        for path, values, indices in zip(chunk, top.values, top.indices):
            top_k = [{"class": classnames[i], "prob": round(float(v), 6)} for v, i in zip(values, indices)]
            out.append({"image": path, "probabilities": logits.kind, "top": top_k})
    return out


def export(adapter_dir: str | Path, output: str | Path, pretrained: str | None = None,
           force: bool = False, overwrite: bool = False, tokenizer: str | None = None) -> list[str]:
    """Merge the adapter into the frozen weights and write the backbone's own checkpoint format."""
    output = Path(output)
    if output.exists() and not overwrite:
        raise BlockLoRAError(f"{output} already exists: choose another path or pass --overwrite")
    backbone, _, _ = load_trained(adapter_dir, pretrained, force, device="cpu", tokenizer=tokenizer)
    state = merged_state_dict(backbone.model)
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_name(f".tmp-{output.name}")  # same suffix: the format follows it
    if tmp.exists():
        shutil.rmtree(tmp) if tmp.is_dir() else tmp.unlink()
    try:
        backbone.export(state, tmp)
        if output.exists():
            shutil.rmtree(output) if output.is_dir() else output.unlink()
        tmp.rename(output)
    except BaseException:
        if tmp.exists():
            shutil.rmtree(tmp) if tmp.is_dir() else tmp.unlink()
        raise
    return [str(output)] if output.is_file() else sorted(str(p) for p in output.iterdir())


def export_load_hint(adapter_dir: str | Path, output: str | Path) -> str | None:
    """How stock open_clip loads an export of this adapter with its activation (None for other families)."""
    from .backbones.activation import stock_load_hint

    run_meta = read_adapter_meta(adapter_dir).get("run", {})
    model = run_meta.get("model", "")
    if model.startswith("hf:") or model == "effnet-minilm" or run_meta.get("quick_gelu") not in ("yes", "no"):
        return None
    if Path(output).is_dir():
        return f"open_clip.create_model('local-dir:{output}')"
    return stock_load_hint(model, run_meta["quick_gelu"] == "yes", str(output))
