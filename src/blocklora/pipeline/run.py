"""The main job as one function, `run(cfg, output)`, read top to bottom:

    prepare (config -> backbone -> data, K shots, split file, evaluation plan; prepare.py; every user error here)
    -> open the run directory (engine/rundir.py: create, lock, clear, resume rules)
    -> zero-shot (the frozen model, cached; evaluation.py) -> fit (engine/fit.py, checkpoints engine/checkpoint.py)
    -> evaluate (evaluation.py) -> finish (adapter/, results.json: engine/results.RunResult)
Using a trained adapter (evaluate, predict, export) is in trained.py, re-exported here. The CLI and the tests call
these; nothing here parses argv.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import logging
import resource
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from .._version import __version__
from ..adapters.inject import count_trainable
from ..backbones.activation import mlp_activation
from ..backbones.fingerprint import save_adapter
from ..checks import boolean, maybe, text
from ..config.run_config import RESUMABLE, RunConfig
from ..data import write_split_file
from ..data.fewshot import split_file_bytes
from ..engine import checkpoint
from ..engine.evaluate import score_logits
from ..engine.files import JsonlWriter, save_torch, write_json
from ..engine.fit import Trainer, TrainingDiverged, plan
from ..engine.results import RunResult
from ..engine.rundir import RunDir
from ..engine.runtime import Runtime, default_workers, deterministic, seed_everything
from ..engine.tensorboard import Loggers, TensorBoardLog
from ..errors import BlockLoRAError
from ..methods import is_baseline
from ..reading import fields
from .evaluation import Evaluation, ZeroShot, evaluate, zero_shot
from .prepare import Prepared, absolute_paths, prepare, resolve, run_inputs  # noqa: F401 - resolve re-exported
from .trained import (  # noqa: F401 - re-exported
    evaluate_adapter,
    evaluate_zero_shot,
    export,
    export_load_hint,
    load_trained,
    predict,
)

log = logging.getLogger("blocklora")


def run(cfg: RunConfig, output: str | Path, overwrite: bool = False, resume: bool = False,
        rank: int = 0, world_size: int = 1, finish: Callable[[RunDir], dict[str, Any]] | None = None) -> RunResult:
    """Train an adapter on K shots and report accuracy. Writes output/{results.json, adapter/, split.json, ...}.

    `cfg` is the request (None = unset); the run uses and records cfg.resolved() (prepare.resolve). Under torchrun
    (`rank` of `world_size` processes) the ranks train data-parallel and rank 0 writes. Raises BlockLoRAError for
    every user error before the run directory exists; TrainingDiverged (keeping the last checkpoint) when the loss
    or the weights stop being finite. A run that fails before its first checkpoint leaves nothing behind
    (RunDir.session; --overwrite puts the previous run back). `finish(run_dir)`, called on rank 0 once the adapter
    is saved, returns more RunResult fields measured on it (the demo's examples), so results.json is still written
    once. Returns what results.json holds."""
    rd = RunDir(output)
    writes = RunDir.written(tensorboard=cfg.train.log == "tensorboard", demo=finish is not None)
    mode = rd.open_for(overwrite, resume, run_inputs(cfg), writes)  # refuses what may not be reused or cleared
    saved = _check_same_run(rd, cfg) if mode == "resume" else None
    if saved is not None and rd.complete:
        log.info("%s is complete: nothing to resume", rd.path)
        return rd.read_results()
    t0 = time.perf_counter()
    with deterministic(cfg.train.deterministic):  # the process's own settings come back afterwards
        p = prepare(cfg, rank, world_size, saved.get("quick_gelu") if saved else None)
        if saved is not None:  # a resumed run keeps its recorded activation; its defaults must not have moved
            _check_same(rd, p.cfg, saved["config"], "now resolves to", "blocklora's defaults changed since it "
                        "started: start the run again with --overwrite")
        main = p.runtime.is_main
        with rd.session(main, mode, barrier=functools.partial(_barrier, world_size)), \
                _logging_to(rd.log if main else None, append=mode == "resume"):
            workers = p.cfg.data.workers if p.cfg.data.workers >= 0 else default_workers()
            sha = _start_files(p, rd)
            log.info("run %s: %s on %s (%d classes), %d shots, seed %d, split %s", rd.path, p.backbone.name,
                     p.data.name, len(p.data.classnames), p.cfg.data.shots, p.cfg.data.seed, sha[:12])
            p.backbone.to(p.runtime.device)
            p.backbone.cast_frozen(p.runtime.frozen_dtype(p.cfg.train.frozen_dtype))  # zero-shot runs this model
            # 1. zero-shot: its pass also finds the test images that do not decode, before any training
            zs = zero_shot(p.backbone, p.plan, p.cfg, p.runtime, workers, p.skip_unreadable) \
                if p.cfg.eval.zero_shot else None
            if zs is not None:
                log.info("zero-shot top-1 %.2f%%%s", zs.top1, " (cached)" if zs.cached else "")
            # 2. train the adapters (injected by prepare), or a baseline's head on the frozen model (methods/)
            if is_baseline(p.cfg.adapter.method):
                trainer, train_s, tb = _fit_head(p, rd, workers)
            else:
                trainer, train_s, tb = _fit(p, rd, sha, workers, mode == "resume", zs)
            try:
                # 3. evaluate the last iterate (no model selection on the test set)
                after = " and rerun with --resume (training is done and checkpointed)" if rd.checkpoint.exists() \
                    else ""
                evaluation = evaluate(p.backbone, p.plan, p.cfg, p.runtime, workers,
                                      functools.partial(p.skip_unreadable, hint=after), zs.features if zs else None)
                log.info("adapted top-1 %.2f%% after %d steps", evaluation.trained["top1"], trainer.state.step)
                # 4. finish: the adapter, then results.json (the run is complete)
                result = _result(p, rd, sha, zs, evaluation, trainer, t0, train_s)
                if tb is not None:
                    _log_accuracy(tb, result, trainer.state.step)
            finally:
                if tb is not None:
                    tb.close()
            predictions = evaluation.trained.pop("predictions", None)
            if main:
                _write_outputs(p, rd, result, predictions)
                _save_adapter(p, rd, sha)
                if finish is not None:
                    result = dataclasses.replace(result, **finish(rd))
                rd.write_results(result)
                rd.checkpoint.unlink(missing_ok=True)  # complete: results and adapter replace the resumable state
            return result


def _fit(p: Prepared, rd: RunDir, sha: str, workers: int, resume: bool, zs: ZeroShot | None
         ) -> tuple[Trainer, float, TensorBoardLog | None]:
    """Train from the seed (or the checkpoint, resuming), writing metrics.jsonl, checkpoints and, with
    train.log=tensorboard, TensorBoard scalars (rank 0; the caller closes the returned TensorBoard log)."""
    cfg, main = p.cfg, p.runtime.is_main
    seed_everything(cfg.data.seed)  # the training RNG starts from the seed, cached zero-shot or not
    p.backbone.to(p.runtime.device)  # the factors are fp32 (injected before cast_frozen, which leaves them alone)
    trainer = Trainer(p.backbone, p.train_items, p.data.image_reader, p.data.classnames, cfg.train, p.runtime,
                      cfg.data.seed, cfg.train.total_iters(cfg.data.shots), workers, p.logits)
    resuming = resume and rd.checkpoint.exists()
    if resuming:
        checkpoint.resume(rd, trainer, sha, p.backbone)
    if main:
        checkpoint.truncate_metrics(rd.metrics, trainer.state.step)  # steps after the checkpoint are redone
    # Checkpoints are written through this module's save_torch, the one seam a fault-injection test (or a user's
    # script) replaces to stop a run right after a checkpoint, as a kill would.
    saver = checkpoint.Checkpoints(rd, sha, cfg.hash(), p.backbone.fingerprint, main,
                                   trainer.state.step if resuming else None, write=save_torch,
                                   activation=mlp_activation(p.backbone.model))
    tb = None
    if main:
        used = p.validation.get("as") if p.validation["used"] else None
        for line in plan(trainer.total, trainer.state.step, cfg.train.batch_size, len(p.train_items), p.runtime,
                         bool(cfg.train.drop_last), used):
            log.info("%s", line)
        if cfg.train.log == "tensorboard":  # steps after the checkpoint are redone: their events go
            tb = TensorBoardLog(rd.tensorboard, purge_step=trainer.state.step + 1 if trainer.state.step else None)
            tb.scalar("eval/zero_shot_top1", zs.top1 if zs else None, 0)
    t0 = time.perf_counter()
    try:
        with JsonlWriter(rd.metrics, append=True) if main else contextlib.nullcontext() as metrics:
            try:
                trainer.fit(on_step=Loggers(metrics, tb).write if metrics else None, checkpoint=saver.save)
            except TrainingDiverged as e:
                raise TrainingDiverged(f"{e}; {saver.kept()}") from None
        if cfg.train.checkpoint_every and saver.last_step != trainer.state.step:
            saver.save(trainer)  # an evaluation that fails (an unreadable image) then costs no retraining
    except BaseException:
        if tb is not None:
            tb.close()
        raise
    return trainer, time.perf_counter() - t0, tb


def _fit_head(p: Prepared, rd: RunDir, workers: int) -> tuple[Any, float, None]:
    """A baseline's fit (methods/fit.py): its records go to metrics.jsonl (rank 0); nothing is checkpointed (a
    resumed run trains it again from the seed)."""
    from ..methods.fit import fit_head

    if p.runtime.is_main:
        checkpoint.truncate_metrics(rd.metrics, 0)
    with JsonlWriter(rd.metrics, append=True) if p.runtime.is_main else contextlib.nullcontext() as metrics:
        fit, seconds = fit_head(p, workers, metrics.write if metrics else None)
    return fit, seconds, None


def _log_accuracy(tb: TensorBoardLog, result: RunResult, step: int) -> None:
    """The evaluation's accuracies as TensorBoard scalars at the last step."""
    for key in ("top1", "base_top1", "new_top1", "harmonic_mean"):
        tb.scalar(f"eval/{key}", getattr(result, key), step)
    for name, top1 in (result.cross_dataset or {}).items():
        tb.scalar(f"eval/{name}_top1", top1, step)


