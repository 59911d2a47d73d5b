"""The main job as one function, `run(cfg, output)`:

    prepare (config -> backbone -> data, K shots, split file; prepare.py) -> open the run directory (rundir.py)
    -> zero-shot (cached, adapters off) -> fit -> evaluate -> save adapter + results.json
Using a trained adapter (evaluate, predict, export) is in trained.py, re-exported here. The CLI and the tests call
these; nothing here parses argv.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import resource
import shutil
import time
from pathlib import Path
from typing import Any

import torch

from ._version import __version__
from .adapters.inject import count_trainable
from .backbones import Backbone
from .backbones.fingerprint import save_adapter
from .config import RESUMABLE, RunConfig
from .cross import PREFIX as CROSS
from .cross import evaluate_targets
from .data import write_split_file
from .data.fewshot import split_file_bytes
from .engine import evaluate as ev
from .engine.evaluate import zero_shot
from .engine.files import JsonlWriter, atomic_write, load_torch, save_torch, write_json
from .engine.fit import Trainer, TrainingDiverged, plan
from .engine.rundir import RunDir
from .engine.runtime import Runtime, default_workers, deterministic, seed_everything
from .engine.tensorboard import Loggers, TensorBoardLog
from .errors import BlockLoRAError
from .prepare import Prepared, prepare, resolve, run_inputs  # noqa: F401 - resolve re-exported
from .trained import (  # noqa: F401 - re-exported
    evaluate_adapter,
    evaluate_zero_shot,
    export,
    export_load_hint,
    load_trained,
    predict,
)

log = logging.getLogger("blocklora")


def _peak_memory_mb(runtime: Runtime) -> dict[str, float]:
    out = {"cpu_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}
    if runtime.device.type == "cuda":
        out["cuda_max_allocated_mb"] = round(torch.cuda.max_memory_allocated(runtime.device) / 2**20, 1)
    return out


def _log_to(path: Path, append: bool) -> logging.Handler:
    handler = logging.FileHandler(path, mode="a" if append else "w")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    return handler


def run(cfg: RunConfig, output: str | Path, overwrite: bool = False, resume: bool = False,
        rank: int = 0, world_size: int = 1) -> dict[str, Any]:
    """Train an adapter on K shots and report accuracy. Writes output/{results.json, adapter/, split.json, ...}.

    `cfg` is the request (None = unset); the run uses and records cfg.resolved() (prepare.resolve). Raises
    BlockLoRAError for every user error before the run directory exists; TrainingDiverged (keeping the last
    checkpoint) when the loss or the weights stop being finite."""
    rd = RunDir(output)
    mode = rd.open_for(overwrite, resume, run_inputs(cfg))  # refuses what may not be reused or cleared
    saved: dict[str, Any] = {}
    if mode == "resume":
        saved = _check_same_run(rd, cfg)
        if rd.complete:
            log.info("%s is complete: nothing to resume", rd.path)
            return rd.read_results()
    with deterministic(cfg.train.deterministic):  # the process's own settings come back afterwards
        return _prepare_and_run(cfg, rd, mode, rank, world_size, saved)


def _prepare_and_run(cfg: RunConfig, rd: RunDir, mode: str, rank: int, world_size: int,
                     saved: dict[str, Any]) -> dict[str, Any]:
    main = rank == 0
    t0 = time.perf_counter()
    # every user error surfaces here, before anything is written; a resumed run keeps its recorded activation
    p = prepare(cfg, rank, world_size, saved.get("quick_gelu"))
    if saved:
        _check_same(rd, p.cfg, saved["config"], "now resolves to", "blocklora's defaults changed since it started: "
                    "start the run again with --overwrite")
    _barrier(world_size)  # every rank has looked at `output` before rank 0 creates it
    created = rd.create() if main else False
    _barrier(world_size)
    try:
        with rd.lock() if main else contextlib.nullcontext():
            if main and mode == "overwrite":
                kept = rd.clear()  # only once we hold the lock: never under a run that is still writing
                if kept:
                    log.info("kept %d file(s) blocklora did not write in %s: %s", len(kept), rd.path, ", ".join(kept))
            return _run_locked(p, rd, mode == "resume", t0)
    except BlockLoRAError as e:
        # A user error after the directory was made (not a diverged run, whose checkpoint is worth keeping):
        # leave nothing behind.
        if main and created and not isinstance(e, TrainingDiverged) and not rd.checkpoint.exists():
            rd.discard()
        raise


def _check_same_run(rd: RunDir, cfg: RunConfig) -> dict[str, Any]:
    """--resume continues the same computation: every option but those in RESUMABLE must be as asked when the run
    started (the request; runs written before requests were recorded: the config). Returns config.json."""
    try:
        saved = rd.read_config()
        saved["config"] = RunConfig.from_dict(saved["config"])
        saved["request"] = RunConfig.from_dict(saved["request"]) if "request" in saved else saved["config"]
    except (KeyError, TypeError, BlockLoRAError) as e:
        raise BlockLoRAError(f"{rd.config} is not a readable run configuration ({e}): start the run again with "
                             "--overwrite") from None
    _check_same(rd, cfg, saved["request"], "has",
                f"resume with the same options (only {', '.join(RESUMABLE)} may change)")
    return saved


def _check_same(rd: RunDir, now: RunConfig, then: RunConfig, has: str, fix: str) -> None:
    diff = now.differences(then)
    if diff:
        key, a, b = diff[0]
        more = f" (and {len(diff) - 1} more: {', '.join(k for k, _, _ in diff[1:4])})" if len(diff) > 1 else ""
        raise BlockLoRAError(f"{rd.path} was started with {key}={b!r}, this command {has} {key}={a!r}{more}: {fix}")


def _truncate_metrics(path: Path, step: int) -> None:
    """Keep the metric lines of steps <= `step` (a resumed run redoes the steps after its checkpoint)."""
    import json

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


def _resume(rd: RunDir, trainer: Trainer, sha: str, backbone: Backbone) -> None:
    """Load the checkpoint into `trainer`, or refuse on one line: a damaged or foreign file, another K-shot split,
    other frozen weights (the fingerprint), non-finite tensors."""
    fix = "start the run again with --overwrite"
    try:
        state = load_torch(rd.checkpoint)
    except BlockLoRAError as e:
        raise BlockLoRAError(f"{e}: {fix}") from None
    missing = [k for k in ("step", "adapter", "optimizer", "scheduler", "rng")
               if not isinstance(state, dict) or k not in state]
    if missing:
        raise BlockLoRAError(f"{rd.checkpoint} is not a blocklora checkpoint (no {missing[0]!r}): {fix}")
    saved = state.get("weights_fingerprint")
    if saved != backbone.fingerprint:
        raise BlockLoRAError(f"{rd.checkpoint} was trained on other frozen weights (fingerprint {saved}, these "
                             f"weights {backbone.fingerprint}): resume with the weights it started on, or {fix}")
    if state.get("split_sha256") != sha:
        raise BlockLoRAError(f"{rd.checkpoint} belongs to another K-shot split ({state.get('split_sha256')} vs {sha}):"
                             f" {fix}")
    try:
        if not all(bool(torch.isfinite(v).all()) for v in state["adapter"].values()):
            raise ValueError("non-finite adapter weights")
        trainer.load_state_dict(state)
    except (AttributeError, KeyError, IndexError, RuntimeError, TypeError, ValueError) as e:
        raise BlockLoRAError(f"{rd.checkpoint} does not fit this run ({type(e).__name__}: "
                             f"{str(e).splitlines()[0][:120] if str(e) else ''}): {fix}") from None
    log.info("resumed at step %d of %d", trainer.state.step, trainer.total)


def _start_files(p: Prepared, rd: RunDir) -> str:
    """config.json and split.json (rank 0); returns the split's sha256, which every rank checks a checkpoint by."""
    cfg = p.cfg
    if not p.runtime.is_main:
        return p.split_sha256 or hashlib.sha256(split_file_bytes(p.data, p.fewshot)).hexdigest()
    act = p.backbone.activation
    write_json(rd.config, {"config": cfg.to_dict(), "config_hash": cfg.hash(),
                           "request": p.request.to_dict(), "request_hash": p.request.hash(),
                           "quick_gelu": act.quick_gelu if act else None, "blocklora_version": __version__})
    if p.split_sha256 is None:  # the drawn split, byte-identical for the same seed: its hash names it
        return write_split_file(rd.split, p.data, p.fewshot)
    if Path(cfg.data.split_file).resolve() != rd.split.resolve():  # the user's split file, kept verbatim
        shutil.copyfile(cfg.data.split_file, rd.split)
    return p.split_sha256


