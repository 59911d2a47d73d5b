"""Model-level operations: plan and inject adapters, list them, merge / unmerge, enable / disable, count.

Where adapters go (targeting.py): the modules AdapterConfig.target_modules / target_types name, on any model, or a
family's Targeting (registered by the model families, or passed in).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import nn

from ..errors import ConfigError
from .config import ADAPTER_METHODS, AdapterConfig, resolve_layers
from .fused import QKV, BlockLoRAFusedQKV, BlockLoRAMultiheadAttention
from .layers import AdapterLayer, BlockLoRAConv1D, BlockLoRAConv1x1, BlockLoRALinear, SharedFold
from .targeting import FUSED_MHA, LAYERS, Site, Target, Targeting, find_targeting, match

CONFIG_ATTR = "_blocklora_adapter_config"

# The one dispatch table: target kind -> layer class. Each class owns its checks and factor shapes (layers.py).
LAYER_CLASSES: dict[str, type[AdapterLayer]] = {
    "fused_mha": BlockLoRAMultiheadAttention,  # a whole nn.MultiheadAttention (site kind FUSED_MHA)
    "fused_qkv": BlockLoRAFusedQKV,  # a (3H, E) Linear whose row blocks are q, k, v (a LINEARS child under q,k,v)
    "linear": BlockLoRALinear,  # one nn.Linear
    "conv1x1": BlockLoRAConv1x1,  # one 1x1 nn.Conv2d (LAYERS sites, or matched by name)
    "conv1d": BlockLoRAConv1D,  # transformers' Conv1D (GPT-2), weight (d_in, d_out) (matched by name)
}


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside torch.compile's OptimizedModule (`_orig_mod`) and nn.DataParallel / DistributedDataParallel
    (`module`): adapters, their names and their files belong to it, so an adapter saved from a compiled or wrapped
    model loads into the plain one and back (the wrapper would otherwise prefix every name)."""
    while True:
        inner = model._modules.get("_orig_mod") if type(model).__name__ == "OptimizedModule" else \
            model._modules.get("module") if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)) \
            else None
        if not isinstance(inner, nn.Module):
            return model
        model = inner


def plan(model: nn.Module, cfg: AdapterConfig, placement: Targeting | None = None) -> list[Target]:
    """Every module inject(model, cfg) would adapt, after checking that all of them fit. Changes nothing.

    A cfg that names its modules (target_modules / target_types: targeting.match) places them on any model, and
    `placement` is not used; otherwise `placement` (a family's Targeting) defaults to the registered family's
    (targeting.find_targeting). Raises ConfigError naming the tower, module or value that does not fit.
    """
    model = unwrap(model)
    if cfg.method not in ADAPTER_METHODS:  # a baseline would otherwise get LoRA layers (n_blocks 1), silently
        raise ConfigError(f"method {cfg.method!r} injects no adapter: it trains a head or prompt context on the frozen "
                          f"model (blocklora train --method {cfg.method}); inject() takes "
                          f"{' or '.join(ADAPTER_METHODS)}")
    if any(isinstance(m, AdapterLayer) for m in model.modules()):
        raise ConfigError("this model already carries blocklora adapters: load a fresh model, or use load_adapter on "
                          "it")
    targets = match(model, cfg) if cfg.by_name else _family_targets(model, cfg, placement or find_targeting(model))
    for t in targets:
        module = model.get_submodule(t.path)
        problem = LAYER_CLASSES[t.kind].problem(module, t.projections, cfg.n_blocks)
        if problem:
            kind = f" ({type(module).__name__})" if cfg.by_name else ""  # a family's messages name their classes
            raise ConfigError(f"cannot adapt {t.path}: {problem}{kind}")
    _refuse_shared(model, targets)
    return targets


