"""Formats other libraries read: PEFT LoRA adapters in and out (peft.py) and what `blocklora export` writes for each
model family (export_forms.py)."""
