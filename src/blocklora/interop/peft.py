"""PEFT's LoRA adapter format, both ways: a blocklora adapter written as a PEFT LoRA adapter, and a PEFT LoRA
adapter read as blocklora factors.

A Block-LoRA update is s * B @ [A, A, ..., A] (core.delta_weight): exactly a rank-r LoRA whose down-projection is A
tiled n times along the input. So every blocklora adapter on a Linear (or 1x1 convolution) is written losslessly as
PEFT's LoRA (Hu et al. 2021; PEFT's `LoraConfig`):

    adapter_config.json        peft_type LORA, r, lora_alpha, use_rslora, lora_dropout, target_modules (the adapted
                               modules' full names), base_model_name_or_path
    adapter_model.safetensors  base_model.model.<module>.lora_A.weight (r, d_in) = [A, ..., A] (the tiling)
                               base_model.model.<module>.lora_B.weight (d_out, r)

PEFT scales by lora_alpha / sqrt(r) (use_rslora) or lora_alpha / r (peft.tuners.lora.layer.LoraLayer.update_layer):
blocklora's "rslora" and "standard" scalings are the same expressions of the same numbers, so the scaling is equal
to the bit; the "mean" fold's 1/n goes into the tiled A (exact for n a power of two, else within one rounding).
What the export loses: nothing numerically, but the shared structure is no longer visible (PEFT holds a full-width
A) and the down-projection is stored n times.

Fused layouts are refused with the reason: PEFT's LoRA on nn.MultiheadAttention (open_clip's attention) holds one
factor pair for the fused in_proj and wraps out_proj so that its update is applied twice (in forward and again when
merging), and timm's fused qkv Linear has no per-projection LoRA in PEFT; neither can hold blocklora's q/k/v/o
adapters as they are.

Reading (`read_peft_adapter`) is the inverse: PEFT's factors are mapped onto blocklora's module names, B rescaled
by PEFT's scaling over blocklora's (exact when they are equal), A folded back to one block when n_blocks > 1 (only
an A that is n equal blocks can be: anything else is refused by name). Only JSON and safetensors are read.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..adapters.config import AdapterConfig
from ..adapters.core import fold_factor, scaling_factor
from ..adapters.fused import QKVAdapters
from ..adapters.inject import adapter_config, adapter_layers, plan
from ..adapters.layers import BlockLoRAConv1x1, BlockLoRALinear
from ..errors import AdapterMismatchError, BlockLoRAError
from ..ownership import atomic_folder

# PEFT's own file names (peft.utils.constants CONFIG_NAME, SAFETENSORS_WEIGHTS_NAME)
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PREFIX = "base_model.model."  # what PeftModel puts before the wrapped model's module names in the saved keys
KIND = "peft-export"  # the ownership marker's kind
RECORD = "blocklora"  # the safetensors metadata key of an export's record (model, pretrained, template, ...)
# PEFT LoRA options that change the computation in ways blocklora's factors cannot hold
UNSUPPORTED = {"use_dora": "DoRA's magnitude vector", "lora_bias": "a bias on lora_B",
               "fan_in_fan_out": "transposed (Conv1D) weights", "modules_to_save": "fully trained modules",
               "trainable_token_indices": "trained token embeddings", "target_parameters": "parameter targets"}


def peft_refusal(model: nn.Module) -> str | None:
    """Why this model's adapters cannot be written as PEFT LoRA (a fused q/k/v layout), or None."""
    for name, layer in adapter_layers(model):
        if isinstance(layer, QKVAdapters):
            kind = ("nn.MultiheadAttention (open_clip's attention): PEFT's LoRA on it holds one factor pair for the "
                    "fused in_proj and applies its out_proj update twice (in forward and again when merging)"
                    if hasattr(layer, "in_proj_weight") else
                    "a fused qkv Linear (timm's towers): PEFT has no per-projection LoRA on it")
            return (f"{name} is {kind}, so PEFT cannot load blocklora's per-projection adapters there; use "
                    "blocklora's own adapter or a merged export (--format merged), or a transformers backbone (hf:)")
    return None


