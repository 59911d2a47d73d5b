"""The few-shot baselines in blocklora's harness (probe, Tip-Adapter, Tip-Adapter-F, CoOp): registry.py says what
each trains and how it is saved, loaded and scored; one module per method."""

from .registry import METHODS, MethodRecord, is_baseline, record

__all__ = ["METHODS", "MethodRecord", "is_baseline", "record"]