def _result(p: Prepared, rd: RunDir, sha: str, zs: ZeroShot | None, ev: Evaluation, trainer: Trainer, t0: float,
            train_s: float) -> RunResult:
    cfg, data, rt, trained = p.cfg, p.data, p.runtime, ev.trained
    return RunResult(
        blocklora_version=__version__,
        zero_shot_top1=zs.top1 if zs else None, zero_shot_per_class=zs.per_class if zs else None,
        zero_shot_dataset_template_top1=zs.dataset_template_top1 if zs else None,
        top1=trained["top1"], mean_per_class=trained["mean_per_class"], per_class=trained["per_class"],
        n_test=trained["n"],
        base_top1=trained["top1"] if ev.new else None, new_top1=ev.new["top1"] if ev.new else None,
        harmonic_mean=ev.harmonic_mean,
        cross_dataset={k: v["top1"] for k, v in ev.cross.items()} if p.plan.cross else None,
        cross_dataset_detail={k: {"n": v["n"], "classes": len(v["per_class"]), "mean_per_class": v["mean_per_class"]}
                              for k, v in ev.cross.items()} if p.plan.cross else None,
        trainable_params=_trainable(p), adapted_modules=len(p.modules),
        split_sha256=sha, split_file=str(rd.split), shots=cfg.data.shots, seed=cfg.data.seed,
        sampler=cfg.data.sampler,
        # the draw: whether classes with fewer images than shots were drawn with replacement, and which
        replacement={"allowed": cfg.data.replace, "used": bool(p.repeated), "classes": p.repeated},
        validation=p.validation,
        iters=trainer.state.step, skipped_steps=trainer.state.skipped, final_loss=trainer.state.last_loss,
        dataset={"name": data.name, "root": str(data.root), "classes": len(data.classnames),
                 "classes_subset": cfg.data.classes, "n_train": len(p.train_items), "n_test": trained["n"],
                 **({"held_out": data.held_out} if data.held_out else {})},
        skipped_images=[{"path": a, "reason": b} for a, b in p.bad_images.items()],
        backbone=p.backbone.describe(), device=str(rt.device), precision=rt.precision, world_size=rt.world_size,
        wall_time_s={"total": round(time.perf_counter() - t0, 2), "train": round(train_s, 2),
                     "eval": round(ev.seconds + (zs.seconds if zs else 0.0), 2)},
        peak_memory=_peak_memory_mb(rt), config=cfg.to_dict(), config_hash=cfg.hash(), logits=p.logits.to_dict())


