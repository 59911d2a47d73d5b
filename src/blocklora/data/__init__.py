"""The data layer: dataset readers, few-shot sampling and split files, class protocols, image loading."""

from .benchmarks import ImageNetVariantSplits, imagenet_indices
from .datasets import DATASETS, load_dataset
from .fewshot import (
    SAMPLERS,
    FewShotSplit,
    file_sha256,
    group_by_label,
    read_split_file,
    read_split_header,
    repeated_shots,
    sample_few_shot,
    write_split_file,
)
from .images import ImageDataset, verify_images
from .layout import IMAGE_EXTENSIONS, TEMPLATES, prompt_name
from .protocols import class_subset, evenly_spaced, limit_split, subsample_classes, subsample_fewshot
from .types import DatasetSplits, Item, open_benchmark_image, open_image_file

__all__ = [
    "DATASETS",
    "IMAGE_EXTENSIONS",
    "SAMPLERS",
    "TEMPLATES",
    "DatasetSplits",
    "FewShotSplit",
    "ImageDataset",
    "ImageNetVariantSplits",
    "Item",
    "class_subset",
    "file_sha256",
    "group_by_label",
    "imagenet_indices",
    "load_dataset",
    "open_benchmark_image",
    "open_image_file",
    "prompt_name",
    "read_split_file",
    "read_split_header",
    "repeated_shots",
    "sample_few_shot",
    "subsample_classes",
    "evenly_spaced",
    "limit_split",
    "subsample_fewshot",
    "verify_images",
    "write_split_file",
]