def _refuse_shared(model: nn.Module, targets: list[Target]) -> None:
    """Refuse a target whose weights the model also reaches under another name (a module registered twice, or a
    tied weight such as a language model's head tied to its input embedding).

    Only the name that is replaced would call the adapter, and merge() adds the update to the shared tensor in place,
    so the other name would see it only when merged (merged != unmerged) and merged_state_dict would give the shared
    tensor two different values: a silently wrong model either way. PEFT warns about tied targets; here it is refused.
    """
    owners: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(param), []).append(name)
    for t in targets:
        prefix = f"{t.path}."
        for name, param in model.get_submodule(t.path).named_parameters(prefix=t.path):
            other = next((o for o in owners[id(param)] if not o.startswith(prefix)), None)
            if other is not None:
                raise ConfigError(f"cannot adapt {t.path}: its {name[len(prefix):]} is also the model's {other} (a "
                                  "shared module or tied weight), which would then compute with the frozen weight "
                                  "and get the update only when merged: untie it (e.g. a copy) or leave it out of "
                                  "the targets")


def _family_targets(model: nn.Module, cfg: AdapterConfig, placement: Targeting) -> list[Target]:
    """The targets of a family's Targeting for cfg's towers, layers and projections."""
    targets: list[Target] = []
    for tower in cfg.towers:
        sites = placement.sites.get(tower, ())
        if not sites:
            have = [t for t, s in placement.sites.items() if s]
            raise ConfigError(f"the {tower} tower of this {placement.family} model ({placement.describe(tower)}) "
                              f"has no attention blocks blocklora can adapt: choose towers from "
                              f"{', '.join(have) or 'none'}" + ("" if have else "; or name the modules to adapt, "
                                                                "e.g. AdapterConfig(target_modules=['q_proj', "
                                                                "'v_proj']) (PEFT's rules)"))
        layers = resolve_layers(cfg.layers, len(sites))
        found = [t for i in layers for t in _site_targets(model, sites[i], cfg)]
        if not found:
            raise ConfigError(f"no module of the {tower} tower's layers {_span(layers)} answers to projections "
                              f"{','.join(cfg.projections)}: see its backbone module for what they select there")
        targets.extend(found)
    return targets


def _span(layers: list[int]) -> str:
    return f"{layers[0]}-{layers[-1]}" if len(layers) > 1 else str(layers[0])


def _site_targets(model: nn.Module, site: Site, cfg: AdapterConfig) -> list[Target]:
    """The targets of one site for the selected projections (see sites.Site for the kinds)."""
    if site.kind == FUSED_MHA:
        return [Target(site.path, "fused_mha", cfg.projections, site.tower, site.layer)]
    declared: dict[str, list[str]] = {}  # child -> every projection it stands under
    for projection, child in site.children:
        declared.setdefault(child, []).append(projection)
    if site.kind != LAYERS:  # a LINEARS site has every projection: a missing one is an error
        missing = [p for p in cfg.projections if p not in {p for p, _ in site.children}]
        if missing:
            raise ConfigError(f"projection {missing[0]!r} does not exist in {site.path} (it has "
                              f"{', '.join(p for p, _ in site.children)})")
    out = []
    for child, under in declared.items():
        selected = tuple(p for p in cfg.projections if p in under)
        if not selected:
            continue
        path = f"{site.path}.{child}" if site.path else child
        module = model.get_submodule(path)
        if site.kind == LAYERS:
            kind = "linear" if isinstance(module, nn.Linear) else "conv1x1"
        else:
            kind = "fused_qkv" if len(set(under) & set(QKV)) > 1 else "linear"
        out.append(Target(path, kind, selected, site.tower, site.layer))
    return out


def _set_submodule(model: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, name, module)


