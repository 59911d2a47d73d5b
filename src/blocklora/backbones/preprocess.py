"""A model's own image preprocessing: size, normalisation, resize mode and interpolation, and where they came from.

Each family reads them from the weights' pretrained configuration (open_clip's pretrained tags, a transformers
checkpoint's preprocessor_config.json); the values and their source go into results.json, so a run says what the
images it was fed looked like. SigLIP, PE and MobileCLIP differ from OpenAI CLIP (mean = std = 0.5 or no
normalisation, a squash resize, bilinear interpolation): feeding them CLIP's preprocessing changes accuracy silently.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from torchvision import transforms as T

from ..errors import BackboneError

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)  # CLIP's training-set statistics (open_clip.constants)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
INTERPOLATIONS = {"bicubic": T.InterpolationMode.BICUBIC, "bilinear": T.InterpolationMode.BILINEAR,
                  "nearest": T.InterpolationMode.NEAREST}
# shortest: resize the short side to `size`, then center-crop (CLIP); squash: resize to size x size, aspect ratio
# not kept (SigLIP, PE); longest: resize the long side to `size`, then pad to a square (open_clip's "longest").
RESIZE_MODES = ("shortest", "squash", "longest")
PIL_RESAMPLE = {0: "nearest", 2: "bilinear", 3: "bicubic"}  # PIL.Image.Resampling codes in HF processor configs


@dataclass(frozen=True)
class Preprocess:
    """Pixels in: a PIL image. Pixels out: a (3, size, size) float tensor, (x / 255 - mean) / std per channel."""

    size: int
    mean: tuple[float, ...] = OPENAI_MEAN
    std: tuple[float, ...] = OPENAI_STD
    interpolation: str = "bicubic"
    resize_mode: str = "shortest"
    source: str = "OpenAI CLIP's preprocessing (default)"

    def __post_init__(self) -> None:
        object.__setattr__(self, "size", int(self.size))
        object.__setattr__(self, "mean", tuple(float(m) for m in self.mean))
        object.__setattr__(self, "std", tuple(float(s) for s in self.std))
        if self.interpolation not in INTERPOLATIONS or self.resize_mode not in RESIZE_MODES:
            raise BackboneError(f"unsupported preprocessing ({self.interpolation}, {self.resize_mode}) in "
                                f"{self.source}: interpolation must be one of {', '.join(INTERPOLATIONS)}, resize mode "
                                f"one of {', '.join(RESIZE_MODES)}")

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["mean"], out["std"] = list(self.mean), list(self.std)
        return out

    def eval_transform(self) -> T.Compose:
        """The model's evaluation preprocessing (resize by `resize_mode`, normalise)."""
        mode, s = INTERPOLATIONS[self.interpolation], self.size
        if self.resize_mode == "squash":
            steps: list[Any] = [T.Resize((s, s), interpolation=mode)]
        elif self.resize_mode == "longest":  # long side to s, then zero-pad the short side (CenterCrop pads)
            steps = [T.Resize(None, max_size=s, interpolation=mode), T.CenterCrop(s)]
        else:
            steps = [T.Resize(s, interpolation=mode), T.CenterCrop(s)]
        return T.Compose([*steps, T.Lambda(_rgb), T.ToTensor(), T.Normalize(self.mean, self.std)])

    def train_transform(self, scale_min: float = 0.08, flip: bool = True) -> T.Compose:
        """CLIP-LoRA's augmentation: RandomResizedCrop(scale (scale_min, 1)) + horizontal flip, then normalise.

        The crop is resized with the model's own interpolation and comes out size x size whatever the resize mode.
        """
        steps: list[Any] = [T.RandomResizedCrop(self.size, scale=(scale_min, 1.0),
                                                interpolation=INTERPOLATIONS[self.interpolation])]
        if flip:
            steps.append(T.RandomHorizontalFlip(0.5))
        return T.Compose([*steps, T.Lambda(_rgb), T.ToTensor(), T.Normalize(self.mean, self.std)])


def _rgb(image: Any) -> Any:
    return image.convert("RGB") if hasattr(image, "convert") and image.mode != "RGB" else image


def from_hf_processor(config: dict[str, Any], default_size: int, source: str) -> Preprocess:
    """Preprocess from a transformers preprocessor_config.json (CLIPImageProcessor, SiglipImageProcessor, ...).

    `size` {"shortest_edge": s} with a center crop is CLIP's scheme; {"height": h, "width": w} is a squash resize.
    """
    size = config.get("size") or {}
    crop = config.get("crop_size") or {}
    if isinstance(size, int):
        size = {"shortest_edge": size}
    if "shortest_edge" in size:
        side = int(crop.get("height", size["shortest_edge"])) if config.get("do_center_crop", True) else \
            int(size["shortest_edge"])
        mode = "shortest"
    elif "height" in size:
        side, mode = int(size["height"]), "squash"
    else:
        side, mode = default_size, "shortest"
    if config.get("do_normalize", True):
        mean, std = config.get("image_mean", OPENAI_MEAN), config.get("image_std", OPENAI_STD)
    else:
        mean, std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
    return Preprocess(side, mean, std, PIL_RESAMPLE.get(config.get("resample", 3), "bicubic"), mode, source)