def peft_tensors(model: nn.Module) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(adapter_config.json fields, adapter_model.safetensors tensors) of the adapters injected in `model`.

    Tensors are float32 copies on the CPU; lora_A is A tiled n_blocks times (times the mean fold's 1/n). Raises
    BlockLoRAError for a model without adapters or with a fused layout (peft_refusal)."""
    cfg = adapter_config(model)
    if cfg is None:
        raise BlockLoRAError("this model carries no blocklora adapter: nothing to export")
    why = peft_refusal(model)
    if why:
        raise BlockLoRAError(f"cannot export in PEFT's format: {why}")
    tensors: dict[str, torch.Tensor] = {}
    targets = []
    fold = fold_factor(cfg.n_blocks, cfg.fold)
    for name, layer in adapter_layers(model):
        assert isinstance(layer, (BlockLoRALinear, BlockLoRAConv1x1))
        a = layer.lora_A.detach().float().cpu().repeat(1, cfg.n_blocks)
        if fold != 1.0:
            a = a * fold
        b = layer.lora_B.detach().float().cpu()
        if isinstance(layer, BlockLoRAConv1x1):  # PEFT's LoRA on a Conv2d: two 1x1 convolutions
            a, b = a[:, :, None, None], b[:, :, None, None]
        tensors[f"{PREFIX}{name}.lora_A.weight"] = a.contiguous()
        tensors[f"{PREFIX}{name}.lora_B.weight"] = b.contiguous()
        targets.append(name)
    config = {
        "peft_type": "LORA", "task_type": None, "inference_mode": True,
        "r": cfg.r, "lora_alpha": cfg.alpha, "use_rslora": cfg.scaling == "rslora", "lora_dropout": cfg.dropout,
        "target_modules": targets, "bias": "none", "fan_in_fan_out": False, "init_lora_weights": True,
        "modules_to_save": None, "rank_pattern": {}, "alpha_pattern": {}, "layers_to_transform": None,
        "use_dora": False,
    }
    return config, tensors


def write_peft_adapter(model: nn.Module, output: str | os.PathLike, base_model: str | None = None,
                       extra: Mapping[str, Any] | None = None, replace: bool | None = None) -> list[str]:
    """Write `model`'s adapters as a PEFT LoRA adapter folder at `output` (which must not exist; replace=True: or
    be a PEFT export blocklora wrote; None: whether one existed when the write began); atomic.

    `base_model` is recorded as base_model_name_or_path (what PeftModel.from_pretrained's caller loads first);
    `extra` is kept as JSON under "blocklora" in the safetensors header (read_record). Returns the files written."""
    from safetensors.torch import save_file

    config, tensors = peft_tensors(model)
    config["base_model_name_or_path"] = base_model
    # blocklora's own record goes into the safetensors header: PEFT warns about unknown adapter_config.json keys
    metadata = {"format": "pt", **({RECORD: json.dumps(dict(extra), allow_nan=False)} if extra else {})}
    output = Path(output)
    with atomic_folder(output, KIND, replace) as tmp:
        save_file(tensors, str(tmp / WEIGHTS_FILE), metadata=metadata)
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2, allow_nan=False) + "\n")
    return sorted(str(p) for p in output.iterdir() if p.name != ".blocklora")


# -- reading ---------------------------------------------------------------------------------------------------------
def read_peft_config(directory: str | os.PathLike) -> dict[str, Any]:
    """adapter_config.json of a PEFT LoRA adapter, checked: a LoRA, with nothing blocklora's factors cannot hold."""
    path = Path(directory) / CONFIG_FILE
    if not path.is_file():
        raise AdapterMismatchError(f"no PEFT adapter at {directory}: {CONFIG_FILE} is missing")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise AdapterMismatchError(f"cannot read {path}: {str(e).splitlines()[0][:120]}") from None
    if not isinstance(config, dict) or config.get("peft_type") != "LORA":
        got = config.get("peft_type") if isinstance(config, dict) else type(config).__name__
        raise AdapterMismatchError(f"{path} is not a PEFT LoRA adapter (peft_type {got!r}): blocklora reads LoRA only")
    for key, what in UNSUPPORTED.items():
        if config.get(key):
            raise AdapterMismatchError(f"{path} uses {key} ({what}), which blocklora's adapters cannot hold")
    if config.get("bias", "none") != "none":
        raise AdapterMismatchError(f"{path} trains biases (bias={config['bias']!r}), which blocklora's adapters "
                                   "cannot hold")
    r = config.get("r")
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise AdapterMismatchError(f"{path}: r {r!r} is not a positive integer")
    alpha = config.get("lora_alpha")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha) or alpha <= 0:
        raise AdapterMismatchError(f"{path}: lora_alpha {alpha!r} is not a positive number")
    return config