def inject(model: nn.Module, cfg: AdapterConfig | None = None, placement: Targeting | None = None,
           probe: Callable[[], object] | None = None) -> list[str]:
    """Adapt `model` in place: freeze everything, add the configured adapters. Returns the adapted module names.

    Everything is validated first (plan). With `probe` (a function running one small forward of the model, e.g.
    Backbone.probe), every adapter must then be called by that forward: a layer its model bypasses (code that
    reads the wrapped weight with F.linear or F.multi_head_attention_forward) would train nothing, so it is
    refused. On any error (ConfigError naming the module and its class) the model is left as it was. Without a
    probe, adapters placed by name are checked at their parent module's first forward instead (_FirstCallCheck: a
    ConfigError there names the parent that reads the weights without calling its child).
    """
    model = unwrap(model)
    cfg = cfg or AdapterConfig()
    targets = plan(model, cfg, placement)
    flags = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    folds: dict[tuple[str, int], SharedFold] = {}
    replaced: list[tuple[str, nn.Module]] = []
    for t in targets:
        old = model.get_submodule(t.path)
        new = LAYER_CLASSES[t.kind](old, cfg, t.projections)
        new.tower = t.tower
        # q, k, v read one tensor: fold it once (Linears matched by name have no projection: each folds its own)
        if t.kind == "linear" and t.projections and set(t.projections) <= set(QKV):
            new.shared_fold = folds.setdefault((t.tower, t.layer), SharedFold())
        new.train(old.training)
        _set_submodule(model, t.path, new)
        replaced.append((t.path, old))
    setattr(model, CONFIG_ATTR, cfg)
    if probe is None and cfg.by_name:
        _check_first_call(model, [t.path for t in targets], cfg)
    missed = _not_called(model, probe) if probe is not None else []
    if missed:  # undo everything, then say which module bypasses its adapter
        for path, old in reversed(replaced):
            _set_submodule(model, path, old)
        for p, flag in zip(model.parameters(), flags):
            p.requires_grad_(flag)
        delattr(model, CONFIG_ATTR)
        raise ConfigError(_bypassed(model, missed, next(t.tower for t in targets if t.path == missed[0]), cfg))
    return [t.path for t in targets]


class _FirstCallCheck:
    """Without a probe, the first forward of each adapted module's parent checks that the parent called its adapters.

    A parent that reads a child's weight without calling the child (timm's BEiT / EVA attention: F.linear(x,
    self.qkv.weight, qkv_bias); torchvision's Swin) would train nothing, and only merge() would change its output
    (merged != unmerged): that first forward raises ConfigError naming it instead. The hooks remove themselves after
    the parent's first forward. A plain picklable object, so torch.save(model) still works before that forward."""

    def __init__(self, parent: nn.Module, parent_path: str, children: dict[str, nn.Module], message: str) -> None:
        self.parent_path, self.message = parent_path, message
        self.pending = dict(children)  # child name -> adapter layer
        self.called: set[str] = set()
        self.handles = [parent.register_forward_pre_hook(self.start), parent.register_forward_hook(self.finish)]
        self.handles += [layer.register_forward_hook(_Mark(self, name)) for name, layer in children.items()]

    def start(self, *_: object) -> None:
        self.called = set()

    def finish(self, parent: nn.Module, *_: object) -> None:
        for handle in self.handles:
            handle.remove()
        missed = [name for name in self.pending if name not in self.called]
        if missed:
            child = f"{self.parent_path}.{missed[0]}" if self.parent_path else missed[0]
            raise ConfigError(f"the adapter on {child} is never called: {type(parent).__name__} "
                              f"({self.parent_path or 'the model'}) reads the weights of its {missed[0]} without "
                              f"calling it, so training would change nothing and only merge() would change the "
                              f"outputs ({self.message})")


class _Mark:
    def __init__(self, check: _FirstCallCheck, name: str) -> None:
        self.check, self.name = check, name

    def __call__(self, *_: object) -> None:
        self.check.called.add(self.name)


def _check_first_call(model: nn.Module, paths: list[str], cfg: AdapterConfig) -> None:
    """Arm _FirstCallCheck on the parent of every adapter placed by name (inject without a probe)."""
    by_parent: dict[str, dict[str, nn.Module]] = {}
    for path in paths:
        parent, _, child = path.rpartition(".")
        by_parent.setdefault(parent, {})[child] = model.get_submodule(path)
    fix = "leave it out of target_modules / target_types; inject(..., probe=lambda: model(x)) checks this at once"
    for parent, children in by_parent.items():
        _FirstCallCheck(model.get_submodule(parent) if parent else model, parent, children, fix)


def _bypassed(model: nn.Module, missed: list[str], tower: str, cfg: AdapterConfig) -> str:
    """The one-line refusal of adapters a model never calls, naming the class whose code reads the weights."""
    parent_path, _, child = missed[0].rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    others = [t for t in cfg.towers if t != tower]
    if cfg.by_name:
        fix = "leave it out of target_modules / target_types"
        return (f"the adapter on {missed[0]} is never called: {type(parent).__name__} ({parent_path or 'the model'}) "
                f"reads the weights of its {child} without calling it, so training would change nothing "
                f"({len(missed)} such module(s)); {fix}")
    fix = f"adapt the {others[0]} tower only (--towers {others[0]})" if others else \
        f"the {tower} tower of this model cannot be adapted yet"
    return (f"the adapter on {missed[0]} is never called: {type(parent).__name__} ({parent_path or 'the model'}) "
            f"reads the weights of its {child} without calling it, so training would change nothing ({len(missed)} "
            f"such module(s) in the {tower} tower); {fix}")


