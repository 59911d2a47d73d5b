"""A model's own image preprocessing: size, normalisation, resize mode and interpolation, and where they came from.

Each family reads them from the weights' pretrained configuration (open_clip's pretrained tags or a model folder's
preprocess_cfg, a transformers checkpoint's preprocessor_config.json); the values and their source go into
results.json, so a run says what the images it was fed looked like. SigLIP, PE and MobileCLIP differ from OpenAI CLIP
(mean = std = 0.5 or no normalisation, a squash resize, bilinear interpolation): feeding them CLIP's preprocessing
changes accuracy silently.

The evaluation transform is the weights' own library's, called, not re-implemented:
- `Preprocess` (open_clip's PreprocessCfg: size, mean, std, interpolation, resize_mode, fill_color):
  open_clip.transform.image_transform_v2(cfg, is_train=False);
- `ProcessorPreprocess` (transformers checkpoints): the checkpoint's own image processor
  (AutoImageProcessor.from_pretrained), whatever form its preprocessor_config.json takes (legacy integer sizes,
  shortest_edge, height / width, shortest + longest edge, resize then crop to another size, no resize, no crop, any
  resample, rescale factor, mean and std).
Training augmentation (CLIP-LoRA's random resized crop and flip) cannot equal either; it ends in the same pixel-to-
tensor step (the same normalisation, for a processor its own rescale and normalise).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Any

import torch
from PIL import Image
from torchvision import transforms as T

from ..errors import BackboneError

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)  # CLIP's training-set statistics (open_clip.constants)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
# open_clip's interpolations (open_clip.transform.image_transform): "random" is bicubic outside timm's augmentation,
# as open_clip's own eval transform and non-timm train transform use it.
INTERPOLATIONS = {"bicubic": T.InterpolationMode.BICUBIC, "bilinear": T.InterpolationMode.BILINEAR,
                  "random": T.InterpolationMode.BICUBIC}
# shortest: resize the short side to `size`, then center-crop (CLIP); squash: resize to size x size, aspect ratio
# not kept (SigLIP, PE); longest: resize the long side to `size`, then pad to a square with fill_color (open_clip's
# ResizeKeepRatio(longest=1) + CenterCropOrPad).
RESIZE_MODES = ("shortest", "squash", "longest")
# PIL.Image.Resampling codes, the `resample` of a transformers preprocessor_config.json; torchvision resizes PIL
# images with PIL itself for every one of them.
PIL_RESAMPLE = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}
RESAMPLE_MODES = {"nearest": T.InterpolationMode.NEAREST, "lanczos": T.InterpolationMode.LANCZOS,
                  "bilinear": T.InterpolationMode.BILINEAR, "bicubic": T.InterpolationMode.BICUBIC,
                  "box": T.InterpolationMode.BOX, "hamming": T.InterpolationMode.HAMMING}


@dataclass(frozen=True)
class Preprocess:
    """open_clip's PreprocessCfg. Pixels in: an RGB PIL image. Pixels out: a (3, size, size) float tensor,
    (x / 255 - mean) / std per channel."""

    size: int
    mean: tuple[float, ...] = OPENAI_MEAN
    std: tuple[float, ...] = OPENAI_STD
    interpolation: str = "bicubic"
    resize_mode: str = "shortest"
    source: str = "OpenAI CLIP's preprocessing (default)"
    # open_clip's padding value of resize_mode "longest": one grey level (0..255) or one per channel (R, G, B), as
    # torchvision's pad takes it
    fill_color: int | tuple[int, ...] = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "size", int(self.size))
        object.__setattr__(self, "mean", _channels(self.mean, "mean", self.source))
        object.__setattr__(self, "std", _channels(self.std, "std", self.source))
        object.__setattr__(self, "fill_color", _fill(self.fill_color, self.source))
        self._validate()

    def _validate(self) -> None:
        if self.interpolation not in INTERPOLATIONS or self.resize_mode not in RESIZE_MODES:
            raise BackboneError(f"unsupported preprocessing ({self.interpolation}, {self.resize_mode}) in "
                                f"{self.source}: interpolation must be one of {', '.join(INTERPOLATIONS)}, resize mode "
                                f"one of {', '.join(RESIZE_MODES)} (open_clip's PreprocessCfg)")
        if not all(v > 0 for v in self.std):
            raise BackboneError(f"std {list(self.std)} in {self.source}: every channel's std must be > 0 (the "
                                "normalisation divides by it)")

    def to_dict(self) -> dict[str, Any]:
        """What results.json records (backbone.preprocess)."""
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "processor"}  # not asdict: it
        out["mean"], out["std"] = list(self.mean), list(self.std)  # would deep-copy the processor
        if isinstance(self.fill_color, tuple):
            out["fill_color"] = list(self.fill_color)
        return out

    def interpolation_mode(self) -> T.InterpolationMode:
        """The torchvision interpolation the training crop is resized with (the model's own)."""
        return INTERPOLATIONS[self.interpolation]

    def eval_transform(self) -> Any:
        """open_clip's own evaluation transform for this config (image_transform_v2, is_train=False)."""
        from open_clip.transform import PreprocessCfg, image_transform_v2

        cfg = PreprocessCfg(size=self.size, mean=self.mean, std=self.std, interpolation=self.interpolation,
                            resize_mode=self.resize_mode, fill_color=self.fill_color)
        return image_transform_v2(cfg, is_train=False)

    def to_tensor(self) -> list[Any]:
        """The pixel-to-tensor steps shared by the train and eval transforms."""
        return [T.Lambda(_rgb), T.ToTensor(), T.Normalize(self.mean, self.std)]

    def train_transform(self, scale_min: float = 0.08, flip: bool = True) -> T.Compose:
        """CLIP-LoRA's augmentation: RandomResizedCrop(scale (scale_min, 1)) + horizontal flip, then normalise.

        The crop is resized with the model's own interpolation and comes out size x size whatever the resize mode.
        """
        steps: list[Any] = [T.RandomResizedCrop(self.size, scale=(scale_min, 1.0),
                                                interpolation=self.interpolation_mode())]
        if flip:
            steps.append(T.RandomHorizontalFlip(0.5))
        return T.Compose([*steps, *self.to_tensor()])


@dataclass(frozen=True)
class ProcessorPreprocess(Preprocess):
    """A transformers checkpoint's own image processor (`processor`), which makes the evaluation tensors itself.

    `size`, `mean`, `std`, `interpolation` and `resize_mode` describe it (results.json, the training crop);
    `settings` is the processor's own configuration as it resolved the file (its to_dict()), recorded beside them.
    Build it with from_image_processor, which checks that the processor gives images of one fixed square size."""

    settings: dict[str, Any] = field(default_factory=dict, hash=False)
    processor: Any = field(default=None, compare=False, repr=False)

    def _validate(self) -> None:
        if self.interpolation not in RESAMPLE_MODES:
            raise BackboneError(f"unsupported resample {self.interpolation!r} in {self.source}: PIL's codes are "
                                f"{', '.join(f'{k} ({v})' for k, v in PIL_RESAMPLE.items())}")

    def interpolation_mode(self) -> T.InterpolationMode:
        return RESAMPLE_MODES[self.interpolation]

    def eval_transform(self) -> T.Compose:
        """The checkpoint's image processor on one image: exactly the tensor transformers gives the model."""
        return T.Compose([ImageProcessorTransform(self.processor, self.settings)])

    def to_tensor(self) -> list[Any]:
        """The processor's own rescale and normalisation, without its resize and crop (the crop was made before)."""
        return [ImageProcessorTransform(self.processor, self.settings, geometry=False)]


class ImageProcessorTransform:
    """PIL image -> (3, H, W) float tensor through a transformers image processor (`processor(images=[image])`).

    geometry=False skips its resize and center crop (do_resize / do_center_crop False), keeping its RGB conversion,
    rescale and normalisation: what the training crop, already at the model's size, still needs."""

    def __init__(self, processor: Any, settings: dict[str, Any], geometry: bool = True) -> None:
        self.processor, self.settings, self.geometry = processor, settings, geometry

    def __call__(self, image: Image.Image) -> torch.Tensor:
        extra = {} if self.geometry else {"do_resize": False, "do_center_crop": False}
        return self.processor(images=[image], return_tensors="pt", **extra)["pixel_values"][0]

    def __repr__(self) -> str:  # stable across processes: it is part of the zero-shot cache key
        return (f"{type(self).__name__}({type(self.processor).__name__}, geometry={self.geometry}, "
                f"{json.dumps(self.settings, sort_keys=True)})")


def _real(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _channels(values: Any, name: str, source: str) -> tuple[float, ...]:
    """A per-channel statistic (mean or std): a scalar (as open_clip and transformers allow) stands for all three
    channels; a list of 1 or 3 numbers is kept (one value broadcasts over the channels in the normalisation).
    Raises BackboneError naming the value and the config it came from."""
    if _real(values):
        return (float(values),) * 3
    if isinstance(values, (list, tuple)) and len(values) in (1, 3) and all(_real(v) for v in values):
        return tuple(float(v) for v in values)
    raise BackboneError(f"{name} {json.dumps(values) if _jsonable(values) else repr(values)} in {source}: must be a "
                        "number or a list of 1 or 3 numbers (R, G, B)")


def _fill(value: Any, source: str) -> int | tuple[int, ...]:
    """open_clip's fill_color: one integer, or one per channel (R, G, B). Raises BackboneError otherwise."""
    level = lambda v: isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= 255  # noqa: E731 - 8-bit
    if level(value):
        return value
    if isinstance(value, (list, tuple)) and len(value) == 3 and all(level(v) for v in value):
        return tuple(value)
    raise BackboneError(f"fill_color {json.dumps(value) if _jsonable(value) else repr(value)} in {source}: must be "
                        "an integer (0..255) or a list of 3 (R, G, B)")


def _jsonable(value: Any) -> bool:
    try:
        json.dumps(value)
    except (TypeError, ValueError):
        return False
    return True


def _rgb(image: Any) -> Any:
    return image.convert("RGB") if hasattr(image, "convert") and image.mode != "RGB" else image


# Two probe shapes (width, height), landscape and portrait: a processor whose output differs between them does not
# give the model one fixed size (a resize without a crop that keeps the aspect ratio, or no resize and no crop).
PROBES = ((61, 37), (37, 61))


class ProcessorError(BackboneError):
    """A transformers image processor fails on an image (its own config is one it cannot apply)."""


# The largest side a processor may resize or crop to. The probes below (and every image after them) are resized
# to it before any size check can see the result: {"shortest_edge": 100000} makes a 61x37 probe 100000x164865
# pixels, 200 GB as float32, and the process is killed. Published checkpoints use 224..1024 (SigLIP 2: 512).
MAX_PROCESSOR_SIDE = 4096


# The fields of an image processor's config (a preprocessor_config.json, processor_config.json's "image_processor",
# or the processor's own resolved settings) that blocklora reads or that decide the tensor, each with its check: a
# value of the wrong type is applied by transformers as it is (`"size": true` is a 1-pixel side, `"do_normalize":
# "false"` is true, `"resample": "bicubic"` an unknown filter it silently replaces), or fails deep in a resize or a
# normalisation with a message that names no field. Each check returns None or what is wrong. null is the
# processor's default (transformers' own reading). A rescale or normalisation switched off leaves its values unread.
SIZE_RULE = ("must be a positive integer (pixels) or an object of them ({\"height\", \"width\"}, "
             "{\"shortest_edge\"}, ...)")


def _side(value: Any) -> bool:
    return _real(value) and float(value).is_integer() and value > 0


def _sides(value: Any) -> str | None:
    sides = list(value.values()) if isinstance(value, dict) else [value]
    if not (isinstance(value, dict) or _side(value)) or not all(s is None or _side(s) for s in sides):
        return SIZE_RULE
    if any(s is not None and s > MAX_PROCESSOR_SIDE for s in sides):
        return (f"sides beyond {MAX_PROCESSOR_SIDE} px (blocklora.backbones.preprocess.MAX_PROCESSOR_SIDE) would "
                "make each image gigabytes")
    return None


def _statistic(positive: bool) -> Callable[[Any], str | None]:
    def check(value: Any) -> str | None:
        values = value if isinstance(value, list) else [value]
        if not (isinstance(value, list) and len(value) in (1, 3) or _real(value)) or \
                not all(_real(v) and (v > 0 or not positive) for v in values):
            return ("every channel's std must be a finite number > 0 (the normalisation divides by it), one number "
                    "or a list of 1 or 3 (R, G, B)" if positive else
                    "must be a finite number or a list of 1 or 3 (R, G, B)")
        return None
    return check


def _switch(value: Any) -> str | None:
    return None if isinstance(value, bool) else "must be true or false"


PROCESSOR_FIELDS: dict[str, Callable[[Any], str | None]] = {
    "size": _sides, "crop_size": _sides,
    **dict.fromkeys(("do_resize", "do_center_crop", "do_rescale", "do_normalize", "do_convert_rgb"), _switch),
    "resample": lambda v: None if isinstance(v, int) and not isinstance(v, bool) and v in PIL_RESAMPLE else
    f"must be one of PIL's resampling codes: {', '.join(f'{k} ({n})' for k, n in PIL_RESAMPLE.items())}",
    "rescale_factor": lambda v: None if _real(v) and v > 0 else ("must be a finite number > 0 (1/255 maps 8-bit "
                                                                 "pixels to [0, 1]; 0 makes every image the same)"),
    "image_mean": _statistic(positive=False), "image_std": _statistic(positive=True),
}
SWITCHED = {"rescale_factor": "do_rescale", "image_mean": "do_normalize", "image_std": "do_normalize"}


def check_processor_config(record: Any, source: str, fix: str = "fix its preprocessor_config.json") -> None:
    """Check an image processor's config (`record`: the JSON object of its file, or a processor's resolved
    settings) against PROCESSOR_FIELDS before transformers applies it. Raises BackboneError naming the field, its
    value, `source` (the file) and `fix`."""
    if not isinstance(record, dict):
        raise BackboneError(f"{source}: the image processor's config is not a JSON object; {fix}")
    for key, check in PROCESSOR_FIELDS.items():
        value = record.get(key)
        if value is None or record.get(SWITCHED.get(key, ""), True) is False:
            continue
        why = check(value)
        if why:
            raise BackboneError(f"{key} {json.dumps(value) if _jsonable(value) else repr(value)} in {source}: {why}; "
                                f"{fix}")


def from_image_processor(processor: Any, source: str) -> ProcessorPreprocess:
    """The preprocessing of a transformers image processor (CLIPImageProcessor, SiglipImageProcessor,
    ChineseCLIPImageProcessor, ...), as built by AutoImageProcessor from a preprocessor_config.json.

    The output size is what the processor itself gives on a landscape and a portrait probe image. Raises
    ProcessorError when the processor fails on them, BackboneError when its output is not one fixed square size
    (the towers take size x size images).
    """
    shapes = []
    # the processor's own view of its file, and its class (transformers 5: the PIL backend's ends in "Pil")
    settings = {**json.loads(processor.to_json_string()), "image_processor_class": type(processor).__name__}
    check_processor_config(settings, source)
    for w, h in PROBES:
        try:
            out = processor(images=[Image.new("RGB", (w, h), (128, 128, 128))], return_tensors="pt")["pixel_values"]
        except Exception as e:  # noqa: BLE001 - the library refuses its own config: say which and why, on one line
            why = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
            raise ProcessorError(f"the image processor of {source} ({type(processor).__name__}, "
                                 f"{getattr(processor, 'backend', 'transformers')} backend) cannot process an image: "
                                 f"{why}; fix its preprocessor_config.json") from None
        shapes.append(tuple(int(d) for d in out.shape[-2:]))
    described = ", ".join(f"{k} {json.dumps(settings[k])}" for k in ("size", "crop_size", "do_resize",
                                                                      "do_center_crop") if k in settings)
    if shapes[0] != shapes[1]:
        raise BackboneError(f"the image processor of {source} ({described}) gives images of varying size "
                            f"({shapes[0][0]}x{shapes[0][1]} for a {PROBES[0][0]}x{PROBES[0][1]} image, "
                            f"{shapes[1][0]}x{shapes[1][1]} for {PROBES[1][0]}x{PROBES[1][1]}), but the model takes "
                            "one square size: give it a center crop (do_center_crop true, crop_size) or a fixed "
                            "height and width")
    (h, w) = shapes[0]
    if h != w:
        raise BackboneError(f"the image processor of {source} ({described}) gives {h}x{w} images, but the model "
                            "takes square images: set a square crop_size or size")
    mean, std = (settings.get("image_mean", OPENAI_MEAN), settings.get("image_std", OPENAI_STD)) \
        if settings.get("do_normalize", True) else ((0.0,) * 3, (1.0,) * 3)
    resample = settings.get("resample", 3)
    size = settings.get("size") or {}
    if not settings.get("do_resize", True):
        mode = "none"
    elif size.get("shortest_edge") and not size.get("longest_edge"):
        mode = "shortest"
    elif size.get("height") and size.get("width"):
        mode = "squash"
    else:
        mode = "longest"
    return ProcessorPreprocess(h, mean, std, PIL_RESAMPLE.get(resample, str(resample)), mode, source,
                               settings=settings, processor=processor)