def read_record(directory: str | os.PathLike) -> dict[str, Any]:
    """The record blocklora's export keeps in the weights file's header ({} for a PEFT adapter made elsewhere)."""
    from safetensors import safe_open

    try:
        with safe_open(str(Path(directory) / WEIGHTS_FILE), "pt") as f:
            record = json.loads((f.metadata() or {}).get(RECORD, "{}"))
    except Exception:  # noqa: BLE001 - unreadable here is reported by read_peft_adapter, which reads the tensors
        return {}
    return record if isinstance(record, dict) else {}


def _module_value(pattern: Mapping[str, Any], module: str, default: Any) -> Any:
    """PEFT's rank_pattern / alpha_pattern lookup: the first key the module's name ends with (or matches)."""
    import re

    for key, value in (pattern or {}).items():
        if module == key or module.endswith(f".{key}") or re.fullmatch(key, module):
            return value
    return default


def read_peft_adapter(directory: str | os.PathLike, model: nn.Module, cfg: AdapterConfig | None = None
                      ) -> tuple[AdapterConfig, dict[str, torch.Tensor]]:
    """A PEFT LoRA adapter as (blocklora AdapterConfig, tensors keyed by blocklora's names) for `model`.

    With `cfg` (a run's adapter config: --init-adapter), the PEFT adapter must adapt exactly the modules cfg places
    and have its rank; without it, the config is read off the file (method lora, the towers / layers / projections
    its modules cover, its r, alpha and scaling). B is rescaled by PEFT's scaling over blocklora's, so the update
    is the same. Raises AdapterMismatchError naming the first module, key or shape that does not fit."""
    from safetensors.torch import load_file

    directory = Path(directory)
    config = read_peft_config(directory)
    try:
        raw = load_file(str(directory / WEIGHTS_FILE))
    except Exception as e:  # noqa: BLE001 - a damaged or missing file (PEFT's pickled .bin is never read)
        reason = str(e).splitlines()[0][:160] if str(e) else type(e).__name__
        raise AdapterMismatchError(f"cannot read {directory / WEIGHTS_FILE}: {reason} (blocklora reads PEFT's "
                                   "safetensors file only, never adapter_model.bin)") from None
    factors: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in raw.items():
        name = key[len(PREFIX):] if key.startswith(PREFIX) else key
        module, _, leaf = name.rpartition(".lora_")
        if leaf not in ("A.weight", "B.weight") or not module:
            raise AdapterMismatchError(f"{directory / WEIGHTS_FILE}: {key} is not a LoRA factor (lora_A.weight / "
                                       "lora_B.weight): blocklora reads plain LoRA adapters only")
        if not bool(torch.isfinite(value).all()):
            raise AdapterMismatchError(f"adapter {directory}: {key} holds NaN or infinite values")
        factors.setdefault(module, {})[leaf[0]] = value
    half = next((m for m, f in factors.items() if len(f) != 2), None)
    if half is not None:
        raise AdapterMismatchError(f"adapter {directory}: {half} has only lora_{next(iter(factors[half]))}; "
                                   "the file is damaged")
    if cfg is None:
        cfg = _config_for(model, factors, config, directory)
    targets = {t.path: t for t in plan(model, cfg)}
    fused = next((t.path for t in targets.values() if t.kind != "linear" and t.kind != "conv1x1"), None)
    if fused is not None:
        raise AdapterMismatchError(f"adapter {directory} does not fit this model: {fused} has a fused q/k/v layout "
                                   "(nn.MultiheadAttention or a qkv Linear), which PEFT LoRA adapters do not describe "
                                   "per projection")
    missing = sorted(set(targets) - set(factors))
    unexpected = sorted(set(factors) - set(targets))
    if missing or unexpected:
        first = f"missing {missing[0]}" if missing else f"unexpected {unexpected[0]}"
        raise AdapterMismatchError(f"adapter {directory} does not fit this model: {first} ({len(missing)} missing, "
                                   f"{len(unexpected)} unexpected modules); was it trained on another architecture "
                                   "or placement (--towers, --layers, --projections)?")
    s_blocklora = scaling_factor(cfg.alpha, cfg.r, cfg.scaling) * fold_factor(cfg.n_blocks, cfg.fold)
    tensors: dict[str, torch.Tensor] = {}
    for path, f in factors.items():
        a, b = f["A"].float(), f["B"].float()
        a, b = (a.flatten(1), b.flatten(1)) if a.dim() == 4 else (a, b)  # a Conv2d LoRA's 1x1 kernels
        layer = model.get_submodule(path)
        d_in = getattr(layer, "in_features", None) or getattr(layer, "in_channels", None)
        d_out = getattr(layer, "out_features", None) or getattr(layer, "out_channels", None)
        r = _module_value(config.get("rank_pattern"), path, config["r"])
        if a.shape != (r, d_in) or b.shape != (d_out, r) or r != cfg.r:
            raise AdapterMismatchError(f"adapter {directory} does not fit this model: {path} has lora_A "
                                       f"{tuple(a.shape)} and lora_B {tuple(b.shape)}, the model needs "
                                       f"({cfg.r}, {d_in}) and ({d_out}, {cfg.r})")
        alpha = _module_value(config.get("alpha_pattern"), path, config["lora_alpha"])
        s_peft = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
        if cfg.n_blocks > 1:
            blocks = a.unflatten(1, (cfg.n_blocks, d_in // cfg.n_blocks))
            if not torch.equal(blocks, blocks[:, :1].expand_as(blocks)):
                raise AdapterMismatchError(f"adapter {directory} cannot start a Block-LoRA run with n_blocks="
                                           f"{cfg.n_blocks}: the lora_A of {path} is not {cfg.n_blocks} equal blocks "
                                           "(a plain LoRA); use --method lora")
            a = blocks[:, 0]
        tensors[f"{path}.lora_A"] = a.contiguous()
        tensors[f"{path}.lora_B"] = (b if s_peft == s_blocklora else b * (s_peft / s_blocklora)).contiguous()
    return cfg, tensors


def _config_for(model: nn.Module, factors: Mapping[str, Any], config: Mapping[str, Any],
                where: Path) -> AdapterConfig:
    """The blocklora LoRA config whose placement is the modules the PEFT file adapts (every tower, layer and
    projection the model has, narrowed to those named)."""
    widest = AdapterConfig(method="lora", projections=("q", "k", "v", "o"))
    from ..adapters.sites import find_placement

    towers = tuple(t for t, sites in find_placement(model).sites.items() if sites)
    try:
        every = plan(model, AdapterConfig(method="lora", projections=widest.projections, towers=towers))
    except BlockLoRAError as e:
        raise AdapterMismatchError(f"adapter {where} does not fit this model: {e}") from None
    hit = [t for t in every if t.path in factors]
    if not hit:
        raise AdapterMismatchError(f"adapter {where} does not fit this model: none of its modules (e.g. "
                                   f"{next(iter(factors), '?')}) is an attention projection of this model")
    dropout = config.get("lora_dropout", 0.0)
    return AdapterConfig(
        method="lora", r=config["r"], alpha=float(config["lora_alpha"]),
        dropout=float(dropout) if isinstance(dropout, (int, float)) and 0 <= dropout < 1 else 0.0,
        scaling="rslora" if config.get("use_rslora") else "standard",
        towers=tuple(dict.fromkeys(t.tower for t in hit)), layers=tuple(sorted({t.layer for t in hit})),
        projections=tuple(p for p in "qkvo" if any(p in t.projections for t in hit)))


def load_peft_adapter(model: nn.Module, directory: str | os.PathLike, cfg: AdapterConfig | None = None
                      ) -> AdapterConfig:
    """Inject blocklora adapters into a fresh `model` holding a PEFT LoRA adapter's update (read_peft_adapter)."""
    from ..adapters.inject import inject

    cfg, tensors = read_peft_adapter(directory, model, cfg)
    inject(model, cfg)
    copy_factors(model, tensors)
    return cfg


@torch.no_grad()
def copy_factors(model: nn.Module, tensors: Mapping[str, torch.Tensor]) -> None:
    """Copy read_peft_adapter's tensors into the adapters injected in `model` (same names and shapes)."""
    for name, value in tensors.items():
        param = model.get_parameter(name)
        param.copy_(value.to(param.dtype))


# -- the commands' entry points ---------------------------------------------------------------------------------------
def export_peft(adapter_dir: str | os.PathLike, output: str | os.PathLike, pretrained: str | None = None,
                force: bool = False, overwrite: bool = False, tokenizer: str | None = None) -> list[str]:
    """`blocklora export --format peft`: a trained adapter as a PEFT LoRA adapter folder at `output`.

    The backbone is loaded (and its fingerprint checked) as for every use of the adapter; an existing `output` is
    replaced only with overwrite and only when blocklora wrote it as a PEFT export. Raises BlockLoRAError for a
    fused q/k/v layout (peft_refusal) before anything is written."""
    from ..adapters.io import read_adapter_meta
    from ..ownership import check_deletable, marker_kind, protected
    from ..pipeline.trained import load_trained, locate_adapter, recorded_weights, run_meta

    output = Path(output)
    adapter_dir = locate_adapter(adapter_dir)
    meta = read_adapter_meta(adapter_dir)
    run = run_meta(meta, adapter_dir)
    weights = pretrained if pretrained is not None else recorded_weights(run, adapter_dir)
    inputs = protected(("the adapter being read (--adapter)", adapter_dir), ("the pretrained weights", weights))
    check_deletable(output, inputs, "--output")
    existed = output.exists() or output.is_symlink()  # what may be replaced, decided now (atomic_folder's replace)
    if existed:
        if not overwrite:
            raise BlockLoRAError(f"{output} already exists: choose another path or pass --overwrite")
        if output.is_symlink() or not output.is_dir() or marker_kind(output) != KIND:
            raise BlockLoRAError(f"{output} is not a PEFT export blocklora wrote (no .blocklora marker of kind "
                                 f"{KIND}): refusing to replace it; choose another --output")
    backbone, _, _ = load_trained(adapter_dir, pretrained, force, device="cpu", compute=False, tokenizer=tokenizer,
                                  text=False)
    model = run["model"]
    base = model[3:] if model.startswith("hf:") else model
    return write_peft_adapter(backbone.model, output, base, extra={
        "exported_from": str(adapter_dir), "model": model, "pretrained": weights, "method": meta["config"]["method"],
        "n_blocks": meta["config"]["n_blocks"], "template": run.get("template")}, replace=existed)


def evaluate_peft_adapter(directory: str | os.PathLike, dataset: str, root: str, model: str | None = None,
                          pretrained: str | None = None, split: str = "test", batch_size: int = 128,
                          workers: int = -1, classes: str = "all", template: str | None = None, device: str = "auto",
                          limit: int | None = None, skip_bad_images: bool = False,
                          tokenizer: str | None = None) -> dict[str, Any]:
    """`blocklora eval --peft-adapter`: top-1 of a PEFT LoRA adapter on its backbone (`model`, default: what the
    adapter records: blocklora's own export record, else "hf:" + base_model_name_or_path)."""
    from .. import checks
    from ..backbones import AUTO, load_backbone
    from ..engine.runtime import make_runtime
    from ..pipeline.trained import eval_options, evaluate_loaded

    batch_size, workers = eval_options(batch_size, workers, split, limit)
    config = read_peft_config(directory)
    record = read_record(directory)
    base = config.get("base_model_name_or_path")
    model = model or record.get("model") or (f"hf:{base}" if isinstance(base, str) and base else None)
    if not model:
        raise BlockLoRAError(f"{directory} does not name its base model (base_model_name_or_path): pass --model")
    if pretrained is None and record.get("model") == model:
        pretrained = record.get("pretrained")
    backbone = load_backbone(model, AUTO if pretrained is None else pretrained, tokenizer=tokenizer, text=True)
    load_peft_adapter(backbone.model, directory)
    rt = make_runtime(checks.device("--device", device))
    backbone.to(rt.device)
    backbone.cast_frozen(rt.frozen_dtype("fp32"))
    template = template or record.get("template") or "a photo of a {}."
    return evaluate_loaded(backbone, rt, directory, template, dataset, root, split, batch_size, workers, classes,
                           limit, skip_bad_images)
