"""blocklora: Block-LoRA and LoRA fine-tuning of CLIP-style models for few-shot image classification.

The public names below are loaded on first use (PEP 562), together with blocklora.backbones, which registers where
adapters go in each supported model family. So `blocklora.inject(model)` works on open_clip, transformers and
effnet-minilm models and `blocklora.inject(model, AdapterConfig(target_modules=...))` on any model, while
`import blocklora.adapters...` alone loads the method library and no model family.
`import blocklora` and the command line start without loading torch, so Ctrl-C during start-up reaches the
CLI's handler instead of interrupting an import.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
from types import ModuleType
from typing import Any

from ._version import __version__ as __version__

_EXPORTS = {
    "AdapterConfig": ".adapters.config",
    "adapter_config": ".adapters.inject", "adapter_layers": ".adapters.inject",
    "adapter_state_dict": ".adapters.inject", "adapters_disabled": ".adapters.inject",
    "count_trainable": ".adapters.inject", "inject": ".adapters.inject", "merge": ".adapters.inject",
    "merged_state_dict": ".adapters.inject", "plan": ".adapters.inject", "unmerge": ".adapters.inject",
    "read_adapter_meta": ".adapters.io",
    "BlockLoRALinear": ".adapters.layers", "BlockLoRAConv1x1": ".adapters.layers",
    "BlockLoRAConv1D": ".adapters.layers",
    "BlockLoRAFusedQKV": ".adapters.fused", "BlockLoRAMultiheadAttention": ".adapters.fused",
    "Targeting": ".adapters.targeting", "Site": ".adapters.targeting", "register_targeting": ".adapters.targeting",
    "Placement": ".adapters.targeting", "register_finder": ".adapters.targeting",  # the former names
    "fingerprint": ".backbones.fingerprint", "load_adapter": ".backbones.fingerprint",
    "save_adapter": ".backbones.fingerprint",
    "AdapterMismatchError": ".errors", "BlockLoRAError": ".errors", "ConfigError": ".errors", "DataError": ".errors",
    # the whole job from Python (README, "Python API"): train a run, load it, classify images
    "train": ".pipeline.notebook", "load_trained": ".pipeline.notebook", "Classifier": ".pipeline.notebook",
}
__all__ = sorted(_EXPORTS)

# Module paths of earlier versions (before the application moved into folders), kept importable for users' scripts:
# `import blocklora.api` gives the very module object of blocklora.pipeline.run, so patching an attribute on one is
# patching the other.
_MOVED = {
    "api": "pipeline.run", "cli": "cli", "config": "config", "config_io": "config.files", "demo": "pipeline.demo",
    "evaluation": "pipeline.evaluation", "export_forms": "interop.export_forms", "flags": "cli.flags",
    "peft_format": "interop.peft", "prepare": "pipeline.prepare", "recipes": "config.recipes",
    "reference": "grid.reference", "signals": "cli.signals", "slurm": "grid.slurm", "summarize": "grid.summarize",
    "summary_tables": "grid.tables", "sweep": "grid.sweep", "sweep_runner": "grid.runner",
    "trained": "pipeline.trained",
}


class _MovedModules(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds `blocklora.<old name>` of _MOVED and hands out the module now at its new path (one object, two names)."""

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> Any:
        old = fullname.partition(f"{__name__}.")[2]
        if old in _MOVED and _MOVED[old] != old:
            return importlib.util.spec_from_loader(fullname, self)
        return None

    def create_module(self, spec: Any) -> Any:
        return importlib.import_module(f".{_MOVED[spec.name.rpartition('.')[2]]}", __name__)

    def exec_module(self, module: Any) -> None:
        pass  # the module ran under its new name already


if not any(isinstance(f, _MovedModules) for f in sys.meta_path):
    sys.meta_path.insert(0, _MovedModules())


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'blocklora' has no attribute {name!r}")
    importlib.import_module(".backbones", __name__)  # fills the placement registry of the model families
    value = getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    """The public names: the exports above, the version and the subpackages loaded so far (not this module's own
    imports and helpers)."""
    # a module under its own name only: a former name of _MOVED (blocklora.signals is blocklora.cli.signals) is not
    # a second public name
    subpackages = [n for n, v in globals().items()
                   if isinstance(v, ModuleType) and v.__name__ == f"{__name__}.{n}" and n[0] != "_"]
    return sorted({*_EXPORTS, "__version__", *subpackages})