def _run_locked(p: Prepared, rd: RunDir, resume: bool, t0: float) -> dict[str, Any]:
    cfg, rt, backbone, data = p.cfg, p.runtime, p.backbone, p.data
    main = rt.is_main
    handler = _log_to(rd.log, append=resume) if main else None
    tb: TensorBoardLog | None = None
    try:
        workers = cfg.data.workers if cfg.data.workers >= 0 else default_workers()
        sha = _start_files(p, rd)
        log.info("run %s: %s on %s (%d classes), %d shots, seed %d, split %s", rd.path, backbone.name, data.name,
                 len(data.classnames), cfg.data.shots, cfg.data.seed, sha[:12])
        results: dict[str, Any] = {"blocklora_version": __version__}
        # 1. zero-shot on the frozen model (cached per backbone fingerprint + dataset + prompts); its pass also
        # finds the test images that do not decode, before any training
        backbone.to(rt.device)
        backbone.cast_frozen(rt.frozen_dtype(cfg.train.frozen_dtype))  # before zero-shot: it runs the same model
        vision_adapted = "vision" in cfg.adapter.towers
        features: dict[str, Any] = {}
        t_eval = time.perf_counter()
        if cfg.eval.zero_shot:
            test_items = getattr(p.eval_sets[""], cfg.eval.split)
            zs = zero_shot(backbone, data, test_items, [cfg.train.template], rt, cfg.eval.batch_size, workers,
                           features=features, need_features=not vision_adapted, split=cfg.eval.split)
            p.skip_unreadable(zs["unreadable"])
            results["zero_shot_top1"] = zs["top1"]
            results["zero_shot_per_class"] = zs["per_class"]
            if cfg.eval.dataset_templates and data.template != cfg.train.template:
                zs2 = zero_shot(backbone, data, test_items, [data.template], rt, cfg.eval.batch_size, workers,
                                features=features, split=cfg.eval.split)  # the same images: their features are reused
                results["zero_shot_dataset_template_top1"] = zs2["top1"]
            log.info("zero-shot top-1 %.2f%%%s", zs["top1"], " (cached)" if zs.get("cached") else "")
        reuse = features.get("frozen") if not vision_adapted else None
        features.clear()  # a vision adapter changes the features: do not hold them through training
        eval_s = time.perf_counter() - t_eval
        # 2. train the adapters (injected by prepare); the training RNG starts from the seed, cached zero-shot or not
        seed_everything(cfg.data.seed)
        modules = p.modules  # the factors are fp32 (injected before cast_frozen, which leaves them alone)
        backbone.to(rt.device)
        trainer = Trainer(backbone, p.train_items, data.image_reader, data.classnames, cfg.train, rt,
                          cfg.data.seed, cfg.train.total_iters(cfg.data.shots), workers, p.logits)
        if resume and rd.checkpoint.exists():
            _resume(rd, trainer, sha, backbone)
        if main:
            _truncate_metrics(rd.metrics, trainer.state.step)  # steps after the checkpoint are redone
        if main:
            for line in plan(trainer.total, trainer.state.step, cfg.train.batch_size, len(p.train_items), rt):
                log.info("%s", line)
        metrics = JsonlWriter(rd.metrics, append=True) if main else None
        if main and cfg.train.log == "tensorboard":  # steps after the checkpoint are redone: their events go
            tb = TensorBoardLog(rd.tensorboard, purge_step=trainer.state.step + 1 if trainer.state.step else None)
            tb.scalar("eval/zero_shot_top1", results.get("zero_shot_top1"), 0)
        last_saved = [trainer.state.step if resume and rd.checkpoint.exists() else None]

        def save_checkpoint(t: Trainer) -> None:
            if main:  # adapter, optimizer, scheduler, scaler, RNG states, step, split hash: all a resume needs
                save_torch(rd.checkpoint, {**t.state_dict(), "split_sha256": sha, "config_hash": cfg.hash(),
                                           "weights_fingerprint": backbone.fingerprint})
                last_saved[0] = t.state.step

        t_train = time.perf_counter()
        try:
            trainer.fit(on_step=Loggers(metrics, tb).write if metrics else None, checkpoint=save_checkpoint)
        except TrainingDiverged as e:
            kept = (f"the last good checkpoint (step {last_saved[0]}) is kept in {rd.checkpoint}"
                    if last_saved[0] is not None else "no checkpoint had been written yet")
            raise TrainingDiverged(f"{e}; {kept}") from None
        finally:
            if metrics:
                metrics.close()
        if cfg.train.checkpoint_every and last_saved[0] != trainer.state.step:
            save_checkpoint(trainer)  # an evaluation that fails (an unreadable image) then costs no retraining
        after = " and rerun with --resume (training is done and checkpointed)" if rd.checkpoint.exists() else ""
        train_s = time.perf_counter() - t_train
        # 3. evaluate the last iterate (no model selection on the test set)
        t_eval = time.perf_counter()
        test_items = getattr(p.eval_sets[""], cfg.eval.split)  # limited to eval.limit, unreadable files dropped
        adapted = ev.accuracy(backbone, test_items, data.image_reader, data.classnames, [cfg.train.template], rt,
                              cfg.eval.batch_size, workers, "eval", features=reuse)
        p.skip_unreadable(adapted["unreadable"], after)
        results.update(top1=adapted["top1"], mean_per_class=adapted["mean_per_class"],
                       per_class=adapted["per_class"], n_test=adapted["n"])
        if "new" in p.eval_sets:  # base-to-new
            new = p.eval_sets["new"]
            new_acc = ev.accuracy(backbone, getattr(new, cfg.eval.split), new.image_reader, new.classnames,
                                  [cfg.train.template], rt, cfg.eval.batch_size, workers, "eval new")
            p.skip_unreadable(new_acc["unreadable"], after)
            b, n = adapted["top1"], new_acc["top1"]
            results.update(base_top1=b, new_top1=n, harmonic_mean=round(2 * b * n / (b + n), 4) if b + n else 0.0)
        if any(k.startswith(CROSS) for k in p.eval_sets):  # cross-dataset / domain generalization
            results["cross_dataset"], results["cross_dataset_detail"] = evaluate_targets(
                backbone, p.eval_sets, cfg, rt, workers, lambda found: p.skip_unreadable(found, after))
        eval_s += time.perf_counter() - t_eval
        log.info("adapted top-1 %.2f%% after %d steps", adapted["top1"], trainer.state.step)
        if tb is not None:
            for key in ("top1", "base_top1", "new_top1", "harmonic_mean"):
                tb.scalar(f"eval/{key}", results.get(key), trainer.state.step)
            for name, top1 in (results.get("cross_dataset") or {}).items():
                tb.scalar(f"eval/{name}_top1", top1, trainer.state.step)
        results.update(
            trainable_params=count_trainable(backbone.model), adapted_modules=len(modules),
            split_sha256=sha, split_file=str(rd.split), shots=cfg.data.shots, seed=cfg.data.seed,
            sampler=cfg.data.sampler,
            # the draw: whether classes with fewer images than shots were drawn with replacement, and which
            replacement={"allowed": cfg.data.replace, "used": bool(p.repeated), "classes": p.repeated},
            iters=trainer.state.step, skipped_steps=trainer.state.skipped, final_loss=trainer.state.last_loss,
            dataset={"name": data.name, "root": str(data.root), "classes": len(data.classnames),
                     "classes_subset": cfg.data.classes, "n_train": len(p.train_items), "n_test": adapted["n"]},
            skipped_images=[{"path": a, "reason": b} for a, b in p.bad_images.items()],
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
            save_adapter(backbone.model, rd.adapter, backbone=backbone.name, extra={"run": run_meta},
                         overwrite=True, weights_fingerprint=backbone.fingerprint)  # of the weights as loaded
            write_json(rd.results, results)
            rd.checkpoint.unlink(missing_ok=True)  # complete: results and adapter replace the resumable state
        return results
    finally:
        if tb is not None:
            tb.close()
        if handler is not None:
            log.removeHandler(handler)
            handler.close()


def _barrier(world_size: int) -> None:
    if world_size > 1:
        import torch.distributed as dist

        dist.barrier()
