"""Command line: thin argparse subcommands over the pipeline (pipeline/). User errors print one line, "error: ...",
exit 2."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .. import checks
from ..config.run_config import CLASS_SUBSETS
from ..errors import BlockLoRAError, DataError, one_line, printable

if TYPE_CHECKING:
    from ..engine.results import RunResult
from .flags import (
    Parser,
    RawDescriptionHelpFormatter,
    add_config_file,
    add_config_flags,
    add_overrides,
    add_recipe,
    data_options,
    eval_options,
    field_help,
    given_options,
    int_arg,
    run_config,
    section_keys,
    trained_options,
    unread_warning,
)

log = logging.getLogger("blocklora")



# -- commands --------------------------------------------------------------------------------------------------------
def cmd_params(args: argparse.Namespace) -> int:
    from ..adapters.report import adapter_cost
    from ..backbones import AUTO, default_pretrained, load_backbone

    run = run_config(args)
    cfg = run.adapter
    ignored = unread_warning(cfg.method, given_options(args))
    if ignored:  # params --method tip_adapter --r 8: the count does not depend on r
        print(ignored, file=sys.stderr)
    weights = run.pretrained
    if weights == AUTO:  # checked as train checks it; open_clip weights are not needed for counts: random ones
        weights = default_pretrained(run.model)
        weights = weights if run.model.startswith("hf:") or run.model == "effnet-minilm" else None
    from ..methods import is_baseline

    if is_baseline(cfg.method):
        return _baseline_params(args, run, weights)
    backbone = load_backbone(run.model, weights, run.quick_gelu, tokenizer=run.tokenizer)
    modules = backbone.inject(cfg)  # with the probe forward: no tokenizer, no text needed
    cost = adapter_cost(backbone.model)
    report = {"model": run.model, "config": cfg.to_dict(), "trainable_params": cost["total"]["params"],
              "adapted_modules": modules, "macs_per_token": cost["total"]["macs_per_token"],
              "adds_per_token": cost["total"]["adds_per_token"],
              "towers": {t: {k: v for k, v in c.items() if k != "modules"} | {"modules": len(c["modules"])}
                         for t, c in cost["towers"].items()}}
    if args.json:
        print(_json(report))
        return 0
    print(f"{run.model}: {cfg.method} r={cfg.r} n_blocks={cfg.n_blocks} projections={','.join(cfg.projections)} "
          f"layers={cfg.layers} towers={','.join(cfg.towers)}")
    print(f"{'tower':<8} {'modules':>8} {'params':>12} {'MACs/token':>12} {'adds/token':>12}")
    for tower, c in report["towers"].items():
        print(f"{tower:<8} {c['modules']:>8} {c['params']:>12,} {c['macs_per_token']:>12,} {c['adds_per_token']:>12,}")
    print(f"{'total':<8} {len(modules):>8} {report['trainable_params']:>12,} {report['macs_per_token']:>12,} "
          f"{report['adds_per_token']:>12,}")
    return 0


def _baseline_params(args: argparse.Namespace, run: Any, weights: Any) -> int:
    """`params` of a baseline (methods/cost.py): its trainable parameters and step cost for C classes, K shots."""
    from ..backbones import load_backbone
    from ..methods import record
    from ..methods.cost import baseline_cost

    method = run.adapter.method
    n_classes, shots = args.num_classes, args.shots
    backbone = load_backbone(run.model, weights, run.quick_gelu, tokenizer=run.tokenizer, text=method == "coop")
    cost = baseline_cost(backbone, method, n_classes, shots, run.baseline.n_ctx, run.baseline.ctx_init)
    rec = record(method)
    report = {"model": run.model, "method": method, "trains": rec.trains, "merges": rec.merges,
              "scores": rec.scores, "saves": list(rec.saves), "paper": rec.paper, **cost}
    if args.json:
        print(_json(report))
        return 0
    print(f"{run.model}: {method}, {n_classes} classes x {shots} shots; trains {report['trains']}")
    print(f"trainable params {cost['trainable_params']:,}; a step ({cost['step']}): ~{cost['step_macs']:,} MACs; "
          f"merges into the encoders: {'yes' if report['merges'] else 'no'}")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from ..engine.distributed import process_group
    from ..engine.runtime import deterministic
    from ..pipeline.run import recorded_request, run

    # --resume continues the run as it was started: its recorded request is the base, given options apply on top
    # (and are checked against the record); --config FILE instead is the base as it names it
    recorded = recorded_request(args.output) if args.resume and not args.config else None
    cfg = run_config(args, recorded)
    if not cfg.data.dataset and not cfg.data.split_file:
        raise BlockLoRAError("train needs --dataset (or --split-file, whose dataset it then uses)")
    ignored = unread_warning(cfg.adapter.method, given_options(args))
    if ignored and os.environ.get("RANK", "0") == "0":  # under torchrun: once, from the main process
        print(ignored, file=sys.stderr)
    # Deterministic mode first: the NCCL process group reads it when it is made (runtime.set_deterministic).
    with deterministic(cfg.train.deterministic), process_group(cfg.device) as launch:
        # under torchrun: data parallel, rank 0 writes and prints
        results = run(cfg, args.output, overwrite=args.overwrite, resume=args.resume, rank=launch.rank,
                      world_size=launch.world_size)
    if launch.is_main:
        _print_results(results, args.output)
    return 0


def _print_results(r: RunResult, output: str) -> None:
    from ..engine.rundir import RunDir

    zs = r.zero_shot_top1
    line = f"top-1 {r.top1:.2f}%"
    if zs is not None:
        line = f"zero-shot {zs:.2f}% -> adapted {r.top1:.2f}% ({r.top1 - zs:+.2f})"
    if r.cross_dataset:
        line += " | " + " ".join(f"{k} {v:.2f}" for k, v in r.cross_dataset.items())
    if r.base_to_new:
        line += f" | base {r.base_top1:.2f} new {r.new_top1:.2f} HM {r.harmonic_mean:.2f}"
    print(f"{line} | {r.trainable_params:,} trainable params | {r.wall_time_s['total']:.1f}s | "
          f"results: {printable(str(RunDir(output).results))}")


def cmd_eval(args: argparse.Namespace) -> int:
    from ..pipeline.run import evaluate_adapter

    results = []
    if args.dataset is None and args.peft_adapter:
        raise BlockLoRAError("eval --peft-adapter needs --dataset (and --root): a PEFT adapter records no dataset")
    datasets = [None] if args.dataset is None else [d.strip() for d in args.dataset.split(",") if d.strip()]
    for dataset in datasets:  # a list: cross-dataset / DG targets; None: the adapter's own data
        # --output: predictions.csv and confusion.png, in a subfolder per dataset when several are evaluated
        output = None if not args.output else Path(args.output) / dataset if len(datasets) > 1 else args.output
        if args.peft_adapter:
            from ..interop.peft import evaluate_peft_adapter

            result = evaluate_peft_adapter(args.peft_adapter, dataset, args.root or "", args.model, args.pretrained,
                                           args.split, args.batch_size, args.workers, args.classes or "all",
                                           args.template, args.device, args.limit, args.skip_bad_images,
                                           args.tokenizer, test_fraction=args.test_fraction, output=output)
        else:
            result = evaluate_adapter(args.adapter, dataset, args.root, args.split, args.pretrained,
                                      args.batch_size, args.workers, args.classes, template=args.template,
                                      force=args.force, device=args.device, limit=args.limit,
                                      skip_bad_images=args.skip_bad_images, tokenizer=args.tokenizer,
                                      test_fraction=args.test_fraction, output=output)
        results.append(result)
        if not args.json:
            print(f"{result['dataset']} {args.split}: top-1 {result['top1']:.2f}% "
                  f"(mean per class {result['mean_per_class']:.2f}%, n={result['n']})")
    if args.json:
        print(_json(results[0] if len(results) == 1 else results))
    return 0


def cmd_zeroshot(args: argparse.Namespace) -> int:
    from ..pipeline.trained import evaluate_zero_shot

    template = None if args.dataset_template else args.template  # None: the dataset's own (CoOp's)
    cfg = run_config(args)  # the backbone flags, checked by the config
    result = evaluate_zero_shot(cfg.model, cfg.pretrained, args.dataset, args.root, args.split, template,
                                cfg.quick_gelu, args.batch_size, args.workers, cfg.device, args.limit,
                                use_cache=not args.no_cache, skip_bad_images=args.skip_bad_images,
                                tokenizer=cfg.tokenizer, test_fraction=args.test_fraction)
    _emit(result, args.json, f"{result['dataset']} {args.split}: zero-shot top-1 {result['top1']:.2f}% "
                             f"(n={result['n']}{', cached' if result.get('cached') else ''})")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    import base64

    from ..engine.logits import Logits
    from ..engine.progress import progress
    from ..pipeline.trained import image_paths, iter_predictions, load_trained

    images = image_paths(args.images)
    backbone, meta, rt = load_trained(args.adapter, args.pretrained, args.force, args.device, tokenizer=args.tokenizer)
    run = meta["run"]
    kind = run.get("loss", "softmax")  # the probabilities the adapter was trained for
    logits = Logits(run.get("logit_scale", 100.0), run.get("logit_bias"), kind)
    if not (args.json or args.jsonl):
        print("probabilities: " + ("SigLIP's per-class sigmoid (each class on its own; they need not sum to 1)"
                                   if kind == "sigmoid" else "softmax over the classes"), flush=True)
    bad: list[dict[str, str]] = []
    done: list[dict[str, Any]] = []  # --json: one array at the end
    # one row per image as its batch is done (JSON lines with --json), unreadable files reported and skipped
    rows = iter_predictions(backbone, rt, images, run["classnames"], run["template"], topk=args.topk, logits=logits)
    with progress(rows, total=len(images), desc="predict", unit="image", disable=len(images) < 2) as bar:
        for row in bar:
            shown = printable(row["image"])
            if shown != row["image"]:  # a name that is not UTF-8: shown with \xNN escapes, its bytes kept exactly
                row = {"image": shown, "image_bytes_base64": base64.b64encode(os.fsencode(row["image"])).decode(),
                       **{k: v for k, v in row.items() if k != "image"}}
            if "error" in row:
                bad.append(row)
                bar.write(f"skipped: {printable(row['error'])}", file=sys.stderr)
            else:
                best = ", ".join(f"{t['class']} {100 * t['prob']:.1f}%" for t in row["top"])
                if args.json:
                    done.append(row)
                    continue
                bar.write(_json(row, indent=None) if args.jsonl else f"{shown}: {best}", file=sys.stdout)
                sys.stdout.flush()  # each row as it is done, also into a pipe
    if args.json:
        print(_json(done))
    if bad:
        raise DataError(f"{len(bad)} of {len(images)} images could not be read and have no prediction, first: "
                        f"{bad[0]['error'].removeprefix('cannot read image ')}: fix or remove them")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from ..pipeline.demo import run_demo, summary_lines

    options = {k: v for k, v in (("shots", args.shots), ("seed", args.seed), ("iters", args.iters),
                                  ("test_images", args.limit), ("root", args.root), ("device", args.device))
               if v is not None}
    output = Path(args.output) if args.output else None
    if output is None:
        from ..pipeline.demo import default_output

        output = default_output()
    results, examples = run_demo(output, overwrite=args.overwrite, overrides=tuple(args.overrides), **options)
    print(printable("\n".join(summary_lines(results, examples, output))))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from ..pipeline.run import export, export_load_hint

    if args.format == "peft":
        from ..adapters.io import read_adapter_meta
        from ..interop.peft import export_peft
        from ..methods import is_baseline
        from ..pipeline.trained import locate_adapter

        method = read_adapter_meta(locate_adapter(args.adapter))["config"]["method"]
        if is_baseline(method):
            raise BlockLoRAError(f"{args.adapter} holds a {method} head, not a LoRA adapter: PEFT has no form for it; "
                                 "export it without --format peft (the frozen model, the head beside it)")

        files = export_peft(args.adapter, args.output, args.pretrained, args.force, args.overwrite, args.tokenizer)
        print(f"PEFT LoRA adapter written: {printable(', '.join(files))}")
        card = Path(args.output) / "README.md"
        hint = next((line for line in card.read_text(encoding="utf-8").splitlines() if line.startswith("import ")),
                    None) if card.is_file() else None
        print(f"load it with: {printable(hint)}" if hint else "load it with peft.PeftModel.from_pretrained(base_model, "
              f"{str(Path(args.output).absolute())!r}) on the base model with the same module names")
        return 0
    from ..adapters.io import read_adapter_meta
    from ..pipeline.trained import export_note, locate_adapter

    files = export(args.adapter, args.output, args.pretrained, args.force, args.overwrite, args.tokenizer)
    note = export_note(read_adapter_meta(locate_adapter(args.adapter))["config"]["method"])
    if note:
        print(f"checkpoint written: {printable(', '.join(files))}\nnote: {note}")
        return 0
    print(f"merged checkpoint written: {printable(', '.join(files))}")
    hint = export_load_hint(args.adapter, args.output)
    if hint:  # runs as printed: the activation the adapter was trained with included
        print(f"load it with: {printable(hint)}")
    elif Path(args.output).suffix:  # an open_clip file of a model stock open_clip has no name for
        print("stock open_clip has no name for this model: export to a folder (--output NAME without a suffix) and "
              "load it with: import open_clip; model = open_clip.create_model('local-dir:NAME')")
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    # resolved: what a run with these overrides uses (unset fields at their defaults; see RunConfig.resolved)
    print(_json(run_config(args).resolved().to_dict()))
    return 0


def _json(data: Any, indent: int | None = 2) -> str:
    from ..engine.files import to_json  # strictly valid JSON: no bare NaN, no lone surrogates
    return to_json(data, indent)


def _emit(result: dict[str, Any], as_json: bool, line: str) -> None:
    print(_json(result) if as_json else line)


# -- parser ----------------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="blocklora", description="Block-LoRA / LoRA few-shot fine-tuning of CLIP-style models.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    from .._version import __version__

    parser.add_argument("--version", action="version", version=f"blocklora {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)

    p = sub.add_parser("params", help="trainable parameters and adapter cost of a configuration (no weights needed: "
                       "open_clip models are built with random ones)")
    add_config_flags(p, keys=("model", "pretrained", "quick_gelu", "tokenizer", *section_keys("adapter")))
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--num-classes", type=int_arg("--num-classes", 2, 10**6), default=1000,
                   help="baselines (probe, tip_adapter, tip_adapter_f, coop): the number of classes C their size "
                   "and step depend on (default 1000, ImageNet's)")
    p.add_argument("--shots", type=int_arg("--shots", 1, 10_000), default=16,
                   help="baselines: K shots per class (default 16)")
    add_overrides(p)
    p.set_defaults(func=cmd_params)

    p = sub.add_parser("train", help="train an adapter on K shots per class and report accuracy")
    add_config_file(p)
    add_config_flags(p)  # every flagged config field (flags.py)
    g = p.add_argument_group("run directory")
    g.add_argument("--output", required=True, help="run directory (must not exist unless --overwrite/--resume)")
    add_recipe(g)
    g.add_argument("--overwrite", action="store_true", help="replace an existing run directory")
    g.add_argument("--resume", action="store_true",
                   help="continue an interrupted run from its checkpoint, with the options it was started with "
                        "(recorded in its config.json: --output alone is enough; options given must agree)")
    add_overrides(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="accuracy of a trained adapter on a dataset (any dataset, or a list "
                                      "a,b,c: cross-dataset / domain generalization)")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--adapter", help="a blocklora adapter folder, or the run folder holding it")
    which.add_argument("--peft-adapter", metavar="DIR", help="a PEFT LoRA adapter folder trained elsewhere on the "
                       "same backbone (give --model unless its base_model_name_or_path is that model)")
    p.add_argument("--model", default=None,
                   help="with --peft-adapter: the backbone (default: the adapter's own record)")
    p.add_argument("--template", default=None, type=checks.arg(checks.template, "--template"),
                   help="with --peft-adapter: the prompt template (default \"a photo of a {}.\")")
    data_options(p, own=True)
    eval_options(p)
    p.add_argument("--output", default=None, metavar="DIR",
                   help="also write predictions.csv (path, label, predicted, prob, correct) and confusion.png there "
                        "(default: print only)")
    p.add_argument("--classes", choices=CLASS_SUBSETS, default=None,
                   help=field_help("data.classes") + " (default: all; on the adapter's own data, the run's)")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("zeroshot", help="zero-shot accuracy of a backbone on a dataset")
    add_config_flags(p, keys=("model", "pretrained", "quick_gelu", "tokenizer"))
    data_options(p)
    eval_options(p, trained=False)
    p.add_argument("--template", default="a photo of a {}.", type=checks.arg(checks.template, "--template"),
                   help=field_help("train.template"))
    p.add_argument("--dataset-template", action="store_true", help="use the dataset's hand-made template (CoOp)")
    p.add_argument("--no-cache", action="store_true", help="recompute instead of reading the zero-shot cache")
    p.set_defaults(func=cmd_zeroshot)

    p = sub.add_parser("predict", help="top-k class names for images with a trained adapter")
    p.add_argument("--adapter", required=True, help=ADAPTER_HELP)
    p.add_argument("images", nargs="+", metavar="IMAGE_OR_FOLDER", help="image files or folders of images")
    p.add_argument("--topk", type=int_arg("--topk", 1, 100_000), default=5, help="class names shown per image")
    trained_options(p)
    p.add_argument("--device", default="auto", type=checks.arg(checks.device, "--device"), help=field_help("device"))
    p.add_argument("--json", action="store_true", help="print one JSON array of every image's result at the end")
    p.add_argument("--jsonl", action="store_true", help="print one JSON object per image and line as it is done")
    p.set_defaults(func=cmd_predict)

    from ..interop.export_forms import export_description

    p = sub.add_parser("export", help="merge an adapter into the weights, in the backbone's own format",
                       formatter_class=RawDescriptionHelpFormatter, description=export_description())
    p.add_argument("--adapter", required=True, help=ADAPTER_HELP)
    p.add_argument("--output", required=True,
                   help="open_clip: a .safetensors or .pt file, or a folder (open_clip's local-dir format, which "
                        "records the activation); transformers and effnet-minilm: a folder (a name without a "
                        "suffix)")
    trained_options(p)
    p.add_argument("--format", choices=("merged", "peft"), default="merged",
                   help="merged: the adapter folded into the weights; peft: a PEFT LoRA adapter folder "
                        "(adapter_config.json + adapter_model.safetensors) for transformers backbones")
    p.add_argument("--overwrite", action="store_true", help="replace an existing export blocklora wrote")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("demo", help="offline demo: zero-shot, then Block-LoRA on a few shots of real Fashion-MNIST "
                                    "with packaged real weights (effnet-minilm), then accuracy after")
    p.add_argument("--output", default=None, help="run directory (default runs/demo-<date>-<time>)")
    p.add_argument("--shots", type=int_arg("value", 1), default=None, help="shots per class (default 16)")
    p.add_argument("--seed", type=int, default=None, help="few-shot draw and training seed (default 1)")
    p.add_argument("--iters", type=int_arg("value", 1), default=None, help="training steps (default 200)")
    p.add_argument("--limit", "--test-images", dest="limit", type=int_arg("value", 1), default=None,
                   help="test on a fixed subset of N images, evenly spaced through the test split (default 2000; "
                        "Fashion-MNIST has 10000; --test-images: the former name)")
    p.add_argument("--root", default=None, help="folder with the Fashion-MNIST idx files (default: the Debian "
                                                "package's /usr/share/datasets/fashion-mnist)")
    p.add_argument("--device", default=None, help=field_help("device") + " (default: auto)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing demo run directory")
    add_overrides(p)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("config", help="print the resolved run configuration (defaults + --config + key=value "
                                      "overrides)")
    add_config_file(p)
    add_overrides(p)
    p.set_defaults(func=cmd_config)
    from ..grid.summarize import add_summarize_parser
    from ..grid.sweep import add_sweep_parser

    add_sweep_parser(sub)  # every train option, passed to each cell
    add_summarize_parser(sub)
    return parser


ADAPTER_HELP = "a trained adapter: the adapter folder of a run (RUN/adapter), or the run folder holding it"


def main(argv: Sequence[str] | None = None) -> int:
    from . import signals

    debug = False
    previous = signals.install()  # first: Ctrl-C from here on is one line, not a traceback
    try:
        args = build_parser().parse_args(argv)
        debug = args.debug
        logging.basicConfig(level=logging.INFO if not debug else logging.DEBUG, format="%(message)s",
                            stream=sys.stderr)
        for noisy in ("open_clip", "root", "httpx", "huggingface_hub"):  # "root": open_clip logs through it
            logging.getLogger(noisy).setLevel(logging.ERROR)
        # ours keeps its own level (it would inherit the root's ERROR): warnings before a run's log file opens show
        logging.getLogger("blocklora").setLevel(logging.INFO if not debug else logging.DEBUG)
        # blocklora refuses images over PIL's pixel limit itself (data/decode.py): PIL's own warning would be noise
        warnings.filterwarnings("ignore", message=r"Image size \(\d+ pixels\) exceeds limit")
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        return int(args.func(args) or 0)
    except BlockLoRAError as e:
        if debug:
            raise
        print(f"error: {printable(one_line(e))}", file=sys.stderr)
        return 2
    except OSError as e:  # disk full, permission denied, ...: the environment, not a bug
        if debug:
            raise
        where = f": {e.filename}" if getattr(e, "filename", None) else ""
        print(printable(f"error: {e.strerror or e}{where} (check free space, permissions and paths)"), file=sys.stderr)
        return 1
    except KeyboardInterrupt as e:
        signals.report()
        return signals.exit_code(e)
    finally:
        if argv is not None:  # called in process (tests, a program): give its handlers back. Not for the command
            signals.restore(previous)  # itself: a second Ctrl-C right after the first must stay one line


if __name__ == "__main__":
    raise SystemExit(main())