def _write_outputs(p: Prepared, rd: RunDir, result: RunResult, predictions: tuple | None) -> None:
    """predictions.csv and confusion.png of the tested split, and curve.png of the training (engine/predictions.py;
    the plots need matplotlib, and are skipped with a note without it)."""
    from ..engine import predictions as pr

    title = f"{p.backbone.name}, {p.data.name}, {p.cfg.data.shots} shots, seed {p.cfg.data.seed}"
    if predictions is not None and predictions[1] is not None:
        rows = pr.predictions_rows(predictions[0], predictions[1], p.data.classnames,
                                   score_logits(p.backbone, p.logits))
        pr.write_predictions(rd / rd.PREDICTIONS, rows)
        pr.plot_confusion(rd / rd.CONFUSION, rows, p.data.classnames,
                          f"{title}: top-1 {result.top1:.2f}% on {len(rows)} {p.cfg.eval.split} images")
    if rd.metrics.is_file():
        pr.plot_curve(rd.metrics, rd / rd.CURVE, f"{title}: training")


def _trainable(p: Prepared) -> int:
    head = getattr(p.backbone, "head", None)
    return head.trainable_params if head is not None else count_trainable(p.backbone.model)


def _save_adapter(p: Prepared, rd: RunDir, sha: str) -> None:
    """adapter/ with the RESOLVED activation and precision mode: every reload (eval, predict, export) reproduces
    them; the fingerprint is of the weights as loaded."""
    cfg, backbone = p.cfg, p.backbone
    quick_gelu = backbone.activation.flag if backbone.activation else cfg.quick_gelu
    run_meta = {"model": cfg.model, "pretrained": backbone.pretrained, "quick_gelu": quick_gelu,
                "frozen_dtype": cfg.train.frozen_dtype,
                "dataset": p.data.name, "classnames": p.data.classnames, "template": cfg.train.template,
                "logit_scale": p.logits.scale, "logit_bias": p.logits.bias, "loss": p.logits.kind,
                "tokenizer": cfg.tokenizer, "split_sha256": sha,
                # what `eval --adapter RUN` evaluates by default: this run's data, as resolved (absolute root)
                "data": {"dataset": cfg.data.dataset, "root": cfg.data.root, "classes": cfg.data.classes,
                         "test_fraction": cfg.data.test_fraction}}
    if is_baseline(cfg.adapter.method):
        from ..backbones.fingerprint import identity
        from ..methods.io import save_head

        save_head(backbone.head, rd.adapter, cfg.adapter,
                  {"class": type(backbone.model).__name__, "name": backbone.name,
                   **identity(backbone.model, backbone.fingerprint)}, run_meta, overwrite=True)
        return
    save_adapter(backbone.model, rd.adapter, backbone=backbone.name, extra={"run": run_meta}, overwrite=True,
                 weights_fingerprint=backbone.fingerprint)