@torch.no_grad()
def _not_called(model: nn.Module, probe: Callable[[], object]) -> list[str]:
    """Names of the adapter layers that one run of `probe` does not call (forward hooks, eval mode)."""
    called: set[str] = set()
    hooks = [layer.register_forward_hook(lambda *_, name=name: called.add(name))
             for name, layer in adapter_layers(model)]
    was_training = model.training
    model.eval()
    try:
        probe()
    finally:
        for hook in hooks:
            hook.remove()
        model.train(was_training)
    return [name for name, _ in adapter_layers(model) if name not in called]


def adapter_config(model: nn.Module) -> AdapterConfig | None:
    """The AdapterConfig `model` was injected with, or None."""
    model = unwrap(model)
    return getattr(model, CONFIG_ATTR, None)


def adapter_layers(model: nn.Module) -> Iterator[tuple[str, AdapterLayer]]:
    """(qualified name, layer) of every adapter layer in `model`, in module order."""
    for name, module in model.named_modules():
        if isinstance(module, AdapterLayer):
            yield name, module


def is_adapter_param(name: str) -> bool:
    """Whether a state-dict / parameter name is an adapter factor (`lora_A`, `lora_B`: PEFT's load-bearing prefix)."""
    return ".lora_A" in name or ".lora_B" in name or name.startswith(("lora_A", "lora_B"))


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Only the adapter tensors, keyed by their real names in the model."""
    model = unwrap(model)
    return {k: v for k, v in model.state_dict().items() if is_adapter_param(k)}


def count_trainable(model: nn.Module) -> int:
    """Number of parameters with requires_grad (after inject: the adapter factors only)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def merge(model: nn.Module) -> None:
    """Fold every adapter's update into its frozen weights (exact; inference then costs nothing extra)."""
    for _, layer in adapter_layers(model):
        layer.merge()


def unmerge(model: nn.Module) -> None:
    """Undo merge(): the frozen weights come back (up to float rounding)."""
    for _, layer in adapter_layers(model):
        layer.unmerge()


def is_merged(model: nn.Module) -> bool:
    return any(layer.merged for _, layer in adapter_layers(model))


@contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[None]:
    """Run the frozen model (e.g. zero-shot) without removing the adapters. Raises ConfigError when merged."""
    layers = [layer for _, layer in adapter_layers(model)]
    if any(layer.merged for layer in layers):
        raise ConfigError("adapters are merged into the weights: unmerge before disabling them")
    previous = [layer.adapter_enabled for layer in layers]
    for layer in layers:
        layer.adapter_enabled = False
    try:
        yield
    finally:
        for layer, state in zip(layers, previous):
            layer.adapter_enabled = state


def merged_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """A stock state dict (no adapter keys) whose adapted weights include the update. `model` is not changed."""
    model = unwrap(model)
    state = {k: v for k, v in model.state_dict().items() if not is_adapter_param(k)}
    for prefix, layer in adapter_layers(model):
        for name, tensor in layer.merged_tensors().items():
            state[f"{prefix}.{name}" if prefix else name] = tensor
    return state


def expected_shapes(model: nn.Module, cfg: AdapterConfig, placement: Targeting | None = None
                    ) -> dict[str, tuple[int, ...]]:
    """The adapter tensor names and shapes inject(model, cfg) would create, computed without changing `model`."""
    model = unwrap(model)
    shapes: dict[str, tuple[int, ...]] = {}
    for t in plan(model, cfg, placement):
        cls = LAYER_CLASSES[t.kind]
        for name, shape in cls.factor_shapes(model.get_submodule(t.path), t.projections, cfg.r, cfg.n_blocks).items():
            shapes[f"{t.path}.{name}"] = shape
    return shapes
