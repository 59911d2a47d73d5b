"""What a run is asked to do: RunConfig and its sections (run_config.py), the named recipes and the method-dependent
defaults (recipes.py), and config values read from files and key=value overrides (files.py)."""

from __future__ import annotations

from .run_config import (
    EVAL_SPLITS,
    LOGGERS,
    MAX_ITERS,
    MAX_SHOTS,
    RESUMABLE,
    DataConfig,
    EvalConfig,
    RunConfig,
    TrainConfig,
)

__all__ = ["EVAL_SPLITS", "LOGGERS", "MAX_ITERS", "MAX_SHOTS", "RESUMABLE", "DataConfig", "EvalConfig", "RunConfig",
           "TrainConfig"]