def _peak_memory_mb(runtime: Runtime) -> dict[str, float]:
    out = {"cpu_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}
    if runtime.device.type == "cuda":
        out["cuda_max_allocated_mb"] = round(torch.cuda.max_memory_allocated(runtime.device) / 2**20, 1)
    return out


@contextlib.contextmanager
def _logging_to(path: Path | None, append: bool) -> Iterator[None]:
    """The run's log file (train.log) for the duration of the run; None: not this rank."""
    if path is None:
        yield
        return
    # UTF-8 whatever the locale; a path that is not UTF-8 (lone surrogates) is written with \xNN escapes, never a
    # "Logging error" traceback
    handler = logging.FileHandler(path, mode="a" if append else "w", encoding="utf-8", errors="backslashreplace")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    try:
        yield
    finally:
        log.removeHandler(handler)
        handler.close()


def recorded_request(output: str | Path) -> RunConfig | None:
    """What `train --output DIR --resume` continues when no other option is given: the request recorded in
    DIR/config.json (runs written before requests were recorded: their config), its relative paths read from the
    folder the run was started in (the recorded "cwd"; records without one keep them as typed), so the run resumes
    as started from any folder. None when DIR is not a blocklora run directory with a config.json (RunDir.open_for
    then decides). Raises BlockLoRAError for a config.json that is not a readable run configuration."""
    rd = RunDir(output)
    if not rd.made_by_blocklora or not rd.config.is_file():
        return None
    saved = _read_record(rd)
    return absolute_paths(saved["request"], saved["cwd"]) if saved["cwd"] else saved["request"]


def _read_record(rd: RunDir) -> dict[str, Any]:
    """config.json with its "config" and "request" as RunConfigs (no request: the config), "quick_gelu" (the
    activation the run started with, None: a family without the choice) and "cwd" (the folder the run was started
    in; None in records written before it was recorded). Raises BlockLoRAError naming the file when it is not a
    readable run configuration."""
    try:
        saved = rd.read_config()
        saved["config"] = RunConfig.from_dict(saved["config"])
        saved["request"] = RunConfig.from_dict(saved["request"]) if "request" in saved else saved["config"]
        # the activation the run started with: a bool, and the config's own explicit --quick-gelu agrees; the
        # checkpoint is checked against the model it builds (checkpoint.py)
        saved.update(fields(saved, {"quick_gelu": maybe(boolean), "cwd": maybe(text(empty=False))}, "config.json",
                            defaults={"quick_gelu": None, "cwd": None}))
        asked = saved["config"].quick_gelu
        if saved["quick_gelu"] is not None and asked in ("yes", "no") and saved["quick_gelu"] != (asked == "yes"):
            raise BlockLoRAError(f"config.json records quick_gelu={saved['quick_gelu']} but its config asked "
                                 f"quick_gelu={asked}")
    except (KeyError, TypeError, BlockLoRAError) as e:
        raise BlockLoRAError(f"{rd.config} is not a readable run configuration ({e}): start the run again with "
                             "--overwrite") from None
    return saved


def _check_same_run(rd: RunDir, cfg: RunConfig) -> dict[str, Any]:
    """--resume continues the same computation: every option but those in RESUMABLE must be as asked when the run
    started (the request; runs written before requests were recorded: the config). Paths are compared as what they
    name (made absolute, the record's from its "cwd"): the same run resumed from another folder is the same run;
    records without "cwd" compare them as typed. Returns config.json (_read_record)."""
    saved = _read_record(rd)
    now, then = cfg, saved["request"]
    if saved["cwd"]:
        now, then = absolute_paths(cfg), absolute_paths(then, saved["cwd"])
    _check_same(rd, now, then, "has", f"resume with the same options (only {', '.join(RESUMABLE)} may change)")
    return saved


def _check_same(rd: RunDir, now: RunConfig, then: RunConfig, has: str, fix: str) -> None:
    from ..methods.registry import reads

    # a key the method never reads (a baseline's train.lr) does not change the computation (methods.registry)
    diff = [d for d in now.differences(then) if reads(now.adapter.method, d[0])]
    if diff:
        key, a, b = diff[0]
        more = f" (and {len(diff) - 1} more: {', '.join(k for k, _, _ in diff[1:4])})" if len(diff) > 1 else ""
        raise BlockLoRAError(f"{rd.path} was started with {key}={b!r}, this command {has} {key}={a!r}{more}: {fix}")


def _start_files(p: Prepared, rd: RunDir) -> str:
    """config.json and split.json (rank 0); returns the split's sha256, which every rank checks a checkpoint by."""
    cfg = p.cfg
    if not p.runtime.is_main:
        return p.split_sha256 or hashlib.sha256(split_file_bytes(p.data, p.fewshot)).hexdigest()
    act = p.backbone.activation
    write_json(rd.config, {"config": cfg.to_dict(), "config_hash": cfg.hash(),
                           "request": p.request.to_dict(), "request_hash": p.request.hash(),
                           "cwd": _cwd(),  # the folder the request's relative paths are read from
                           "quick_gelu": act.quick_gelu if act else None, "blocklora_version": __version__})
    if p.split_sha256 is None:  # the drawn split, byte-identical for the same seed: its hash names it
        return write_split_file(rd.split, p.data, p.fewshot)
    if Path(cfg.data.split_file).resolve() != rd.split.resolve():  # the user's split file, kept verbatim
        shutil.copyfile(cfg.data.split_file, rd.split)
    return p.split_sha256


def _cwd() -> str | None:
    """The current folder, or None when it no longer exists (then every path the run reads is absolute)."""
    try:
        return str(Path.cwd())
    except FileNotFoundError:
        return None


def _barrier(world_size: int) -> None:
    if world_size > 1:
        import torch.distributed as dist

        dist.barrier()
