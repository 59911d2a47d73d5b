"""Using a trained adapter: load it on its backbone, evaluate it on any dataset, predict images, export merged weights.

Everything an adapter directory says is checked before use (adapters/io.py reads the format, `run_meta` here the
run's own record: backbone, class names, template, logit scale), so a damaged or hand-edited file is one error line.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import tempfile
import time
import zipfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from .. import checks
from ..adapters.inject import merged_state_dict
from ..adapters.io import read_adapter_meta
from ..backbones import Backbone, load_backbone
from ..backbones.fingerprint import load_adapter
from ..data import DatasetSplits, evenly_spaced, load_dataset, subsample_classes
from ..data.images import verify_images
from ..data.protocols import check_classes
from ..engine import evaluate as ev
from ..engine.logits import KINDS as LOSS_KINDS
from ..engine.logits import Logits
from ..engine.runtime import Runtime, default_workers, make_runtime
from ..errors import AdapterMismatchError, BlockLoRAError, ConfigError, DataError
from ..interop.export_forms import export_form
from ..methods import is_baseline, record
from ..ownership import (
    TEMP_SUFFIX,
    check_deletable,
    fix_modes,
    live_writers,
    mark,
    marker_kind,
    place,
    protected,
    remove_stale_temps,
    reported_write,
)
from ..ownership import temp_prefix as _temp_prefix
from ..reading import damaged, fields, listof

log = logging.getLogger("blocklora")
EXPORT = "export"  # the ownership marker's kind for an exported model folder
CLASSIFIER_FORMAT = "blocklora-classifier/1"  # an export's class names, template and logits (classifier())


# The "run" record's fields (what pipeline/run.py's _save_adapter writes) and, for those an older or hand-made
# adapter may lack (backbones.fingerprint.save_adapter writes no logit_bias), the value they then take.
RUN_FIELDS: dict[str, checks.Rule] = {
    "model": checks.text(empty=False), "pretrained": checks.text(optional=True),
    "classnames": listof(checks.text(), lo=2), "template": checks.template,
    "quick_gelu": checks.maybe(checks.one_of("yes", "no", "auto")), "frozen_dtype": checks.one_of("fp32", "autocast"),
    "logit_scale": checks.num(0, 1e4, lo_open=True), "logit_bias": checks.num(-1e4, 1e4, optional=True),
    "loss": checks.one_of(*LOSS_KINDS), "tokenizer": checks.text(optional=True),
    "dataset": checks.text(optional=True), "split_sha256": checks.text(optional=True),
    "data": lambda name, v: v if v is None else fields(v, DATA_FIELDS, name, {"test_fraction": None}),
}
RUN_DEFAULTS = {"pretrained": None, "quick_gelu": None, "frozen_dtype": "fp32", "logit_scale": 100.0,
                "logit_bias": None, "loss": "softmax", "tokenizer": None, "dataset": None, "split_sha256": None,
                "data": None}
# "run"."data": the data it was trained on, as the run resolved it (absolute root), so `eval --adapter RUN` needs
# no --dataset / --root (adapters from before it was recorded: None, and eval asks for them)
DATA_FIELDS: dict[str, checks.Rule] = {
    "dataset": checks.text(empty=False), "root": checks.text(), "classes": checks.one_of("all", "base", "new"),
    "test_fraction": checks.num(0, 1, lo_open=True, hi_open=True, optional=True)}


def run_meta(meta: dict[str, Any], where: str | os.PathLike) -> dict[str, Any]:
    """The "run" record a trained adapter carries (what `blocklora train` saved), every field checked (RUN_FIELDS:
    types, ranges, allowed values; absent optional ones take RUN_DEFAULTS) and the logits cross-checked: sigmoid
    (SigLIP's loss) needs its bias, with |bias| < logit_scale (else sigma(scale * cos + bias) is on one side of 1/2
    for every cosine in [-1, 1]: every class in or every class out, whatever the image), softmax has none; and
    run.model against the adapter's backbone.name (one model, _same_model: a hand-edited one is not silently
    preferred to the other); in its run folder, run.classnames against the run's split.json
    (_check_split_classes). Returns the record with its defaults filled in. Raises BlockLoRAError (no record) or
    AdapterMismatchError (a bad field)."""
    run = meta.get("run")
    if not isinstance(run, dict) or "model" not in run:
        backbone = meta.get("backbone")
        name = backbone.get("name") if isinstance(backbone, dict) else None
        has = f"records its backbone ({name}) but not" if name else "records neither its backbone nor"
        raise BlockLoRAError(
            f"{where} {has} the class names and prompt template that predict, eval and export need: save it with "
            f"blocklora.save_adapter(model, DIR, backbone={name or 'MODEL'!r}, classnames=[...], "
            "template='a photo of a {}.', logit_scale=100.0) (and pretrained=... for other weights than the "
            "model's default), train it with `blocklora train`, or load it in Python with load_adapter")
    with damaged(Path(where) / "blocklora_adapter.json", AdapterMismatchError):
        checked = fields(run, RUN_FIELDS, "run", RUN_DEFAULTS)
        bias, scale = checked["logit_bias"], checked["logit_scale"]
        if checked["loss"] == "sigmoid" and (bias is None or abs(bias) >= scale):
            raise ConfigError(f"run.loss is sigmoid, whose run.logit_bias must be a number with |bias| < "
                              f"run.logit_scale ({scale:g}), got {bias!r}")
        if checked["loss"] == "softmax" and bias is not None:
            raise ConfigError(f"run.logit_bias is {bias!r}, but run.loss is softmax, which has no bias")
        name = backbone.get("name") if isinstance(backbone := meta.get("backbone"), dict) else None
        if name is not None and not _same_model(name, checked["model"], checked["pretrained"]):
            raise ConfigError(f"backbone.name {name!r} and run.model {checked['model']!r} name different models "
                              "(blocklora records the one model in both; which one it was trained on is unknown)")
    _check_split_classes(Path(where), checked["classnames"])
    return {**run, **checked}


def _same_model(name: Any, model: str, pretrained: str | None) -> bool:
    """Whether an adapter's backbone.name (the model as loaded) and run.model (the --model given) are one model: the
    same string, or for an hf: model the folder (or hub id) it was loaded from, run.pretrained (--pretrained, by
    default the --model folder)."""
    return name == model or (model.startswith("hf:") and pretrained is not None and name == f"hf:{pretrained}")


def _check_split_classes(adapter_dir: Path, classnames: list[str]) -> None:
    """An adapter in its run folder (RUN/adapter) and the run's split.json were written with one class list (the
    order is the labels' and a baseline head's rows): a folder where they differ was edited, and which file is right
    is unknown, so neither is used. A split.json that cannot be read as one (or a published split, which names no
    classes) states nothing to compare. Raises AdapterMismatchError naming both files and the first difference."""
    from ..adapters.io import CONFIG_FILE
    from ..data.fewshot import read_split_header
    from ..engine.rundir import RunDir

    split = adapter_dir.parent / RunDir.SPLIT
    if adapter_dir.name != RunDir.ADAPTER or not split.is_file():
        return
    try:
        theirs = read_split_header(split)["classnames"]
    except DataError:
        return
    if theirs is None or list(theirs) == list(classnames):
        return
    diff = next((f"class {i} is {a!r} there and {b!r} in run.classnames" for i, (a, b) in
                 enumerate(zip(theirs, classnames)) if a != b), f"{len(theirs)} classes there, {len(classnames)} in "
                                                                "run.classnames")
    raise AdapterMismatchError(f"{split} and {adapter_dir / CONFIG_FILE} disagree on the run's classes ({diff}): one "
                               "of them was edited; restore it (run.split_sha256 is the sha256 of the run's own "
                               "split.json) or train again")


def load_trained(adapter_dir: str | os.PathLike, pretrained: str | None = None, force: bool = False,
                 device: str = "auto", compute: bool = True, tokenizer: str | None = None, text: bool = True
                 ) -> tuple[Backbone, dict[str, Any], Runtime]:
    """The backbone an adapter was trained on (or `pretrained` / `tokenizer` instead), with the adapter loaded.
    compute=False keeps the weights' stored dtype (for export); otherwise they run in the precision mode training
    recorded (frozen_dtype; half-precision checkpoints in float32 on the CPU). text=False: no prompts will be
    encoded (export), so no tokenizer is needed."""
    adapter_dir = locate_adapter(adapter_dir)
    meta = read_adapter_meta(adapter_dir)
    run = run_meta(meta, adapter_dir)
    meta = {**meta, "run": run}  # the checked record, defaults filled in
    weights = pretrained if pretrained is not None else recorded_weights(run, adapter_dir)
    recorded = run.get("quick_gelu")
    tokenizer = tokenizer or run.get("tokenizer")
    if recorded in ("yes", "no"):  # the activation training resolved: the weights must not say otherwise
        backbone = load_backbone(run["model"], weights, recorded_quick_gelu=recorded == "yes", tokenizer=tokenizer,
                                 text=text)
    else:  # adapters written before the activation was recorded
        backbone = load_backbone(run["model"], weights, recorded or "auto", tokenizer=tokenizer, text=text)
    baseline = is_baseline(meta["config"]["method"])
    if not baseline:
        load_adapter(backbone.model, adapter_dir, force=force)
    runtime = make_runtime(checks.device("--device", device))
    backbone.to(runtime.device)
    if compute:  # the precision mode training ran in (runs before it was recorded: fp32)
        backbone.cast_frozen(runtime.frozen_dtype(run.get("frozen_dtype", "fp32")))
    if baseline and text:  # a head on the frozen model (methods/): eval and predict score with it
        from ..methods.io import load_head

        backbone.head = load_head(adapter_dir, meta, backbone, force)
    return backbone, meta, runtime


def locate_adapter(path: str | os.PathLike) -> Path:
    """An adapter folder, or a run folder holding one (RUN_DIR for RUN_DIR/adapter). Raises BlockLoRAError for a
    path that is neither, naming what it looked for."""
    from ..adapters.io import CONFIG_FILE
    from ..engine.rundir import RunDir

    path = Path(path)
    if (path / CONFIG_FILE).is_file() or not path.is_dir():
        return path  # an adapter folder, or what read_adapter_meta reports precisely (missing, a file, ...)
    inner = RunDir(path).adapter
    if (inner / CONFIG_FILE).is_file():
        return inner
    raise BlockLoRAError(f"{path} holds no adapter ({CONFIG_FILE}), nor does {inner}: pass a run folder written by "
                         "`blocklora train` or its adapter folder")


def recorded_weights(run: dict[str, Any], adapter_dir: str | os.PathLike) -> str | None:
    """The weights an adapter recorded (a tag, None, or a resolved path); a recorded path that is gone is an error
    naming the option that gives the new place."""
    weights = run.get("pretrained")
    if isinstance(weights, str) and os.path.isabs(weights) and not os.path.exists(weights):
        what = "model folder" if str(run.get("model", "")).startswith("hf:") else "weights"
        raise BlockLoRAError(f"the {what} {weights} that {adapter_dir} was trained on is not there any more (moved or "
                             f"deleted?): pass its new location with --pretrained PATH")
    return weights


def checked_items(items: list, reader: Any, skip_bad_images: bool) -> tuple[list, list[tuple[str, str]]]:
    """Items that are regular files, or a DataError naming the first bad one unless skip_bad_images. The one pass
    that follows decodes each image and reports what else is wrong (_finish)."""
    bad = verify_images(items, reader, level="file")
    return drop_unreadable(items, bad, skip_bad_images)


def drop_unreadable(items: list, bad: list[tuple[str, str]], skip_bad_images: bool,
                    hint: str = "") -> tuple[list, list[tuple[str, str]]]:
    """`items` without the `bad` ones when skipping, else a DataError naming the first (one rule for every pass)."""
    if not bad:
        return items, []
    if not skip_bad_images:
        path, why = bad[0]
        raise DataError(f"unreadable image {path} ({why}; {len(bad)} bad in all): fix or remove it{hint}, or pass "
                        "--skip-bad-images (data.skip_bad_images=true) to skip such files")
    paths = {p for p, _ in bad}
    log.warning("skipping %d unreadable image(s), e.g. %s (%s)", len(bad), *bad[0])
    return [i for i in items if i.path not in paths], bad


def eval_options(batch_size: int, workers: int, split: str, limit: int | None) -> tuple[int, int]:
    """The evaluation options of eval and zeroshot, checked; -1 workers becomes the default count."""
    batch_size = checks.number("batch_size", batch_size, checks.Range(1, 65536, integer=True))
    workers = checks.number("workers", workers, checks.Range(-1, 256, integer=True))
    checks.choice("split", split, ("test", "val", "train"))
    if limit is not None:
        checks.number("limit", limit, checks.Range(1, integer=True))
    return batch_size, workers if workers >= 0 else default_workers()


def _test_set(dataset: str, root: str, classes: str, split: str, limit: int | None, template: str,
              skip_bad_images: bool, what: str, test_fraction: float | None = None
              ) -> tuple[DatasetSplits, list, list[tuple[str, str]]]:
    """(dataset, its evaluated items, the (path, reason) skipped): classes, headers and prompts checked."""
    data = load_dataset(dataset, root, test_fraction)
    check_classes(data, what, classes)
    if classes != "all":
        data = subsample_classes(data, classes)
    items = evenly_spaced(getattr(data, split), limit)
    if not items:
        raise DataError(f"dataset {dataset} at {root} has no {split} images")
    items, skipped = checked_items(items, data.image_reader, skip_bad_images)
    for warning in ev.prompt_collisions(data.classnames, template):
        log.warning("warning: %s", warning)
    return data, items, skipped


def _finish(items: list, result: dict[str, Any], skipped: list[tuple[str, str]], skip_bad_images: bool,
            ) -> dict[str, Any]:
    """An evaluation pass's result, with the images only its full decode found unreadable (a truncated file):
    an error naming the first, or listed with the skipped ones."""
    unreadable = result.pop("unreadable")
    drop_unreadable(items, unreadable, skip_bad_images)
    return {**result, "skipped_images": [{"path": p, "reason": r} for p, r in skipped + unreadable]}


def trained_data(adapter_dir: str | os.PathLike) -> dict[str, Any]:
    """{dataset, root, classes, test_fraction} an adapter was trained on (its run record), or a DataError saying
    to pass --dataset and --root when it records none (saved from Python, or before blocklora recorded it)."""
    adapter_dir = locate_adapter(adapter_dir)
    data = run_meta(read_adapter_meta(adapter_dir), adapter_dir).get("data")
    if data is None:
        raise DataError(f"{adapter_dir} does not record the dataset it was trained on (saved from Python, or by an "
                        "earlier blocklora): pass --dataset and --root")
    return data


def evaluate_adapter(adapter_dir: str | os.PathLike, dataset: str | None = None, root: str | None = None,
                     split: str = "test", pretrained: str | None = None, batch_size: int = 128, workers: int = -1,
                     classes: str | None = None, template: str | None = None, force: bool = False,
                     device: str = "auto", limit: int | None = None, skip_bad_images: bool = False,
                     tokenizer: str | None = None, test_fraction: float | None = None,
                     output: str | os.PathLike | None = None) -> dict[str, Any]:
    """Top-1 of a trained adapter on any dataset (cross-dataset: the text side encodes the new class names).
    `output`: a folder to write predictions.csv and confusion.png into (write_predictions).

    `dataset` None: the data the adapter was trained on (trained_data: its dataset, root, class subset and held-out
    fraction; `root`, `classes`, `test_fraction` given override them); `classes` None: all (or, on the run's own
    data, the run's subset)."""
    own_data = dataset is None
    if own_data:
        own = trained_data(adapter_dir)
        dataset, root = own["dataset"], own["root"] if root is None else root
        classes = own["classes"] if classes is None else classes
        test_fraction = own["test_fraction"] if test_fraction is None else test_fraction
    batch_size, workers = eval_options(batch_size, workers, split, limit)
    backbone, meta, rt = load_trained(adapter_dir, pretrained, force, device, tokenizer=tokenizer)
    run = meta["run"]
    logits = Logits(run["logit_scale"], run["logit_bias"], run["loss"])
    return evaluate_loaded(backbone, rt, adapter_dir, template or run["template"], dataset, root or "", split,
                           batch_size, workers, classes or "all", limit, skip_bad_images, test_fraction, output,
                           logits, own_classnames=list(run["classnames"]) if own_data else None)


def evaluate_loaded(backbone: Backbone, rt: Runtime, adapter_dir: str | os.PathLike, template: str, dataset: str,
                    root: str, split: str, batch_size: int, workers: int, classes: str, limit: int | None,
                    skip_bad_images: bool, test_fraction: float | None = None,
                    output: str | os.PathLike | None = None, logits: Logits | None = None,
                    own_classnames: list[str] | None = None) -> dict[str, Any]:
    """Top-1 of a backbone that already holds its adapter (a blocklora or a PEFT one) on a dataset; with `output`,
    its predictions.csv and confusion.png there (`logits`: the probabilities', default scale 100, softmax).
    `own_classnames`: the run's classes, when this is the run's own data: a dataset whose classes changed since
    (another folder at the recorded root, an edited classnames.txt) is a DataError, not a score on other classes."""
    template = checks.template("template", template)
    if output is not None:
        _check_output(Path(output))
    data, items, skipped = _test_set(dataset, root, classes, split, limit, template, skip_bad_images, "evaluation",
                                     test_fraction)
    if own_classnames is not None and list(data.classnames) != own_classnames:
        now, then = list(data.classnames), own_classnames
        diff = next((f"{a!r} where the run had {b!r}" for a, b in zip(now, then) if a != b),
                    f"{len(now)} classes where the run had {len(then)}")
        raise DataError(f"the {dataset} dataset at {root} is not the one {adapter_dir} was trained on: its classes "
                        f"differ ({diff}): pass --root the run's data, or --dataset {dataset} --root DIR to "
                        "evaluate on these classes")
    result = ev.accuracy(backbone, items, data.image_reader, data.classnames, [template], rt, batch_size, workers,
                         keep=output is not None)
    kept = result.pop("predictions", None)
    out = {"adapter": str(adapter_dir), "dataset": data.name, "split": split, "classes": classes,
           **_finish(items, result, skipped, skip_bad_images)}
    if output is not None and kept is not None and kept[1] is not None:
        from ..engine import predictions as pr
        from ..ownership import OwnedFiles

        folder = Path(output)
        rows = pr.predictions_rows(kept[0], kept[1], data.classnames,
                                   ev.score_logits(backbone, logits or Logits(100.0)))
        files = {pr.PREDICTIONS: pr.predictions_csv(rows)}
        png = pr.confusion_png(rows, data.classnames,
                               f"{data.name} {split}: top-1 {out['top1']:.2f}% on {len(rows)} images")
        if png is not None:
            files[pr.CONFUSION] = png
        # --output may be any folder: replace only the files an earlier eval wrote there (ownership.OwnedFiles)
        with OwnedFiles(folder, "predictions", "eval") as owned:
            owned.check(files)
            owned.write(files)
        out["predictions_file"] = str(folder / pr.PREDICTIONS)
    return out


def _check_output(folder: Path) -> None:
    """Refuse, before evaluating, an --output that is not a folder or holds a predictions.csv / confusion.png that
    blocklora did not write (a user's own file, or one edited since): it is never replaced."""
    from ..engine import predictions as pr
    from ..ownership import OwnedFiles

    if folder.exists() and not folder.is_dir():
        raise BlockLoRAError(f"--output {folder} is a file: give a folder (predictions.csv and confusion.png go in it)")
    if folder.is_dir():
        owned = OwnedFiles(folder, "predictions", "eval")
        owned.record = owned._read_record()
        owned.check([pr.PREDICTIONS, pr.CONFUSION])


def evaluate_zero_shot(model: str, pretrained: str | None, dataset: str, root: str, split: str = "test",
                       template: str | None = "a photo of a {}.", quick_gelu: str = "auto", batch_size: int = 128,
                       workers: int = -1, device: str = "auto", limit: int | None = None, use_cache: bool = True,
                       skip_bad_images: bool = False, tokenizer: str | None = None,
                       test_fraction: float | None = None) -> dict[str, Any]:
    """Top-1 of a frozen backbone (no adapter) on a dataset, with `template` (None: the dataset's own, CoOp's);
    cached (engine/evaluate.zero_shot)."""
    batch_size, workers = eval_options(batch_size, workers, split, limit)
    if template is not None:
        checks.template("template", template)
    data, items, skipped = _test_set(dataset, root, "all", split, limit, template or "{}", skip_bad_images,
                                     "zero-shot classification", test_fraction)
    template = template or data.template
    backbone = load_backbone(model, pretrained, quick_gelu, tokenizer=tokenizer, text=True)
    rt = make_runtime(checks.device("--device", device))
    backbone.to(rt.device)
    backbone.cast_frozen(rt.frozen_dtype("fp32"))
    result, _ = ev.zero_shot(backbone, data, items, [template], rt, batch_size, workers, use_cache=use_cache,
                          split=split)
    return {"model": model, "dataset": data.name, "split": split, "templates": [template],
            **_finish(items, result, skipped, skip_bad_images)}


def image_paths(paths: Sequence[str | os.PathLike]) -> list[str]:
    """Image files and folders (walked as dataset folders are: image extensions, each real folder once) -> files."""
    from collections import Counter

    from ..data.layout import list_image_files, warn_skipped

    out: list[str] = []
    skipped: Counter = Counter()
    for p in map(Path, paths):
        if p.is_dir():
            out += list_image_files(p, skipped=skipped)
        elif os.path.lexists(p):
            out.append(str(p))  # the image opener names what is wrong with a special file
        else:
            raise BlockLoRAError(f"image {p} does not exist: pass image files or folders")
    warn_skipped(skipped, "predict")
    if not out:
        raise BlockLoRAError(f"no images found in {', '.join(map(str, paths))}")
    return out


def predict(backbone: Backbone, runtime: Runtime, images: Sequence[str], classnames: Sequence[str],
            template: str, logit_scale: float = 100.0, topk: int = 5, logits: Logits | None = None
            ) -> list[dict[str, Any]]:
    """Top-k class names with probabilities for each image file; each row says which probabilities they are.

    "softmax": over the classes, softmax(scale * cos) (they sum to 1). "sigmoid" (`logits` of kind sigmoid, as a
    SigLIP adapter trained with train.loss=sigmoid records): each class's own sigma(scale * cos + bias).
    Raises DataError naming the first unreadable image (iter_predictions reports them and goes on)."""
    out = []
    for row in iter_predictions(backbone, runtime, images, classnames, template, logit_scale, topk, logits):
        if "error" in row:
            raise DataError(row["error"])
        out.append(row)
    return out


@torch.no_grad()
def iter_predictions(backbone: Backbone, runtime: Runtime, images: Sequence[str], classnames: Sequence[str],
                     template: str, logit_scale: float = 100.0, topk: int = 5, logits: Logits | None = None,
                     batch_size: int = 64) -> Iterator[dict[str, Any]]:
    """predict's rows one image at a time, in order, as each batch is done: {"image", "probabilities", "top"}, or
    {"image", "error"} for a file that cannot be read (the others go on)."""
    from ..data.types import open_image_file

    logits = logits or Logits(logit_scale)
    topk = checks.number("topk", topk, checks.Range(1, integer=True))
    for warning in ev.prompt_collisions(classnames, checks.template("template", template)):
        log.warning("warning: %s", warning)  # e.g. an adapter whose class names repeat: rows that cannot differ
    head = getattr(backbone, "head", None)
    if head is not None:  # before any image is read: a head that cannot score these classes is refused now
        head = head.for_classes(list(classnames))
    txt = ev.encode_classes(backbone, classnames, [template], runtime) if head is None else None
    transform = backbone.eval_transform()
    backbone.model.eval()
    for start in range(0, len(images), batch_size):
        chunk, pixels, errors = [], [], {}
        for path in images[start:start + batch_size]:
            try:
                pixels.append(transform(open_image_file(path)))
                chunk.append(path)
            except DataError as e:
                errors[path] = str(e)
        rows = dict(zip(chunk, _top(backbone, head, runtime, pixels, txt, logits, classnames, topk))) if chunk else {}
        for path in images[start:start + batch_size]:
            yield {"image": path, "error": errors[path]} if path in errors else {"image": path, **rows[path]}


def _top(backbone: Backbone, head: Any, runtime: Runtime, pixels: list[torch.Tensor], txt: torch.Tensor,
         logits: Logits, classnames: Sequence[str], topk: int) -> list[dict[str, Any]]:
    with runtime.autocast():
        img = F.normalize(backbone.encode_images(torch.stack(pixels).to(runtime.device)).float(), dim=-1)
    if head is not None:  # a baseline's head (methods/): softmax over its logits
        probs = ev.finite_scores(head.logits(img).float()).softmax(-1).cpu()
    else:
        probs = logits.probabilities(logits(ev.finite_scores(img @ txt.T))).cpu()
    if not bool(torch.isfinite(probs).all()):
        raise BlockLoRAError("the model produced non-finite scores: its weights or the adapter are damaged")
    top = probs.topk(min(topk, probs.shape[1]), dim=-1)
    return [{"probabilities": logits.kind, "top": [{"class": classnames[i], "index": int(i), "prob": round(float(v), 6)}
                                                   for v, i in zip(values, indices)]}
            for values, indices in zip(top.values, top.indices)]


def export(adapter_dir: str | os.PathLike, output: str | os.PathLike, pretrained: str | None = None,
           force: bool = False, overwrite: bool = False, tokenizer: str | None = None) -> list[str]:
    """Merge the adapter into the frozen weights and write the backbone's own checkpoint format.

    An existing `output` is replaced only with overwrite, only when it is a weights file or a folder blocklora
    exported, and never when it is, contains or lies inside the adapter or the weights being read. Two exports to
    one path: the later refuses while the earlier is writing (its temporary folder names its process), and the
    result is moved into place without replacing what appeared meanwhile (ownership.place)."""
    output = Path(output)
    adapter_dir = locate_adapter(adapter_dir)
    meta = read_adapter_meta(adapter_dir)
    run = run_meta(meta, adapter_dir)
    weights = pretrained if pretrained is not None else recorded_weights(run, adapter_dir)
    check_export_path(run["model"], output)
    inputs = protected(("the adapter being read (--adapter)", adapter_dir), ("the pretrained weights", weights))
    check_deletable(output, inputs, "--output")
    existed = output.exists() or output.is_symlink()
    if existed:
        if not overwrite:
            raise BlockLoRAError(f"{output} already exists: choose another path or pass --overwrite")
        _check_export_replaceable(output)
    made = [d for d in (output.parent, *output.parent.parents) if not d.exists()]  # removed again on a failure
    output.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(output.parent)  # leftovers of killed writes here (their process is gone)
    # written under a temporary folder beside it, with the output's own name (the format follows the name: a
    # suffix-less one is a folder), then moved into place; removed on any failure. Made first: it tells another
    # export to the same path that this one is under way.
    started = time.time_ns()
    holder = Path(tempfile.mkdtemp(prefix=f"{_temp_prefix(output.name)}{started}-", suffix=TEMP_SUFFIX,
                                   dir=output.parent))
    tmp = holder / output.name
    try:
        others = _earlier_writers(output.parent, output.name, started)
        if others:
            raise BlockLoRAError(f"another blocklora command (pid {others[0]}) is writing {output} right now: wait "
                                 "for it, or choose another --output")
        backbone, _, _ = load_trained(adapter_dir, pretrained, force, device="cpu", compute=False,
                                      tokenizer=tokenizer, text=False)
        state = merged_state_dict(backbone.model)  # a baseline's: the frozen weights themselves (nothing merges)
        described = classifier(run, backbone)
        method = meta["config"]["method"]
        if is_baseline(method):
            described["head"] = {"method": method, "merged": False, "trains": record(method).trains,
                                 "file": HEAD_FILE, "note": export_note(method)}
        with reported_write(output):  # a full disk, a file size limit: the OS error it is, on one line
            backbone.export(state, tmp, described)
            if is_baseline(method) and tmp.is_dir():  # the head beside the frozen model, in a folder export
                from ..adapters.io import WEIGHTS_FILE

                shutil.copyfile(adapter_dir / WEIGHTS_FILE, tmp / HEAD_FILE)
        if tmp.is_dir():
            from .cards import load_snippet, model_card

            snippet = load_snippet(run, output if output.suffix else tmp, export_form(run["model"]).family)
            if snippet is not None:
                snippet = snippet.replace(str(tmp.absolute()), str(output.absolute()))
            what = f"{run['model']} with the adapter merged into its weights" if not is_baseline(method) else \
                f"{run['model']} with its weights unchanged (a {method} head does not merge into them), the head's " \
                f"tensors beside them in {HEAD_FILE}"
            (tmp / "README.md").write_text(model_card(adapter_dir, meta, what, snippet), encoding="utf-8")
            mark(tmp, EXPORT)
        fix_modes(tmp)
        # replace only what the checks above allowed: with --overwrite an export (checked again now), never a
        # file that appeared since they ran
        place(tmp, output, existed and overwrite, _check_export_replaceable)
    except BaseException:
        shutil.rmtree(holder, ignore_errors=True)
        for d in made:  # innermost first; only while empty
            with contextlib.suppress(OSError):
                d.rmdir()
        raise
    shutil.rmtree(holder, ignore_errors=True)
    return [str(output)] if output.is_file() else sorted(str(p) for p in output.iterdir() if p.name != ".blocklora")


HEAD_FILE = "blocklora_head.safetensors"  # a baseline's tensors beside its export (folder exports)


def export_note(method: str) -> str | None:
    """What the export of a `method` adapter holds when nothing merges into the encoders (None: it merges)."""
    if not is_baseline(method):
        return None
    what = {"probe": "a linear head (probe.weight, probe.bias) applied to the image features",
            "tip_adapter": "a cache model (tip.keys, tip.values, with alpha and beta) applied to the image features",
            "tip_adapter_f": "a cache model with trained keys (tip.keys, tip.values, with alpha and beta) applied to "
                             "the image features",
            "coop": "learned prompt context (coop.ctx) fed to the text tower in place of word embeddings"}[method]
    return (f"{method} does not merge into the encoders: its trained part is {what}. The export holds the frozen "
            f"model unchanged; the trained tensors stay in the adapter folder (and, in a folder export, "
            f"{HEAD_FILE}): use `blocklora eval` / `predict` with the adapter folder to classify with them")


def _earlier_writers(folder: Path, name: str, started: int) -> list[int]:
    """Other live exports of `name` into `folder` that started before this one (`started`, in ns): their temporary
    folders are named .NAME.blocklora-PID-START-*.tmp. Of two exports started together the later one refuses."""
    live = set(live_writers(folder, name))
    pattern = re.compile(rf"^\.{re.escape(name)}\.blocklora-(\d+)-(\d+)-")
    out = set()
    with os.scandir(folder) as it:
        for entry in it:
            m = pattern.match(entry.name)
            if m and int(m[1]) in live and (int(m[2]), int(m[1])) < (started, os.getpid()):
                out.add(int(m[1]))
    return sorted(out)


def check_export_path(model: str, output: Path) -> None:
    """A family that exports a folder (backbones.export_form) refuses a file-like --output such as merged.safetensors
    rather than making a folder of that name."""
    form = export_form(model)
    if form.folder_only and output.suffix:
        raise BlockLoRAError(f"{model} exports a folder ({form.files}), not a {output.suffix} file: pass --output "
                             f"without a suffix, e.g. {output.with_suffix('')}")


def classifier(run: dict[str, Any], backbone: Backbone) -> dict[str, Any]:
    """What it takes to classify with an export beside its weights: class names, template, logits, activation.
    "prompts" are the texts the model's own tokenizer is given when blocklora scores (Backbone.clean_texts of the
    filled template: canonicalized for a transformers SigLIP, whose stock tokenizer may be case-sensitive)."""
    act = backbone.activation
    names = list(run["classnames"])
    return {"format": CLASSIFIER_FORMAT, "model": run["model"], "classnames": names, "template": run["template"],
            "prompts": backbone.clean_texts(ev.prompts(names, run["template"])),
            "logit_scale": run.get("logit_scale", 100.0),
            "logit_bias": run.get("logit_bias"), "loss": run.get("loss", "softmax"),
            "activation": None if act is None else ("quick_gelu" if act.quick_gelu else "gelu")}


def _check_export_replaceable(output: Path) -> None:
    """A folder only if blocklora exported it; a file only if it is a weights file (safetensors or torch zip)."""
    if output.is_dir() and not output.is_symlink():
        if marker_kind(output) != EXPORT:
            raise BlockLoRAError(f"{output} is a folder blocklora did not export (no .blocklora marker): refusing to "
                                 "replace it; choose another --output (open_clip: a .safetensors or .pt file)")
        return
    if not _is_weights_file(output):
        raise BlockLoRAError(f"{output} is not a weights file (safetensors or torch): refusing to replace it; "
                             "choose another --output")


def _is_weights_file(path: Path) -> bool:
    try:
        if not path.is_file():
            return False
        if zipfile.is_zipfile(path):  # torch.save's format
            return True
        from safetensors import safe_open

        with safe_open(str(path), "pt"):
            return True
    except Exception:  # noqa: BLE001 - anything unreadable is not a weights file we may replace
        return False


def export_load_hint(adapter_dir: str | os.PathLike, output: str | os.PathLike) -> str | None:
    """Python that loads the export at `output` with the stock library, as printed after the export (cards.py);
    None when no stock call loads it (an open_clip file of a model open_clip cannot name)."""
    from .cards import load_snippet

    run = read_adapter_meta(locate_adapter(adapter_dir)).get("run", {})
    return load_snippet(run, output, export_form(run.get("model", "")).family)
