"""Command line: thin argparse subcommands over api.py. User errors print one line, "error: ...", exit 2."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from . import checks
from .errors import BlockLoRAError, DataError

log = logging.getLogger("blocklora")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, like every other user error
        print(f"error: {message} (see `{self.prog} --help`)", file=sys.stderr)
        raise SystemExit(2)


# -- shared option groups ------------------------------------------------------------------------------------------
def _model_options(p: argparse.ArgumentParser, default_model: str = "ViT-B-16", default_pretrained: str = "auto"):
    g = p.add_argument_group("backbone")
    g.add_argument("--model", default=default_model,
                   help="open_clip name (ViT-B-16, ViT-B-32, ViT-L-14, ...), tiny-clip, effnet-minilm, or hf:DIR_OR_ID "
                        "(default %(default)s)")
    g.add_argument("--pretrained", default=default_pretrained,
                   help="open_clip tag (openai, laion2b_s34b_b88k, ...), a local checkpoint file, or none (random "
                        "weights); for hf: models the model folder to load. Default %(default)s: by model, packaged "
                        "for effnet-minilm, none for tiny-clip, the folder itself for hf:, openai for open_clip names "
                        "that have OpenAI weights (others: pass one of their tags)")
    g.add_argument("--quick-gelu", default="auto", choices=("auto", "yes", "no"),
                   help="QuickGELU MLP activation (OpenAI's CLIP weights need it). auto: from the tag's pretrained "
                        "config, an OpenAI TorchScript archive, a blocklora export's metadata, a -quickgelu model "
                        "name, else GELU (a file named *openai* is guessed QuickGELU, with a warning)")
    _tokenizer_option(g)


def _tokenizer_option(p) -> None:
    p.add_argument("--tokenizer", default=None, metavar="DIR",
                   help="a local copy of the model's tokenizer, for models whose tokenizer comes from a hub "
                        "(SigLIP's): the folder its save_pretrained wrote")


def _adapter_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("adapter")
    g.add_argument("--method", choices=("block_lora", "lora"), default=None)
    g.add_argument("--r", type=int, default=None, help="rank (default 2)")
    g.add_argument("--n-blocks", type=int, default=None, help="blocks sharing A (default 8; 1 = LoRA)")
    g.add_argument("--alpha", type=float, default=None)
    g.add_argument("--dropout", type=float, default=None)
    g.add_argument("--towers", default=None, help="vision,text (default both)")
    g.add_argument("--projections", default=None, help="any of q,k,v,o (default q,k,v)")
    g.add_argument("--layers", "--blocks", dest="layers", default=None,
                   help="all, bottom, mid, up, half-up, half-bottom, top, top3, or indices like 0,1 or 8-11 "
                        "(--blocks: the former name)")


def _adapter_overrides(args: argparse.Namespace) -> list[str]:
    out = []
    for flag, key in (("method", "method"), ("r", "r"), ("n_blocks", "n_blocks"), ("alpha", "alpha"),
                      ("dropout", "dropout"), ("towers", "towers"), ("projections", "projections"),
                      ("layers", "layers")):
        value = getattr(args, flag, None)
        if value is not None:
            out.append(f"adapter.{key}={value}")
    if args.method == "lora" and args.n_blocks is None:
        out.append("adapter.n_blocks=1")
    return out


def _data_options(p: argparse.ArgumentParser, required: bool = True) -> None:
    g = p.add_argument_group("data")
    g.add_argument("--dataset", required=required,
                   help="imagenet, caltech101, oxford_pets, stanford_cars, oxford_flowers, food101, fgvc_aircraft, "
                        "sun397, dtd, eurosat, ucf101, folder, csv, fashion-mnist, ...")
    g.add_argument("--root", default="", help="datasets root (a folder; the CSV file for --dataset csv)")


def _run_config(args: argparse.Namespace):
    from .config import RunConfig, recipe_overrides

    # the named recipe first: every option and key=value after it changes one of its values
    overrides = recipe_overrides(getattr(args, "recipe", None) or "reference")
    overrides += [f"model={args.model}", f"pretrained={args.pretrained}", f"quick_gelu={args.quick_gelu}"]
    if getattr(args, "tokenizer", None):
        overrides.append(f"tokenizer={args.tokenizer}")
    overrides += _adapter_overrides(args)
    for flag, key in (("dataset", "data.dataset"), ("root", "data.root"), ("shots", "data.shots"),
                      ("seed", "data.seed"), ("sampler", "data.sampler"), ("split_file", "data.split_file"),
                      ("classes", "data.classes"), ("workers", "data.workers"), ("iters", "train.iters"),
                      ("batch_size", "train.batch_size"), ("lr", "train.lr"), ("precision", "train.precision"),
                      ("device", "device"), ("checkpoint_every", "train.checkpoint_every"),
                      ("eval_datasets", "eval.datasets"), ("init_adapter", "train.init_adapter"),
                      ("log", "train.log")):
        value = getattr(args, flag, None)
        if value is not None:
            overrides.append(f"{key}={value}")
    if getattr(args, "deterministic", False):
        overrides.append("train.deterministic=true")
    if getattr(args, "grad_checkpointing", False):
        overrides.append("train.grad_checkpointing=true")
    if getattr(args, "skip_bad_images", False):
        overrides.append("data.skip_bad_images=true")
    if getattr(args, "dataset_templates", False):
        overrides.append("eval.dataset_templates=true")
    if getattr(args, "no_zero_shot", False):
        overrides.append("eval.zero_shot=false")
    return RunConfig().with_overrides(overrides + list(args.overrides or []))


# -- commands --------------------------------------------------------------------------------------------------------
def cmd_params(args: argparse.Namespace) -> int:
    from .adapters.config import AdapterConfig
    from .adapters.report import adapter_cost
    from .backbones import load_backbone
    from .config import RunConfig

    cfg = RunConfig().with_overrides(_adapter_overrides(args)).adapter
    assert isinstance(cfg, AdapterConfig)
    backbone = load_backbone(args.model, args.pretrained, args.quick_gelu, tokenizer=args.tokenizer)
    modules = backbone.inject(cfg)  # with the probe forward: no tokenizer, no text needed
    cost = adapter_cost(backbone.model)
    report = {"model": args.model, "config": cfg.to_dict(), "trainable_params": cost["total"]["params"],
              "adapted_modules": modules, "macs_per_token": cost["total"]["macs_per_token"],
              "adds_per_token": cost["total"]["adds_per_token"],
              "towers": {t: {k: v for k, v in c.items() if k != "modules"} | {"modules": len(c["modules"])}
                         for t, c in cost["towers"].items()}}
    if args.json:
        print(_json(report))
        return 0
    print(f"{args.model}: {cfg.method} r={cfg.r} n_blocks={cfg.n_blocks} projections={','.join(cfg.projections)} "
          f"layers={cfg.layers} towers={','.join(cfg.towers)}")
    print(f"{'tower':<8} {'modules':>8} {'params':>12} {'MACs/token':>12} {'adds/token':>12}")
    for tower, c in report["towers"].items():
        print(f"{tower:<8} {c['modules']:>8} {c['params']:>12,} {c['macs_per_token']:>12,} {c['adds_per_token']:>12,}")
    print(f"{'total':<8} {len(modules):>8} {report['trainable_params']:>12,} {report['macs_per_token']:>12,} "
          f"{report['adds_per_token']:>12,}")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from .api import run
    from .engine.distributed import process_group
    from .engine.runtime import deterministic

    if not args.dataset and not args.split_file:
        raise BlockLoRAError("train needs --dataset (or --split-file, whose dataset it then uses)")
    cfg = _run_config(args)
    # Deterministic mode first: the NCCL process group reads it when it is made (runtime.set_deterministic).
    with deterministic(cfg.train.deterministic), process_group(cfg.device) as launch:
        # under torchrun: data parallel, rank 0 writes and prints
        results = run(cfg, args.output, overwrite=args.overwrite, resume=args.resume, rank=launch.rank,
                      world_size=launch.world_size)
    if launch.is_main:
        _print_results(results, args.output)
    return 0


def _print_results(r: dict[str, Any], output: str) -> None:
    from .engine.rundir import RunDir

    zs = r.get("zero_shot_top1")
    line = f"top-1 {r['top1']:.2f}%"
    if zs is not None:
        line = f"zero-shot {zs:.2f}% -> adapted {r['top1']:.2f}% ({r['top1'] - zs:+.2f})"
    if r.get("cross_dataset"):
        line += " | " + " ".join(f"{k} {v:.2f}" for k, v in r["cross_dataset"].items())
    if "harmonic_mean" in r:
        line += f" | base {r['base_top1']:.2f} new {r['new_top1']:.2f} HM {r['harmonic_mean']:.2f}"
    print(f"{line} | {r['trainable_params']:,} trainable params | {r['wall_time_s']['total']:.1f}s | "
          f"results: {RunDir(output).results}")


def cmd_eval(args: argparse.Namespace) -> int:
    from .api import evaluate_adapter

    results = []
    for dataset in [d.strip() for d in args.dataset.split(",") if d.strip()]:  # a list: cross-dataset / DG targets
        if args.peft_adapter:
            from .peft_format import evaluate_peft_adapter

            result = evaluate_peft_adapter(args.peft_adapter, dataset, args.root, args.model, args.pretrained,
                                           args.split, args.batch_size, args.workers, args.classes, args.template,
                                           args.device, args.limit, args.skip_bad_images, args.tokenizer)
        else:
            result = evaluate_adapter(args.adapter, dataset, args.root, args.split, args.pretrained,
                                      args.batch_size, args.workers, args.classes, template=args.template,
                                      force=args.force, device=args.device, limit=args.limit,
                                      skip_bad_images=args.skip_bad_images, tokenizer=args.tokenizer)
        results.append(result)
        if not args.json:
            print(f"{result['dataset']} {args.split}: top-1 {result['top1']:.2f}% "
                  f"(mean per class {result['mean_per_class']:.2f}%, n={result['n']})")
    if args.json:
        print(_json(results[0] if len(results) == 1 else results))
    return 0


def cmd_zeroshot(args: argparse.Namespace) -> int:
    from .trained import evaluate_zero_shot

    template = None if args.dataset_template else args.template  # None: the dataset's own (CoOp's)
    result = evaluate_zero_shot(args.model, args.pretrained, args.dataset, args.root, args.split, template,
                                args.quick_gelu, args.batch_size, args.workers, args.device, args.limit,
                                use_cache=not args.no_cache, skip_bad_images=args.skip_bad_images,
                                tokenizer=args.tokenizer)
    _emit(result, args.json, f"{result['dataset']} {args.split}: zero-shot top-1 {result['top1']:.2f}% "
                             f"(n={result['n']}{', cached' if result.get('cached') else ''})")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    import json

    from tqdm.auto import tqdm

    from .engine.logits import Logits
    from .trained import image_paths, iter_predictions, load_trained

    images = image_paths(args.images)
    backbone, meta, rt = load_trained(args.adapter, args.pretrained, args.force, args.device, tokenizer=args.tokenizer)
    run = meta["run"]
    kind = run.get("loss", "softmax")  # the probabilities the adapter was trained for
    logits = Logits(run.get("logit_scale", 100.0), run.get("logit_bias"), kind)
    if not args.json:
        print("probabilities: " + ("SigLIP's per-class sigmoid (each class on its own; they need not sum to 1)"
                                   if kind == "sigmoid" else "softmax over the classes"), flush=True)
    bad: list[dict[str, str]] = []
    # one row per image as its batch is done (JSON lines with --json), unreadable files reported and skipped
    rows = iter_predictions(backbone, rt, images, run["classnames"], run["template"], topk=args.topk, logits=logits)
    with tqdm(rows, total=len(images), desc="predict", unit="image", file=sys.stderr, dynamic_ncols=True,
              disable=len(images) < 2) as bar:
        for row in bar:
            if "error" in row:
                bad.append(row)
                bar.write(f"skipped: {row['error']}", file=sys.stderr)
            else:
                best = ", ".join(f"{t['class']} {100 * t['prob']:.1f}%" for t in row["top"])
                bar.write(json.dumps(row) if args.json else f"{row['image']}: {best}", file=sys.stdout)
                sys.stdout.flush()  # each row as it is done, also into a pipe
    if bad:
        raise DataError(f"{len(bad)} of {len(images)} images could not be read and have no prediction, first: "
                        f"{bad[0]['error'].removeprefix('cannot read image ')}: fix or remove them")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo, summary_lines

    options = {k: v for k, v in (("shots", args.shots), ("seed", args.seed), ("iters", args.iters),
                                  ("test_images", args.test_images), ("root", args.root), ("device", args.device))
               if v is not None}
    output = Path(args.output) if args.output else None
    if output is None:
        from .demo import default_output

        output = default_output()
    results = run_demo(output, overwrite=args.overwrite, overrides=tuple(args.overrides), **options)
    print("\n".join(summary_lines(results, output)))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from .api import export, export_load_hint

    if args.format == "peft":
        from .peft_format import export_peft

        files = export_peft(args.adapter, args.output, args.pretrained, args.force, args.overwrite, args.tokenizer)
        print(f"PEFT LoRA adapter written: {', '.join(files)} (peft.PeftModel.from_pretrained(base_model, "
              f"{args.output!r}) loads it)")
        return 0
    files = export(args.adapter, args.output, args.pretrained, args.force, args.overwrite, args.tokenizer)
    print(f"merged checkpoint written: {', '.join(files)}")
    hint = export_load_hint(args.adapter, args.output)
    if hint:  # a plain model name would build the default activation: say which call gives the trained one
        print(f"stock open_clip loads it with: {hint}")
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    from .config import RunConfig

    # resolved: what a run with these overrides uses (unset fields at their defaults; see RunConfig.resolved)
    print(_json(RunConfig().with_overrides(args.overrides or []).resolved().to_dict()))
    return 0


def _json(data: Any) -> str:
    from .engine.files import to_json  # strictly valid JSON: no bare NaN

    return to_json(data)


def _emit(result: dict[str, Any], as_json: bool, line: str) -> None:
    print(_json(result) if as_json else line)


# -- parser ----------------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    from .config import RECIPES

    parser = _Parser(prog="blocklora", description="Block-LoRA / LoRA few-shot fine-tuning of CLIP-style models.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    from ._version import __version__

    parser.add_argument("--version", action="version", version=f"blocklora {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("params", help="trainable parameters and adapter cost of a configuration (no weights needed)")
    _model_options(p, default_pretrained="none")
    _adapter_options(p)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_params)

    p = sub.add_parser("train", help="train an adapter on K shots per class and report accuracy")
    _model_options(p)
    _adapter_options(p)
    _data_options(p, required=False)  # required unless --split-file names it
    g = p.add_argument_group("run")
    g.add_argument("--shots", type=int, default=None, help="images per class (default 16; a split file's K)")
    g.add_argument("--seed", type=int, default=None, help="sampling and training seed (default 1; a split file's)")
    g.add_argument("--sampler", choices=("clip-lora", "coop"), default=None,
                   help="which peer's draw order (default clip-lora; a split file's)")
    g.add_argument("--split-file", default=None,
                   help="reuse a drawn split (the split.json of an earlier run): its dataset, shots, seed, sampler "
                        "and classes are the run's, and the default schedule follows its K")
    g.add_argument("--classes", choices=("all", "base", "new"), default=None,
                   help="base: base-to-new protocol (train on the base half, test base and new)")
    g.add_argument("--output", required=True, help="run directory (must not exist unless --overwrite/--resume)")
    g.add_argument("--recipe", choices=tuple(RECIPES), default="reference",
                   help="reference (default): CLIP-LoRA's GPU recipe, 500 x shots steps of batch 32, lr 2e-4; quick: "
                        "the demo's CPU budget, " + ", ".join(f"{k.split('.')[1]} {v:g}" for k, v in
                                                               RECIPES["quick"].items()) +
                        " (minutes on a CPU). Options and key=value overrides change single values of either")
    g.add_argument("--iters", type=int, default=None, help="total steps (default 500 x shots)")
    g.add_argument("--batch-size", type=int, default=None)
    g.add_argument("--lr", type=float, default=None)
    g.add_argument("--precision", choices=("auto", "fp32", "fp16", "bf16"), default=None)
    g.add_argument("--device", default=None, help="auto, cpu, cuda, cuda:N")
    g.add_argument("--workers", type=int, default=None, help="data-loading processes")
    g.add_argument("--checkpoint-every", type=int, default=None, help="save the resumable state every N steps")
    g.add_argument("--overwrite", action="store_true", help="replace an existing run directory")
    g.add_argument("--resume", action="store_true", help="continue an interrupted run from its checkpoint")
    g.add_argument("--deterministic", action="store_true", help="bit-identical reruns (slower kernels on GPU)")
    g.add_argument("--grad-checkpointing", action="store_true",
                   help="recompute block activations in backward: less memory, about a third more compute")
    g.add_argument("--skip-bad-images", action="store_true", help="skip unreadable images (listed in results)")
    g.add_argument("--dataset-templates", action="store_true", help="also report zero-shot with CoOp's templates")
    g.add_argument("--no-zero-shot", action="store_true", help="skip the zero-shot evaluation")
    g.add_argument("--eval-datasets", default=None, metavar="LIST",
                   help="cross-dataset / domain generalization: also test on these datasets under --root "
                        "(e.g. caltech101,dtd or imagenet_v2,imagenet_sketch,imagenet_a,imagenet_r)")
    g.add_argument("--init-adapter", default=None, metavar="DIR",
                   help="start from a PEFT LoRA adapter trained elsewhere on the same backbone (its modules and rank "
                        "must be the run's; Block-LoRA needs an A made of n equal blocks)")
    g.add_argument("--log", choices=("none", "tensorboard"), default=None,
                   help="also write loss, learning rate, step time and accuracy as TensorBoard scalars "
                        "(RUN/tensorboard; needs the tensorboard extra)")
    g.add_argument("overrides", nargs="*", metavar="key=value", help="any config value, e.g. train.lr=1e-4")
    p.set_defaults(func=cmd_train)
    train_parser = p

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
    _data_options(p)
    _eval_options(p)
    p.add_argument("--classes", choices=("all", "base", "new"), default="all")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("zeroshot", help="zero-shot accuracy of a backbone on a dataset")
    _model_options(p)
    _data_options(p)
    _eval_options(p, pretrained=False, force=False)
    p.add_argument("--template", default="a photo of a {}.", type=checks.arg(checks.template, "--template"))
    p.add_argument("--dataset-template", action="store_true", help="use the dataset's hand-made template (CoOp)")
    p.add_argument("--no-cache", action="store_true")
    p.set_defaults(func=cmd_zeroshot)

    p = sub.add_parser("predict", help="top-k class names for images with a trained adapter")
    p.add_argument("--adapter", required=True, help="the adapter folder, or the run folder holding it")
    p.add_argument("images", nargs="+", metavar="IMAGE_OR_FOLDER")
    p.add_argument("--topk", type=_int_arg("--topk", 1, 100_000), default=5)
    p.add_argument("--pretrained", default=None, help="the backbone weights, if not where training found them")
    _tokenizer_option(p)
    p.add_argument("--force", action="store_true", help="load even if the backbone fingerprint differs")
    p.add_argument("--device", default="auto", type=checks.arg(checks.device, "--device"))
    p.add_argument("--json", action="store_true", help="one JSON object per image and line (JSON lines)")
    p.set_defaults(func=cmd_predict)

    import textwrap

    from .export_forms import CLASSIFIER_FILE, FORMS

    intro = ("Merge the adapter into the frozen weights and write them in the model family's own format, loadable "
             "without blocklora. Every export carries the class names, template, logit scale and MLP activation: in "
             f"the file's metadata, or in {CLASSIFIER_FILE} in a folder. What each family writes:")
    families = [textwrap.fill(f"{f.family}: {f.files}", 100, initial_indent="  ", subsequent_indent="    ",
                              break_on_hyphens=False) for f in FORMS.values()]
    p = sub.add_parser("export", help="merge an adapter into the weights, in the backbone's own format",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="\n".join([textwrap.fill(intro, 100), *families]))
    p.add_argument("--adapter", required=True, help="the adapter folder, or the run folder holding it")
    p.add_argument("--output", required=True,
                   help="open_clip: a .safetensors or .pt file, or a folder (open_clip's local-dir format, which "
                        "records the activation); transformers and effnet-minilm: a folder (a name without a "
                        "suffix)")
    p.add_argument("--pretrained", default=None)
    _tokenizer_option(p)
    p.add_argument("--format", choices=("merged", "peft"), default="merged",
                   help="merged: the adapter folded into the weights (default); peft: a PEFT LoRA adapter folder "
                        "(adapter_config.json + adapter_model.safetensors) for transformers backbones")
    p.add_argument("--force", action="store_true")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("demo", help="offline demo: zero-shot, then Block-LoRA on a few shots of real Fashion-MNIST "
                                    "with packaged real weights (effnet-minilm), then accuracy after")
    p.add_argument("--output", default=None, help="run directory (default runs/demo-<date>-<time>)")
    p.add_argument("--shots", type=_positive_int, default=None, help="shots per class (default 16)")
    p.add_argument("--seed", type=int, default=None, help="few-shot draw and training seed (default 1)")
    p.add_argument("--iters", type=_positive_int, default=None, help="training steps (default 200)")
    p.add_argument("--test-images", type=_positive_int, default=None,
                   help="size of the fixed test subset (default 2000; Fashion-MNIST has 10000)")
    p.add_argument("--root", default=None, help="folder with the Fashion-MNIST idx files (default: the Debian "
                                                "package's /usr/share/datasets/fashion-mnist)")
    p.add_argument("--device", default=None)
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="any run config override, e.g. train.lr=1e-3")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("config", help="print the resolved run configuration (defaults + key=value overrides)")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    p.set_defaults(func=cmd_config)
    from .summarize import add_summarize_parser
    from .sweep import add_sweep_parser

    add_sweep_parser(sub, train_parser, _run_config)  # every train option, passed to each cell
    add_summarize_parser(sub)
    return parser


def _int_arg(name: str, lo: int, hi: int | None = None):
    return checks.arg(checks.number, name, checks.Range(lo, hi, integer=True), convert=int)


_positive_int = _int_arg("value", 1)


def _eval_options(p: argparse.ArgumentParser, pretrained: bool = True, force: bool = True) -> None:
    p.add_argument("--split", choices=("test", "val", "train"), default="test")
    p.add_argument("--batch-size", type=_int_arg("--batch-size", 1, 65536), default=128)
    p.add_argument("--limit", type=_int_arg("--limit", 1), default=None,
                   help="test on a fixed subset of N images, evenly spaced through the split (default: all)")
    p.add_argument("--workers", type=_int_arg("--workers", -1, 256), default=-1)
    p.add_argument("--device", default="auto", type=checks.arg(checks.device, "--device"))
    p.add_argument("--json", action="store_true")
    p.add_argument("--skip-bad-images", action="store_true", help="skip unreadable images (listed in the output)")
    if pretrained:
        p.add_argument("--pretrained", default=None, help="the backbone weights, if not where training found them")
        _tokenizer_option(p)
    if force:
        p.add_argument("--force", action="store_true", help="load even if the backbone fingerprint differs")


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
        print(f"error: {_one_line(e)}", file=sys.stderr)
        return 2
    except OSError as e:  # disk full, permission denied, ...: the environment, not a bug
        if debug:
            raise
        where = f": {e.filename}" if getattr(e, "filename", None) else ""
        print(f"error: {e.strerror or e}{where} (check free space, permissions and paths)", file=sys.stderr)
        return 1
    except KeyboardInterrupt as e:
        signals.report()
        return signals.exit_code(e)
    finally:
        if argv is not None:  # called in process (tests, a program): give its handlers back. Not for the command
            signals.restore(previous)  # itself: a second Ctrl-C right after the first must stay one line


def _one_line(e: BaseException) -> str:
    """The first line of a user error; for one re-raised by a DataLoader worker ("Caught DataError in DataLoader
    worker process 0.\nOriginal Traceback ...\nblocklora.errors.DataError: the message"), the original message."""
    text = str(e)
    lines = [line for line in text.splitlines() if line.strip()]
    if len(lines) > 1 and lines[0].startswith("Caught ") and "Original Traceback" in text:
        last = lines[-1]
        return last.split(": ", 1)[1] if ": " in last and last.split(": ", 1)[0].endswith("Error") else last
    return lines[0] if lines else type(e).__name__


if __name__ == "__main__":
    raise SystemExit(main())
