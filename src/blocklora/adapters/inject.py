"""Model-level operations: plan and inject adapters, list them, merge / unmerge, enable / disable, count."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from ..backbones.sites import find_sites
from ..errors import ConfigError
from .config import AdapterConfig, resolve_blocks
from .layers import (
    AdapterLayer,
    BlockLoRAConv1x1,
    BlockLoRALinear,
    BlockLoRAMultiheadAttention,
    SharedFold,
    check_width,
    conv1x1_problem,
    fused_attention_problem,
)

CONFIG_ATTR = "_blocklora_adapter_config"
QKV = ("q", "k", "v")


@dataclass(frozen=True)
class Target:
    """One module that inject() will replace: a fused attention (letters q/k/v/o), one Linear (one letter, or the
    letters that select it in a "layers" site) or one 1x1 convolution ("layers" sites only)."""

    path: str
    kind: str  # "fused" | "linear" | "conv1x1"
    letters: tuple[str, ...]
    tower: str
    block: int


def _fail(msg: str) -> None:
    raise ConfigError(msg)


def plan(model: nn.Module, cfg: AdapterConfig) -> list[Target]:
    """Every module inject(model, cfg) would adapt, after checking that all of them fit. Changes nothing."""
    if any(isinstance(m, AdapterLayer) for m in model.modules()):
        _fail("this model already carries blocklora adapters: load a fresh model, or use load_adapter on it")
    sites = find_sites(model)
    targets: list[Target] = []
    for tower in cfg.towers:
        if tower not in sites:
            _fail(f"this model has no {tower} tower with attention blocks (it has: {', '.join(sites) or 'none'}); "
                  f"choose towers from {', '.join(sites)}")
        tower_sites = sites[tower]
        blocks = resolve_blocks(cfg.blocks, len(tower_sites))
        if all(tower_sites[i].kind == "layers" for i in blocks):
            found = [t for i in blocks for t in _layer_targets(model, tower_sites[i], cfg)]
            if not found:
                _fail(f"no layer of the {tower} tower's blocks {_span(blocks)} answers to projections "
                      f"{','.join(cfg.projections)}: see its backbone module for what the letters select there")
            targets.extend(found)
            continue
        for i in blocks:
            site = tower_sites[i]
            module = model.get_submodule(site.path)
            if site.kind == "fused":
                problem = fused_attention_problem(module)
                if problem:
                    _fail(f"cannot adapt {site.path}: {problem}")
                check_width(module.in_proj_weight.shape[1], cfg.n_blocks, f"the width of {site.path}")
                targets.append(Target(site.path, "fused", cfg.projections, tower, i))
                continue
            children = dict(site.linears)
            for letter in cfg.projections:
                if letter not in children:
                    _fail(f"projection {letter!r} does not exist in {site.path} (it has {', '.join(children)})")
                path = f"{site.path}.{children[letter]}"
                linear = model.get_submodule(path)
                if not isinstance(linear, nn.Linear):
                    _fail(f"{path} is a {type(linear).__name__}, not an nn.Linear: cannot wrap it")
                check_width(linear.in_features, cfg.n_blocks, f"in_features of {path}")
                targets.append(Target(path, "linear", (letter,), tower, i))
    if not targets:
        _fail("the adapter selection is empty: choose at least one tower, block and projection")
    return targets


def _span(blocks: list[int]) -> str:
    return f"{blocks[0]}-{blocks[-1]}" if len(blocks) > 1 else str(blocks[0])


def _layer_targets(model: nn.Module, site, cfg: AdapterConfig) -> list[Target]:
    """A "layers" site (a block without attention): each child with a selected letter, once; absent letters skip."""
    letters: dict[str, list[str]] = {}
    for letter, child in site.linears:
        if letter in cfg.projections:
            letters.setdefault(child, []).append(letter)
    out = []
    for child, selected in letters.items():
        path = f"{site.path}.{child}"
        module = model.get_submodule(path)
        if isinstance(module, nn.Linear):
            kind, width = "linear", module.in_features
        else:
            problem = conv1x1_problem(module)
            if problem:
                _fail(f"cannot adapt {path}: {problem}")
            kind, width = "conv1x1", module.in_channels
        check_width(width, cfg.n_blocks, f"the input width of {path}")
        out.append(Target(path, kind, tuple(selected), site.tower, site.block))
    return out


def _set_submodule(model: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, name, module)


def inject(model: nn.Module, cfg: AdapterConfig | None = None) -> list[str]:
    """Adapt `model` in place: freeze everything, add the configured adapters. Returns the adapted module names.

    Everything is validated first (plan); on any error the model is left untouched.
    """
    cfg = cfg or AdapterConfig()
    targets = plan(model, cfg)
    for p in model.parameters():
        p.requires_grad_(False)
    folds: dict[tuple[str, int], SharedFold] = {}
    for t in targets:
        old = model.get_submodule(t.path)
        if t.kind == "fused":
            new: nn.Module = BlockLoRAMultiheadAttention(old, t.letters, cfg)
        elif t.kind == "conv1x1":
            new = BlockLoRAConv1x1(old, cfg)
        else:
            new = BlockLoRALinear(old, cfg.r, cfg.n_blocks, cfg.alpha, cfg.dropout, cfg.scaling, cfg.fold, cfg.a_init)
            if set(t.letters) <= set(QKV):  # self-attention's q, k, v read one tensor: fold it once
                new.shared_fold = folds.setdefault((t.tower, t.block), SharedFold())
        new.shared_mask = cfg.shared_dropout_mask
        new.train(old.training)
        _set_submodule(model, t.path, new)
    setattr(model, CONFIG_ATTR, cfg)
    return [t.path for t in targets]


def adapter_config(model: nn.Module) -> AdapterConfig | None:
    """The AdapterConfig `model` was injected with, or None."""
    return getattr(model, CONFIG_ATTR, None)


def adapter_layers(model: nn.Module) -> Iterator[tuple[str, AdapterLayer]]:
    for name, module in model.named_modules():
        if isinstance(module, AdapterLayer):
            yield name, module


def is_adapter_param(name: str) -> bool:
    return ".lora_A" in name or ".lora_B" in name or name.startswith(("lora_A", "lora_B"))


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Only the adapter tensors, keyed by their real names in the model."""
    return {k: v for k, v in model.state_dict().items() if is_adapter_param(k)}


def count_trainable(model: nn.Module) -> int:
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
    """Run the frozen model (e.g. zero-shot) without removing the adapters."""
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
    state = {k: v for k, v in model.state_dict().items() if not is_adapter_param(k)}
    for prefix, layer in adapter_layers(model):
        for name, tensor in layer.merged_tensors().items():
            state[f"{prefix}.{name}" if prefix else name] = tensor
    return state
