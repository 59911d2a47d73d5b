"""The allowed values of every constrained string option, as Literal types: the one source read by the config's
checks (config.py, adapters/config.py), the method library's own checks and the CLI's choices (typing.get_args).

Nothing here imports torch: the command line builds its parser from these before any heavy import.
"""

from __future__ import annotations

from typing import Literal

# adapters (adapters/config.py, adapters/core.py)
# block_lora and lora adapt the encoders (adapters/); the others are the few-shot baselines of methods/ (a head on
# the frozen features or learned prompt context: methods/registry.py)
Method = Literal["block_lora", "lora", "probe", "tip_adapter", "tip_adapter_f", "coop"]
DropoutMask = Literal["auto", "per_projection", "shared"]  # q, k, v: one mask each (CLIP-LoRA) or one shared
Scaling = Literal["rslora", "standard"]  # alpha / sqrt(r) (rsLoRA, Kalajdzievski 2023) or alpha / r (LoRA)
Fold = Literal["sum", "mean"]
AInit = Literal["kaiming", "kaiming_full"]
# data (data/fewshot.py, data/protocols.py)
Sampler = Literal["clip-lora", "coop"]  # whose few-shot draw order is reproduced
ClassSubset = Literal["all", "base", "new"]  # base-to-new protocol (CoCoOp)
# training and evaluation (config/run_config.py, engine/logits.py)
Loss = Literal["softmax", "sigmoid"]
Precision = Literal["auto", "fp32", "fp16", "bf16"]
Schedule = Literal["cosine", "constant"]
FrozenDtype = Literal["auto", "fp32", "autocast"]
NanPolicy = Literal["stop", "skip"]
EvalSplit = Literal["test", "val"]
QuickGelu = Literal["auto", "yes", "no"]
Logger = Literal["none", "tensorboard"]  # train.log: extra progress records (engine/tensorboard.py)
