"""Named recipes and the method-dependent recipe defaults: tables of config values, applied by run_config.py.

RECIPES (`--recipe NAME`) are overrides applied before the user's own; METHOD_DEFAULTS fill the keys a request leaves
unset ("auto" / None) by method (RunConfig.resolved). docs/recipe.md lists every constant and where it comes from.
"""

from __future__ import annotations

from typing import Any

from ..errors import ConfigError

# Named recipes (--recipe NAME): a table of overrides applied before the user's own, so any option still changes one
# value. "reference": CLIP-LoRA's GPU recipe, the dataclass defaults (500 x K steps of batch 32, lr 2e-4;
# docs/recipe.md).
# "quick": the demo's CPU budget, a fixed 200 steps of batch 8 at lr 4e-3 with milder crops (aug_scale_min 0.5);
# measured on the offline model in benchmarks/accuracy.py (BENCHMARKS.md, "Accuracy"). pipeline/demo.py takes its
# recipe from here.
RECIPES: dict[str, dict[str, Any]] = {
    "reference": {},
    "quick": {"train.iters": 200, "train.batch_size": 8, "train.lr": 4e-3, "train.aug_scale_min": 0.5},
}


# The recipe of a run that names none (`blocklora train` without --recipe). A resumed run takes none: the request it
# recorded already holds the values of the recipe it was started with.
DEFAULT_RECIPE = "reference"


def recipe_overrides(name: str) -> list[str]:
    """The key=value overrides of a named recipe (RECIPES). Raises ConfigError for an unknown name."""
    if name not in RECIPES:
        raise ConfigError(f"unknown recipe {name!r}: use one of {', '.join(RECIPES)}")
    return [f"{k}={v}" for k, v in RECIPES[name].items()]


# Recipe constants whose default depends on the method. LoRA: CLIP-LoRA's values (MaxZanella/CLIP-LoRA: drop_last=False
# in datasets/utils.py, an nn.Dropout per LinearLoRA in loralib/layers.py, clip.load's fp16 weights on GPU). Block-LoRA
# has no reference code: drop_last and the shared mask are measured (docs/recipe.md: +6.1 points at K=1, equal or
# better at K=4 / 16 over 6 seeds); frozen_dtype fp32 stays provisional until measured on a GPU.
METHOD_DEFAULTS: dict[str, dict[str, Any]] = {
    "lora": {"train.drop_last": False, "train.frozen_dtype": "autocast", "adapter.dropout_mask": "per_projection"},
    "block_lora": {"train.drop_last": True, "train.frozen_dtype": "fp32", "adapter.dropout_mask": "shared"},
    # The baselines of methods/ train on frozen fp32 features (their own recipes: methods/*.py, docs/recipe.md).
    # drop_last as their loaders: CoOp's Dassl drops the last partial batch when there are at least batch_size
    # images (build_data_loader: drop_last=is_train and len(data_source) >= batch_size); Tip-Adapter-F's loader
    # keeps it; the probe and the cache see every shot at once.
    "probe": {"train.drop_last": False, "train.frozen_dtype": "fp32", "adapter.dropout_mask": "per_projection"},
    "tip_adapter": {"train.drop_last": False, "train.frozen_dtype": "fp32", "adapter.dropout_mask": "per_projection"},
    "tip_adapter_f": {"train.drop_last": False, "train.frozen_dtype": "fp32",
                      "adapter.dropout_mask": "per_projection"},
    "coop": {"train.drop_last": True, "train.frozen_dtype": "fp32", "adapter.dropout_mask": "per_projection"},
}
