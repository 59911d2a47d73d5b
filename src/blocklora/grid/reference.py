"""Benchmark definitions and published reference numbers (docs/protocol.md), as data for sweeps and tables.

    BENCHMARK      the 11 dataset keys of CoOp's few-shot benchmark, in docs/protocol.md's order
    DG_TARGETS     ImageNet's four domain-shift test sets (domain generalization: train ImageNet, test these)
    REFERENCES     name -> {shots: {dataset key: top-1 %, "average": the published 11-dataset mean}}
"""

from __future__ import annotations

from ..errors import ConfigError

BENCHMARK = ("imagenet", "caltech101", "oxford_pets", "stanford_cars", "oxford_flowers", "food101", "fgvc_aircraft",
             "sun397", "dtd", "eurosat", "ucf101")
DG_TARGETS = ("imagenet_v2", "imagenet_sketch", "imagenet_a", "imagenet_r")

# CLIP-LoRA (Zanella & Ben Ayed, 2024), ViT-B/16, top-1 %, mean of 3 seeds, as tabulated in docs/protocol.md (from
# its paper, cross-checked against the curves its repository publishes; single cells are approximate).
# Columns of docs/protocol.md: ImageNet SUN Aircraft EuroSAT Cars Food Pets Flowers Caltech DTD UCF avg.
_CLIP_LORA_COLUMNS = ("imagenet", "sun397", "fgvc_aircraft", "eurosat", "stanford_cars", "food101", "oxford_pets",
                      "oxford_flowers", "caltech101", "dtd", "ucf101", "average")
_CLIP_LORA_ROWS = {
    1: (70.4, 70.4, 30.2, 72.3, 70.1, 84.3, 92.3, 83.2, 93.7, 54.0, 76.3, 72.5),
    2: (70.8, 71.3, 33.2, 82.7, 73.2, 83.2, 91.3, 89.8, 94.6, 59.5, 80.0, 75.4),
    4: (71.4, 72.8, 37.9, 84.9, 77.4, 82.7, 91.0, 93.7, 95.2, 63.8, 81.1, 77.4),
    8: (72.3, 74.7, 45.7, 89.7, 82.1, 83.1, 91.7, 96.3, 95.6, 67.5, 84.1, 80.3),
    16: (73.6, 76.1, 54.7, 92.1, 86.3, 84.2, 92.4, 98.0, 96.4, 72.0, 86.7, 83.0),
}

REFERENCES: dict[str, dict[int, dict[str, float]]] = {
    "clip-lora": {k: dict(zip(_CLIP_LORA_COLUMNS, row)) for k, row in _CLIP_LORA_ROWS.items()},
}
REFERENCE_TITLES = {"clip-lora": "CLIP-LoRA (ViT-B/16, docs/protocol.md)"}


def reference(name: str) -> dict[int, dict[str, float]]:
    """{shots: {dataset key or "average": top-1 %}} of a published method."""
    if name not in REFERENCES:
        raise ConfigError(f"unknown reference {name!r}: use one of {', '.join(REFERENCES)}")
    return REFERENCES[name]
