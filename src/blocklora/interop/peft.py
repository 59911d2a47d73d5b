"""PEFT's LoRA adapter format, both ways: a blocklora adapter written as a PEFT LoRA adapter, and a PEFT LoRA
adapter read as blocklora factors.

A Block-LoRA update is s * B @ [A, A, ..., A] (core.delta_weight): exactly a rank-r LoRA whose down-projection is A
tiled n times along the input. So every blocklora adapter on a Linear (or 1x1 convolution, or transformers' Conv1D
with PEFT's fan_in_fan_out) of any model, placed by a family or by name, is written losslessly as PEFT's LoRA
(Hu et al. 2021; PEFT's `LoraConfig`):

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
an A that is n equal blocks can be: anything else is refused by name). Each module's rank and alpha are PEFT's own:
rank_pattern / alpha_pattern keys are matched as PEFT matches them (pattern_key). Every field read from
adapter_config.json is checked (read_peft_config) and each module's update must be finite in float32; what fails
is one AdapterMismatchError naming the file, field and value. The weights are read as PEFT reads them:
adapter_model.safetensors, else an older adapter_model.bin through torch's weights_only loader (no code runs).
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import checks
from ..adapters.config import MAX_ALPHA, AdapterConfig
from ..adapters.core import fold_factor, scaling_factor
from ..adapters.fused import QKVAdapters
from ..adapters.inject import adapter_config, adapter_layers, plan
from ..adapters.layers import BlockLoRAConv1D, BlockLoRAConv1x1, BlockLoRALinear
from ..errors import AdapterMismatchError, BlockLoRAError, ConfigError
from ..ownership import atomic_folder, reported_write

# PEFT's own file names (peft.utils.constants CONFIG_NAME, SAFETENSORS_WEIGHTS_NAME)
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PICKLED_WEIGHTS_FILE = "adapter_model.bin"  # PEFT's WEIGHTS_NAME: what versions before safetensors wrote
PREFIX = "base_model.model."  # what PeftModel puts before the wrapped model's module names in the saved keys
KIND = "peft-export"  # the ownership marker's kind
RECORD = "blocklora"  # the safetensors metadata key of an export's record (model, pretrained, template, ...)
# PEFT LoRA options that change the computation in ways blocklora's factors cannot hold (peft.LoraConfig's fields;
# its LoRA variants, "is_lora_variant", but VeLoRA, which changes only the backward pass)
UNSUPPORTED = {"use_dora": "DoRA's magnitude vector", "lora_bias": "a bias on lora_B",
               "fan_in_fan_out": "transposed (Conv1D) weights", "modules_to_save": "fully trained modules",
               "trainable_token_indices": "trained token embeddings", "target_parameters": "parameter targets",
               "alora_invocation_tokens": "Activated LoRA: the update on some tokens only",
               "use_qalora": "QALoRA's pooled input", "monteclora_config": "MonteCLoRA's sampled factors",
               "layer_replication": "replicated layers", "use_bdlora": "BD-LoRA's block-diagonal factors",
               "arrow_config": "Arrow's routing among adapters",
               "kasa_config": "KaSA's truncated weights and singular values"}


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
    kinds = {isinstance(layer, BlockLoRAConv1D) for _, layer in adapter_layers(model)}
    if len(kinds) > 1:
        return ("its adapters sit on transformers' Conv1D and on other modules together, and PEFT's fan_in_fan_out "
                "(Conv1D's transposed weight) holds for every module of an adapter or none; export them separately")
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
        assert isinstance(layer, (BlockLoRALinear, BlockLoRAConv1x1, BlockLoRAConv1D))
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
        # Conv1D (GPT-2) targets: PEFT's factors have the Linear's shapes, fan_in_fan_out transposes the merge
        "target_modules": targets, "bias": "none", "init_lora_weights": True,
        "fan_in_fan_out": any(isinstance(layer, BlockLoRAConv1D) for _, layer in adapter_layers(model)),
        "modules_to_save": None, "rank_pattern": {}, "alpha_pattern": {}, "layers_to_transform": None,
        "use_dora": False,
    }
    return config, tensors


def write_peft_adapter(model: nn.Module, output: str | os.PathLike, base_model: str | None = None,
                       extra: Mapping[str, Any] | None = None, replace: bool | None = None,
                       card: str | None = None) -> list[str]:
    """Write `model`'s adapters as a PEFT LoRA adapter folder at `output` (which must not exist; replace=True: or
    be a PEFT export blocklora wrote; None: whether one existed when the write began); atomic.

    `base_model` is recorded as base_model_name_or_path (what PeftModel.from_pretrained's caller loads first);
    `extra` is kept as JSON under "blocklora" in the safetensors header (read_record); `card`: a model card,
    README.md (PEFT's save_pretrained writes one too). A transformers model gets PEFT's own "auto_mapping" (what
    PeftModel.save_pretrained writes for a model without a task type), so peft.AutoPeftModel.from_pretrained(output)
    builds its base model class and loads the adapter. Returns the files written."""
    from safetensors.torch import save_file

    config, tensors = peft_tensors(model)
    config["base_model_name_or_path"] = base_model
    if type(model).__module__.startswith("transformers."):
        config["auto_mapping"] = {"base_model_class": type(model).__name__, "parent_library": type(model).__module__}
    # blocklora's own record goes into the safetensors header: PEFT warns about unknown adapter_config.json keys
    metadata = {"format": "pt", **({RECORD: json.dumps(dict(extra), allow_nan=False)} if extra else {})}
    output = Path(output)
    with atomic_folder(output, KIND, replace) as tmp:
        with reported_write(output / WEIGHTS_FILE):  # a full disk, a file size limit: the OS error it is
            save_file(tensors, str(tmp / WEIGHTS_FILE), metadata=metadata)
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2, allow_nan=False) + "\n")
        if card is not None:
            (tmp / "README.md").write_text(card, encoding="utf-8")
    return sorted(str(p) for p in output.iterdir() if p.name != ".blocklora")


# -- reading ---------------------------------------------------------------------------------------------------------
# adapter_config.json fields for PEFT options blocklora cannot hold: absent, null, false or empty is "not used"
_OFF = (None, False, [], {})
# init_lora_weights values whose initialization rewrites the base weights to W - scaling * B0 @ A0 (the residual
# of the initial factors; peft.tuners.lora.layer.LoraLayer.update_layer: pissa_init, corda_init, olora_init,
# loftq_init, lora_ga_init). PEFT recomputes that residual whenever it loads such an adapter onto the base model, so
# its trained factors only hold with it; blocklora keeps the base weights as they are. By name prefix ("pissa"
# also covers "pissa_niter_N", "corda" CorDA's modes).
RESIDUAL_INITS = {"pissa": "PiSSA", "corda": "CorDA", "olora": "OLoRA", "loftq": "LoftQ", "lora_ga": "LoRA-GA"}
# those that leave the base weights alone (PEFT 0.21's LoraConfig.init_lora_weights; True / False besides)
PLAIN_INITS = ("gaussian", "eva", "orthogonal", "mica")


def _init_problem(value: Any) -> str | None:
    """Why an adapter_config.json's init_lora_weights keeps blocklora from reading its factors as PEFT does, or
    None (a plain LoRA initialization: the factors alone are the update)."""
    if value is None or isinstance(value, bool) or value in PLAIN_INITS:
        return None
    if not isinstance(value, str):
        return f"init_lora_weights must be true, false or an initialization's name, got {_short(value)}"
    method = next((m for p, m in RESIDUAL_INITS.items() if value.lower().startswith(p)), None)
    if method is None:
        return (f"init_lora_weights {value!r} is not an initialization blocklora knows (PEFT's: true, false, "
                f"{', '.join(PLAIN_INITS)}, {', '.join(RESIDUAL_INITS)})")
    return (f"init_lora_weights {value!r} ({method}) rewrites the base weights to W - scaling * B0 @ A0 when PEFT "
            "loads the adapter, so its factors only hold on that residual model and blocklora keeps the base "
            "weights; convert it to a plain LoRA with PEFT's save_pretrained(..., "
            "path_initial_model_for_weight_conversion=...) and pass that")


def _bad(path: Path, message: str) -> AdapterMismatchError:
    return AdapterMismatchError(f"{path}: {message} (the file is damaged or not PEFT's: save or export it again)")


def _number(path: Path, name: str, value: Any, allowed: checks.Range) -> int | float:
    try:
        return checks.number(name, value, allowed)
    except ConfigError as e:
        raise _bad(path, str(e)) from None


def _pattern(path: Path, config: Mapping[str, Any], name: str, allowed: checks.Range) -> dict[str, int | float]:
    """rank_pattern / alpha_pattern checked: a mapping (or null) from keys PEFT can match (pattern_key) to values
    in `allowed`, in the file's order (the first matching key wins, as in PEFT)."""
    pattern = config.get(name)
    if pattern is None:
        return {}
    if not isinstance(pattern, dict):
        raise _bad(path, f"{name} must be a mapping from module names or regular expressions to values, got "
                         f"{type(pattern).__name__} {_short(pattern)}")
    out: dict[str, int | float] = {}
    for key, value in pattern.items():
        try:
            re.compile(_PEFT_MATCH.format(key=key))
        except (re.error, RecursionError, OverflowError) as e:
            reason = getattr(e, "msg", None) or type(e).__name__  # (re.error's position is in PEFT's wrapper)
            raise _bad(path, f"{name} key {key!r} is not a regular expression PEFT can match ({reason})") from None
        out[key] = _number(path, f"{name}[{key!r}]", value, allowed)
    return out


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


# lora_alpha and alpha_pattern values: the bound blocklora's own adapters take (adapters/config.MAX_ALPHA)
ALPHAS = checks.Range(0, MAX_ALPHA, lo_open=True)


def read_peft_config(directory: str | os.PathLike) -> dict[str, Any]:
    """adapter_config.json of a PEFT LoRA adapter, every field blocklora reads checked (types and ranges): a LoRA
    (peft_type), none of the options blocklora's factors cannot hold (UNSUPPORTED, bias), no initialization that
    rewrites the base weights (RESIDUAL_INITS: PiSSA, OLoRA, ...), r a positive integer,
    lora_alpha a positive finite number, use_rslora a boolean, lora_dropout in [0, 1), base_model_name_or_path a
    string, rank_pattern / alpha_pattern mappings of matchable keys to positive ranks / alphas. Returns the config
    with those fields normalised (absent patterns {}, use_rslora False). Raises AdapterMismatchError naming the
    file, the field and its value."""
    path = Path(directory) / CONFIG_FILE
    if not path.is_file():
        raise AdapterMismatchError(f"no PEFT adapter at {directory}: {CONFIG_FILE} is missing")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as e:  # RecursionError: JSON nested too deep to parse
        reason = (str(e).splitlines() or [type(e).__name__])[0][:120]
        raise AdapterMismatchError(f"cannot read {path}: {reason}") from None
    if not isinstance(config, dict) or config.get("peft_type") != "LORA":
        got = config.get("peft_type") if isinstance(config, dict) else type(config).__name__
        raise AdapterMismatchError(f"{path} is not a PEFT LoRA adapter (peft_type {_short(got)}): blocklora reads "
                                   "LoRA only")
    for key, what in UNSUPPORTED.items():
        value = config.get(key)
        if not any(value is off or (type(value) is type(off) and value == off) for off in _OFF):
            raise AdapterMismatchError(f"{path} uses {key} ({what}: {_short(value)}), which blocklora's adapters "
                                       "cannot hold")
    problem = _init_problem(config.get("init_lora_weights"))
    if problem is not None:
        raise AdapterMismatchError(f"{path}: {problem}")
    bias = config.get("bias", "none")
    if bias is not None and bias != "none":
        raise AdapterMismatchError(f"{path} trains biases (bias={_short(bias)}), which blocklora's adapters "
                                   "cannot hold")
    r = _number(path, "r", config.get("r"), checks.Range(1, integer=True))
    alpha = _number(path, "lora_alpha", config.get("lora_alpha"), ALPHAS)
    rslora = config.get("use_rslora", False)
    if rslora is None:
        rslora = False
    if not isinstance(rslora, bool):
        raise _bad(path, f"use_rslora must be true or false, got {_short(rslora)}")
    dropout = config.get("lora_dropout")
    dropout = 0.0 if dropout is None else _number(path, "lora_dropout", dropout, checks.Range(0, 1, hi_open=True))
    base = config.get("base_model_name_or_path")
    if base is not None and not isinstance(base, str):
        raise _bad(path, f"base_model_name_or_path must be a model name or path, got {_short(base)}")
    return {**config, "r": r, "lora_alpha": alpha, "use_rslora": rslora, "lora_dropout": float(dropout),
            "rank_pattern": _pattern(path, config, "rank_pattern", checks.Range(1, integer=True)),
            "alpha_pattern": _pattern(path, config, "alpha_pattern", ALPHAS)}


def read_record(directory: str | os.PathLike) -> dict[str, Any]:
    """The record blocklora's export keeps in the weights file's header ({} for a PEFT adapter made elsewhere, or
    a weights file read_peft_adapter will report as unreadable), its fields checked: model a model name,
    pretrained a string or null, template a prompt template. Raises AdapterMismatchError for a damaged record."""
    from safetensors import safe_open

    path = Path(directory) / WEIGHTS_FILE
    try:
        with safe_open(str(path), "pt") as f:
            text = (f.metadata() or {}).get(RECORD)
    except Exception:  # noqa: BLE001 - unreadable here is reported by read_peft_adapter, which reads the tensors
        return {}
    if text is None:
        return {}
    try:
        record = json.loads(text)
    except (ValueError, RecursionError):
        record = None
    if not isinstance(record, dict):
        raise _bad(path, f"the {RECORD!r} record in its header is not a JSON object")
    model, pretrained, template = record.get("model"), record.get("pretrained"), record.get("template")
    if model is not None and (not isinstance(model, str) or not model):
        raise _bad(path, f"the {RECORD!r} record names model {_short(model)}, not a model name")
    if pretrained is not None and not isinstance(pretrained, str):
        raise _bad(path, f"the {RECORD!r} record names pretrained {_short(pretrained)}, not a path or tag")
    if template is not None:
        try:
            checks.template("its template", template)
        except ConfigError as e:
            raise _bad(path, f"the {RECORD!r} record's {e}") from None
    return record


# PEFT's rule for rank_pattern / alpha_pattern keys (peft.utils.other.get_pattern_key, as in peft 0.21, the version
# tested against): a key is a module name, a dotted suffix of one or a regular expression matched against the
# module's full name
_PEFT_MATCH = r"(.*\.)?({key})$"


def pattern_key(keys: Iterable[str], module: str) -> str | None:
    """The rank_pattern / alpha_pattern key PEFT applies to `module` (its full name in the wrapped model): the first
    key, in the file's order, for which re.match(rf"(.*\\.)?({key})$", module) holds; None when none does (PEFT then
    looks the module's own name up, which only an exact key equal to it can be). peft.utils.other.get_pattern_key."""
    for key in keys:
        if re.match(_PEFT_MATCH.format(key=key), module):
            return key
    return None


def module_value(pattern: Mapping[str, Any], module: str, default: Any) -> Any:
    """PEFT's per-module rank or alpha: pattern[pattern_key(...)], else the module's own name, else `default` (r or
    lora_alpha). peft.tuners.lora.model.LoraModel._create_and_replace."""
    key = pattern_key(pattern, module)
    return pattern.get(module if key is None else key, default)


def read_peft_adapter(directory: str | os.PathLike, model: nn.Module, cfg: AdapterConfig | None = None
                      ) -> tuple[AdapterConfig, dict[str, torch.Tensor]]:
    """A PEFT LoRA adapter as (blocklora AdapterConfig, tensors keyed by blocklora's names) for `model`.

    With `cfg` (a run's adapter config: --init-adapter), the PEFT adapter must adapt exactly the modules cfg places
    and have its rank; without it, the config is read off the file (method lora, the towers / layers / projections
    its modules cover, its r, alpha and scaling). B is rescaled by PEFT's scaling over blocklora's, so the update
    is the same. Raises AdapterMismatchError naming the first module, key or shape that does not fit."""
    directory = Path(directory)
    config = read_peft_config(directory)
    weights, raw = _read_weights(directory)
    factors: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in raw.items():
        name = key[len(PREFIX):] if key.startswith(PREFIX) else key
        module, _, leaf = name.rpartition(".lora_")
        if leaf not in ("A.weight", "B.weight") or not module:
            raise AdapterMismatchError(f"{weights}: {key} is not a LoRA factor (lora_A.weight / "
                                       "lora_B.weight): blocklora reads plain LoRA adapters only")
        if not value.is_floating_point():  # int factors would be cast to weights silently
            raise AdapterMismatchError(f"{weights}: {key} holds {str(value.dtype).removeprefix('torch.')} values, "
                                       "where a LoRA factor is floating point: the file is damaged")
        if not bool(torch.isfinite(value).all()):
            raise AdapterMismatchError(f"adapter {directory}: {key} holds NaN or infinite values")
        factors.setdefault(module, {})[leaf[0]] = value
    half = next((m for m, f in factors.items() if len(f) != 2), None)
    if half is not None:
        raise AdapterMismatchError(f"adapter {directory}: {half} has only lora_{next(iter(factors[half]))}; "
                                   "the file is damaged")
    _check_targets(directory / CONFIG_FILE, config, factors)
    # each module's rank and alpha as PEFT gives them (rank_pattern / alpha_pattern keys matched as PEFT does)
    ranks = {m: module_value(config["rank_pattern"], m, config["r"]) for m in factors}
    alphas = {m: module_value(config["alpha_pattern"], m, config["lora_alpha"]) for m in factors}
    if cfg is None:
        cfg = _config_for(model, factors, config, directory, ranks, alphas)
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
        r, alpha = ranks[path], alphas[path]
        if r != cfg.r:
            raise AdapterMismatchError(f"adapter {directory} does not fit: {path} has rank {r} "
                                       f"({_source(config, 'rank_pattern', 'r', path)}), the run's adapters "
                                       f"{cfg.r}; blocklora's adapters have one rank for every module")
        if a.shape != (r, d_in) or b.shape != (d_out, r):
            raise AdapterMismatchError(f"adapter {directory} does not fit this model: {path} has lora_A "
                                       f"{tuple(a.shape)} and lora_B {tuple(b.shape)}, the model needs "
                                       f"({cfg.r}, {d_in}) and ({d_out}, {cfg.r})")
        # PEFT's scaling (peft.tuners.lora.layer.LoraLayer.update_layer); its update s * B @ A and blocklora's
        # rescaled B must be finite in float32, the precision the adapters compute in (lora_alpha 1e308 is not)
        s_peft = alpha / math.sqrt(r) if config["use_rslora"] else alpha / r
        b_ours = b if s_peft == s_blocklora else b * (s_peft / s_blocklora)
        scaled = b.double() * s_peft
        if not all(bool(torch.isfinite(t.float()).all()) for t in (b_ours, scaled, scaled @ a.double())):
            raise AdapterMismatchError(f"adapter {directory}: the update of {path} overflows float32 with scaling "
                                       f"{s_peft:g} ({_source(config, 'alpha_pattern', 'lora_alpha', path)}): "
                                       "the alpha is out of range; the file is damaged or not a trained adapter")
        if cfg.n_blocks > 1:
            blocks = a.unflatten(1, (cfg.n_blocks, d_in // cfg.n_blocks))
            if not torch.equal(blocks, blocks[:, :1].expand_as(blocks)):
                raise AdapterMismatchError(f"adapter {directory} cannot start a Block-LoRA run with n_blocks="
                                           f"{cfg.n_blocks}: the lora_A of {path} is not {cfg.n_blocks} equal blocks "
                                           "(a plain LoRA); use --method lora")
            a = blocks[:, 0]
        tensors[f"{path}.lora_A"] = a.contiguous()
        tensors[f"{path}.lora_B"] = b_ours.contiguous()
    return cfg, tensors


# PEFT's shorthand for every Linear layer but the output layer (peft.utils.constants.INCLUDE_LINEAR_LAYERS_SHORTHAND)
ALL_LINEAR = "all-linear"


def _names(path: Path, config: Mapping[str, Any], name: str, allow: type | tuple[type, ...] = str) -> Any:
    """A target field as PEFT's LoraConfig holds it: null, one value (a regular expression / an index), or a list of
    them (a set for the module names, as LoraConfig.__post_init__ makes it). Raises AdapterMismatchError otherwise."""
    value = config.get(name)
    ok = lambda v: isinstance(v, allow) and not isinstance(v, bool)  # noqa: E731
    if value is None or ok(value):
        return value
    if isinstance(value, list) and all(ok(v) for v in value):
        return set(value) if allow is str else list(value)
    what = "module names or a regular expression" if allow is str else "layer indices"
    raise _bad(path, f"{name} must be {what}, got {_short(value)}")


def _check_targets(path: Path, config: Mapping[str, Any], factors: Mapping[str, Any]) -> None:
    """Every module the weights hold factors for must be one PEFT itself gives a LoRA layer, by its own rule
    (peft.tuners.tuners_utils.check_target_module_exists on target_modules, exclude_modules, layers_to_transform and
    layers_pattern): PEFT ignores the factors of any other module (an unexpected key), so loading them anyway would
    compute another model than PEFT's. target_modules null (PEFT's per-architecture default) and "all-linear" (every
    Linear: q/k/v/o are) are not narrowed. Raises AdapterMismatchError naming the first such module and the fields."""
    from types import SimpleNamespace

    from peft.tuners.tuners_utils import check_target_module_exists

    targets = _names(path, config, "target_modules")
    if targets is None or targets == ALL_LINEAR:
        return
    if isinstance(targets, str):
        try:
            re.compile(targets)
        except (re.error, RecursionError, OverflowError) as e:
            raise _bad(path, f"target_modules {targets!r} is not a regular expression "
                             f"({getattr(e, 'msg', None) or type(e).__name__})") from None
    peft_config = SimpleNamespace(target_modules=targets, exclude_modules=_names(path, config, "exclude_modules"),
                                  layers_to_transform=_names(path, config, "layers_to_transform", int),
                                  layers_pattern=_names(path, config, "layers_pattern"), modules_to_save=None,
                                  target_parameters=None)
    ignored = sorted(m for m in factors if not check_target_module_exists(peft_config, m))
    if ignored:
        fields = ", ".join(f"{k} {_short(config.get(k))}" for k in ("target_modules", "exclude_modules",
                                                                      "layers_to_transform", "layers_pattern")
                           if config.get(k) is not None)
        raise AdapterMismatchError(f"{path} does not target {ignored[0]} ({len(ignored)} of the {len(factors)} "
                                   f"modules in its weights: {fields}), so PEFT would ignore their factors; the file "
                                   "is damaged or was edited: save or export the adapter again")


def _read_weights(directory: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    """(file, tensors) of a PEFT adapter folder, by PEFT's rule (peft.utils.save_and_load.load_peft_weights):
    adapter_model.safetensors, else adapter_model.bin (older PEFT's default, torch.save), read with torch's
    weights_only unpickler as PEFT reads it (tensors and plain containers only: no code runs). Raises
    AdapterMismatchError naming the file for a missing, damaged or non-tensor file."""
    path = directory / WEIGHTS_FILE
    if not path.is_file() and (directory / PICKLED_WEIGHTS_FILE).is_file():
        path = directory / PICKLED_WEIGHTS_FILE
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            raw = load_file(str(path))
        else:
            raw = torch.load(path, map_location="cpu", weights_only=True)
            if not isinstance(raw, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                    for k, v in raw.items()):
                raise ValueError("not a state dict of tensors")
    except Exception as e:  # noqa: BLE001 - a damaged or missing file
        reason = str(e).splitlines()[0][:160] if str(e) else type(e).__name__
        raise AdapterMismatchError(f"cannot read {path}: {reason} (blocklora reads PEFT's {WEIGHTS_FILE}, or an "
                                   f"older {PICKLED_WEIGHTS_FILE} with torch's weights_only loader, as PEFT does)"
                                   ) from None
    return path, raw


def _source(config: Mapping[str, Any], pattern: str, default: str, module: str) -> str:
    """Where a module's rank or alpha comes from, for messages: 'alpha_pattern['(q|v)_proj'] 16' or 'r 8'."""
    key = pattern_key(config[pattern], module)
    if key is None and module in config[pattern]:
        key = module
    return f"{pattern}[{key!r}] {config[pattern][key]:g}" if key is not None else f"{default} {config[default]:g}"


def _config_for(model: nn.Module, factors: Mapping[str, Any], config: Mapping[str, Any], where: Path,
                ranks: Mapping[str, int], alphas: Mapping[str, float]) -> AdapterConfig:
    """The blocklora LoRA config whose placement is the modules the PEFT file adapts (every tower, layer and
    projection the model has, narrowed to those named), with their rank (one for all: rank_pattern may only move
    every module to the same one) and their alpha where all share one, else lora_alpha (B is rescaled per module)."""
    (m1, r1), *rest = ranks.items()
    other = next(((m, r) for m, r in rest if r != r1), None)
    if other is not None:
        raise AdapterMismatchError(f"adapter {where} has modules of different ranks ({m1}: {r1}, {other[0]}: "
                                   f"{other[1]}, from rank_pattern): blocklora's adapters have one rank for every "
                                   "module")
    widest = AdapterConfig(method="lora", projections=("q", "k", "v", "o"))
    from ..adapters.targeting import find_targeting

    towers = tuple(t for t, sites in find_targeting(model).sites.items() if sites)
    try:
        every = plan(model, AdapterConfig(method="lora", projections=widest.projections, towers=towers))
    except BlockLoRAError as e:
        raise AdapterMismatchError(f"adapter {where} does not fit this model: {e}") from None
    hit = [t for t in every if t.path in factors]
    if not hit:
        raise AdapterMismatchError(f"adapter {where} does not fit this model: none of its modules (e.g. "
                                   f"{next(iter(factors), '?')}) is an attention projection of this model")
    shared = set(alphas.values())
    try:
        return AdapterConfig(
            method="lora", r=next(iter(ranks.values())),
            alpha=float(shared.pop() if len(shared) == 1 else config["lora_alpha"]), dropout=config["lora_dropout"],
            scaling="rslora" if config["use_rslora"] else "standard",
            towers=tuple(dict.fromkeys(t.tower for t in hit)), layers=tuple(sorted({t.layer for t in hit})),
            projections=tuple(p for p in "qkvo" if any(p in t.projections for t in hit)))
    except ConfigError as e:  # a rank or alpha beyond what blocklora's adapters take
        raise AdapterMismatchError(f"adapter {where} cannot be held by blocklora's adapters: {e}") from None


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
    from ..pipeline.cards import model_card, peft_snippet

    backbone, _, _ = load_trained(adapter_dir, pretrained, force, device="cpu", compute=False, tokenizer=tokenizer,
                                  text=False)
    model = run["model"]
    base = model[3:] if model.startswith("hf:") else model
    if model.startswith("hf:") and Path(base).expanduser().exists():  # a folder: absolute, loadable from anywhere
        base = str(Path(base).expanduser().absolute())
    snippet = peft_snippet(output, type(backbone.model).__module__.startswith("transformers."))
    return write_peft_adapter(backbone.model, output, base, extra={
        "exported_from": str(adapter_dir), "model": model, "pretrained": weights, "method": meta["config"]["method"],
        "n_blocks": meta["config"]["n_blocks"], "template": run.get("template")}, replace=existed,
        card=model_card(adapter_dir, meta, "a PEFT LoRA adapter (adapter_config.json, adapter_model.safetensors)",
                        snippet))


def evaluate_peft_adapter(directory: str | os.PathLike, dataset: str, root: str, model: str | None = None,
                          pretrained: str | None = None, split: str = "test", batch_size: int = 128,
                          workers: int = -1, classes: str = "all", template: str | None = None, device: str = "auto",
                          limit: int | None = None, skip_bad_images: bool = False,
                          tokenizer: str | None = None, test_fraction: float | None = None,
                          output: str | os.PathLike | None = None) -> dict[str, Any]:
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
                           limit, skip_bad_images, test_fraction, output)
