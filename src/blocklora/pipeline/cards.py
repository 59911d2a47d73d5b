"""Model cards and load snippets of exports: what each export says about itself, and how to load it without
blocklora.

    model_card(adapter_dir, meta, what, snippet) -> README.md text (PEFT's save_pretrained and the HF Trainer write one)
    load_snippet(run, output, family)            -> Python that loads a merged export with the stock library, or None
    peft_snippet(output, transformers_model)     -> Python that loads a PEFT export with peft, or None

Every snippet runs as printed (absolute paths, its imports included; tests/test_first_hour.py executes them). The
card records the base model and weights, the method and its shape, the data (dataset, K, seed) and the accuracy the
run measured, read from the run folder's results.json when the adapter sits in one.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ..errors import BlockLoRAError


def _absolute(path: str | os.PathLike) -> str:
    return str(Path(path).expanduser().absolute())


def peft_snippet(output: str | os.PathLike, transformers_model: bool) -> str | None:
    """peft.AutoPeftModel loads a transformers base model named by the adapter (auto_mapping); None otherwise."""
    if not transformers_model:
        return None
    return f"import peft; model = peft.AutoPeftModel.from_pretrained({_absolute(output)!r})"


# effnet-minilm's export, part by part with stock libraries (backbones/effnet_minilm.py: export). The image embedding
# is visual(preprocess(image)[None]); the text embedding the mean of text(**tokenizer(prompts, ...)).last_hidden_state
# over the attention mask; classes and logit scale in blocklora_classifier.json.
EFFNET_SNIPPET = """import json, pathlib, transformers
from efficientnet_lite_pytorch import EfficientNet
from open_clip.transform import PreprocessCfg, image_transform_v2
from safetensors.torch import load_file
d = pathlib.Path({out!r}); meta = json.loads((d / "effnet_minilm.json").read_text())
visual = EfficientNet.from_name(meta["arch"], num_classes=meta["embed_dim"]).eval()
visual.load_state_dict(load_file(d / "visual.safetensors"))
text = transformers.BertModel.from_pretrained(d / "text", add_pooling_layer=False).eval()
tokenizer = transformers.AutoTokenizer.from_pretrained(d / "text")
preprocess = image_transform_v2(PreprocessCfg(**meta["preprocess_cfg"]), is_train=False)
classifier = json.loads((d / "blocklora_classifier.json").read_text())"""


def load_snippet(run: dict[str, Any], output: str | os.PathLike, family: str) -> str | None:
    """How the stock libraries load a merged export of `run` at `output`, or None when none can (an open_clip file
    of a model open_clip has no name for: its folder form loads). effnet-minilm's parts load one by one, with its
    evaluation preprocessing from the recorded open_clip PreprocessCfg (EFFNET_SNIPPET)."""
    out = _absolute(output)
    if family == "effnet-minilm":  # stock parts: EfficientNet, BertModel, open_clip's transform on the recorded cfg
        return EFFNET_SNIPPET.format(out=out)
    if family == "transformers":
        return f"import transformers; model = transformers.AutoModel.from_pretrained({out!r})"
    if family != "open_clip":
        return None
    if Path(output).is_dir():
        return f"import open_clip; model = open_clip.create_model('local-dir:{out}')"
    import open_clip

    from ..backbones.activation import stock_load_hint

    model, quick = run.get("model", ""), run.get("quick_gelu") == "yes"
    if model not in open_clip.list_models():  # a model blocklora defines (tiny-clip): open_clip cannot name it
        return None
    return "import open_clip; model = " + stock_load_hint(model, quick, out)


def _results(adapter_dir: Path) -> dict[str, Any] | None:
    from ..engine.rundir import RunDir

    rd = RunDir(Path(adapter_dir).parent)
    if Path(adapter_dir).resolve() != rd.adapter.resolve() or not rd.results.is_file():
        return None
    try:
        return rd.read_results().to_json()
    except BlockLoRAError:
        return None


def _baseline(method: str) -> Any:
    """The registry record of a baseline method (methods/), None for an adapter method or an unknown name."""
    from ..methods.registry import METHODS

    rec = METHODS.get(method)
    return rec if rec is not None and not rec.is_adapter else None


def _method_line(method: str, cfg: dict[str, Any], meta: dict[str, Any]) -> str:
    """The card's method line: an adapter's shape and placement; a baseline's trained part, its hyper-parameters
    (the head record) and that nothing merges, never the adapter keys it does not read (methods.registry.reads)."""
    rec = _baseline(method)
    if rec is None:
        shape = f"r = {cfg.get('r')}" + (f", n_blocks = {cfg.get('n_blocks')}" if method == "block_lora" else "")
        return (f"- method: {method} ({shape}, alpha = {cfg.get('alpha')}, scaling {cfg.get('scaling')}; projections "
                f"{', '.join(cfg.get('projections') or [])} of the {', '.join(cfg.get('towers') or [])} tower(s))")
    head = meta.get("head") or {}
    chosen = ", ".join(f"{k} = {v}" for k, v in head.items() if k not in ("method", "merges") and v not in (None, ""))
    return (f"- method: {method}, a baseline on the frozen encoders ({rec.paper}); trains {rec.trains}"
            + (f"; {chosen}" if chosen else "") + f"; scores an image as {rec.scores}; nothing of it merges into "
            "the encoder weights")


def model_card(adapter_dir: str | os.PathLike, meta: dict[str, Any], what: str, snippet: str | None) -> str:
    """README.md of an export: base model, method (a baseline's own description: what it trains, that it does not
    merge), data, K, seed, accuracy and how to load it."""
    run, cfg = meta.get("run", {}), meta.get("config", {})
    results = _results(Path(adapter_dir))
    data = run.get("data") or {}
    method = cfg.get("method", "?")
    baseline = _baseline(method)
    lines = [
        f"# {run.get('model', '?')} " + (f"with a {method} baseline from blocklora (frozen encoders)" if baseline
                                         else f"adapted with blocklora ({method})"), "",
        f"{what}, exported by blocklora from the adapter {_absolute(adapter_dir)}.", "",
        f"- base model: `{run.get('model', '?')}`, weights `{run.get('pretrained')}`",
        _method_line(method, cfg, meta),
        f"- prompt template: `{run.get('template')}`; {len(run.get('classnames') or [])} classes",
        f"- data: {run.get('dataset') or data.get('dataset') or 'not recorded'}"
        + (f" at `{data['root']}`" if data.get("root") else "")
        + (f", test set held out with test_fraction {data['test_fraction']}" if data.get("test_fraction") else ""),
    ]
    if results:
        zs = results.get("zero_shot_top1")
        lines += [f"- K = {results['shots']} shots per class, seed {results['seed']}, sampler {results.get('sampler')}",
                  f"- accuracy: top-1 {results['top1']:.2f}% on {results.get('n_test')} test images"
                  + (f" (zero-shot {zs:.2f}%)" if zs is not None else ""),
                  f"- trainable parameters: {results.get('trainable_params')}"]
    elif baseline and meta.get("trainable_params") is not None:
        lines += [f"- trainable parameters: {meta['trainable_params']}",
                  "- K, seed, accuracy: not recorded (the adapter is not inside its run folder)"]
    else:
        lines.append("- K, seed, accuracy: not recorded (the adapter is not inside its run folder)")
    lines += ["", "## How to load it", ""]
    if snippet:
        lines += ["```python", snippet, "```"]
    if baseline:
        lines += ["", f"That is the frozen model alone: the {method} head scores with it through blocklora (`blocklora "
                  f"eval --adapter {_absolute(adapter_dir)}`, or `predict` with it)."]
    else:
        lines += ["See the blocklora README, section \"Exports: what each family writes, and how to load it without "
                  "blocklora\"."]
    lines += ["", "The class names, template and logit scale are in blocklora_classifier.json (merged folders) or "
              "the weights file's metadata."]
    return "\n".join(lines) + "\n"
