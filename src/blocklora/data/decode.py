"""The one way blocklora opens an image file, for train, eval and predict: safe on hostile files, exact on
transparency, palettes and high bit depths, upright.

    open_image_file(path) -> RGB image          user data: folder, CSV, predict (EXIF orientation applied)
    open_benchmark_image(path) -> RGB image     the benchmark readers (EXIF orientation not applied, as the peers)
    header_problem(path) -> None | why it cannot be used

Every failure is a DataError naming the file and the reason; nothing hangs and nothing is silently wrong:
- only regular files are opened (a FIFO named x.png would block open() forever; sockets and devices too); the file is
  opened with O_NONBLOCK and checked again with fstat, so a swap after the check cannot block either;
- images with more pixels than PIL's Image.MAX_IMAGE_PIXELS (about 89 M; raise it to allow larger images) are
  refused before decoding: a small file can decode to gigabytes (a decompression bomb);
- so are images longer than MAX_ASPECT_RATIO times their width (or wider than it times their height): a strip the
  pixel limit lets through (2,000,000 x 1 px, 6 KB as PNG) becomes S x S*2,000,000 pixels when a transform resizes
  its short side to the model's input size S (CLIP's resize), gigabytes at any S (shape_problem);
- 16-bit and float images are scaled to 8 bits, not clipped as PIL's convert("RGB") does (it maps every 16-bit
  value above 255 to white and a float image in [0, 1] to black): I;16 by 255 / 65535; 32-bit integer ("I") images
  by the same factor when their values fit 0..65535 (as-is when they fit 0..255); float ("F") images in [0, 1] by
  255 (as-is when they fit [0, 255]); other ranges, and NaN, are refused with the range found;
- transparency (an alpha band, or a palette or grey image's transparent index) is composited onto white, as the
  transformers image processors do (transformers.image_transforms.convert_to_rgb): PIL's convert("RGB") keeps the
  colour a transparent pixel happens to store, black for most editors, and a black drawing on a transparent
  background becomes one flat black image;
- user images (folder, CSV, predict) are turned upright by their EXIF Orientation tag (PIL's
  ImageOps.exif_transpose), as phones store photos sideways with the tag and every viewer, and transformers'
  load_image, shows them upright. The benchmark readers (CoOp's 11 datasets, the ImageNet variants) read the pixels
  as stored, as CoOp, CLIP-LoRA and open_clip do (PIL's Image.open + convert("RGB"), no transposition), so their
  numbers stay comparable with the published ones.
"""

from __future__ import annotations

import contextlib
import os
import stat
from collections.abc import Iterator

import numpy as np
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError

from ..errors import DataError

_KINDS = {stat.S_IFIFO: "a FIFO (named pipe)", stat.S_IFSOCK: "a socket", stat.S_IFCHR: "a character device",
          stat.S_IFBLK: "a block device", stat.S_IFDIR: "a folder"}


# The longest side over the shortest that an image may have. CLIP's preprocessing resizes the short side to the
# input size S, making S*S*r pixels of an r:1 image: at r = 200 that is 10 M pixels (30 MB as 8-bit RGB) for S = 224,
# and 52 M for S = 512 (SigLIP's largest), under the 89 M pixels PIL's own limit allows a decoded image. Photographs
# are far below it: 360-degree panoramas are 2:1, phone sweep panoramas up to about 8:1. Raise it (like PIL's
# Image.MAX_IMAGE_PIXELS) to read longer strips.
MAX_ASPECT_RATIO = 200


def shape_problem(width: int, height: int) -> str | None:
    """Why an image of this size cannot be used (0 pixels; an aspect ratio beyond MAX_ASPECT_RATIO), or None."""
    if width < 1 or height < 1:
        return "empty image (0 pixels)"
    ratio = max(width, height) / min(width, height)
    if MAX_ASPECT_RATIO and ratio > MAX_ASPECT_RATIO:
        return (f"{width}x{height} pixels: an aspect ratio of {ratio:.0f}:1, beyond {MAX_ASPECT_RATIO}:1 "
                "(blocklora.data.decode.MAX_ASPECT_RATIO): resizing it to the model's input would need "
                f"{ratio:.0f} times its pixels (a strip-shaped decompression bomb?)")
    return None


def _not_regular(mode: int) -> str | None:
    if stat.S_ISREG(mode):
        return None
    return f"not a regular file: it is {_KINDS.get(stat.S_IFMT(mode), 'a special file')}"


@contextlib.contextmanager
def _opened(path: str) -> Iterator[Image.Image]:
    """PIL's lazy Image.open (header only) on a regular file, with the pixel-count limit checked."""
    why = _not_regular(os.stat(path).st_mode)
    if why:
        raise DataError(why)
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    with os.fdopen(fd, "rb") as fh:
        why = _not_regular(os.fstat(fh.fileno()).st_mode)
        if why:
            raise DataError(why)
        with Image.open(fh) as image:
            limit = Image.MAX_IMAGE_PIXELS
            if limit and image.width * image.height > limit:
                raise DataError(f"{image.width}x{image.height} pixels exceed PIL's limit Image.MAX_IMAGE_PIXELS="
                                f"{limit} (a decompression bomb?)")
            why = shape_problem(image.width, image.height)
            if why:
                raise DataError(why)
            yield image


def reason(e: BaseException) -> str:
    """A one-line reason for a failure to open or decode."""
    if isinstance(e, FileNotFoundError):
        return "file not found"
    if isinstance(e, DataError):
        return str(e)
    if isinstance(e, Image.DecompressionBombError):  # "Image size (N pixels) exceeds limit of M pixels, could be..."
        return f"decompression bomb? {str(e).split(', could be')[0]} (PIL's Image.MAX_IMAGE_PIXELS)"
    if isinstance(e, UnidentifiedImageError):  # PIL's text names our file object, not the path
        return "cannot identify image file (not an image, or a format PIL cannot read)"
    text = str(e).splitlines()[0] if str(e) else ""
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def _fail(path: str, e: BaseException) -> DataError:
    return DataError(f"cannot read image {path}: {reason(e)}")


def read_image_file(path: str, exif_orientation: bool = True) -> Image.Image:
    """Decode an image file completely (corrupt and truncated files fail here, not later in a worker), as 8-bit RGB
    (to_rgb), turned upright by its EXIF Orientation tag when `exif_orientation`.

    Raises DataError("cannot read image PATH: reason") for anything that is not a readable image."""
    try:
        with _opened(path) as image:
            image.load()
            if exif_orientation and orientation(image) != 1:
                image = ImageOps.exif_transpose(image)
            return to_rgb(image)
    except Exception as e:  # noqa: BLE001 - PIL raises OSError, ValueError, SyntaxError, struct.error, ...
        raise _fail(path, e) from None


def open_image_file(path: str) -> Image.Image:
    """A user's image (folder and CSV datasets, predict): read_image_file with its EXIF orientation applied."""
    return read_image_file(path, exif_orientation=True)


def open_benchmark_image(path: str) -> Image.Image:
    """A benchmark dataset's image: read_image_file without EXIF transposition (CoOp, CLIP-LoRA and open_clip read
    the stored pixels), so accuracies stay comparable with theirs."""
    return read_image_file(path, exif_orientation=False)


FILE_READERS = (open_image_file, open_benchmark_image)


def reads_files(reader: object) -> bool:
    """Whether `reader` is one of blocklora's file readers (an Item's path is then a file on disk)."""
    return any(reader is r for r in FILE_READERS)


def orientation(image: Image.Image) -> int:
    """The EXIF Orientation tag (1..8; 1 = upright, also when there is no tag or it is not a number)."""
    try:
        value = int(image.getexif().get(ExifTags.Base.Orientation, 1))
    except (TypeError, ValueError, OSError, SyntaxError):  # a damaged EXIF block: the pixels are still fine
        return 1
    return value if 1 <= value <= 8 else 1


def file_problem(path: str) -> str | None:
    """Why `path` cannot be an image file, from its metadata alone (missing, a folder, a FIFO, ...), or None."""
    try:
        return _not_regular(os.stat(path).st_mode)
    except OSError as e:
        return reason(e)


def header_problem(path: str) -> str | None:
    """Why `path` cannot be used as an image, from its header alone (no pixel decode), or None.

    Finds missing files, non-images, special files, decompression bombs, empty images and unsupported modes: a check
    for large test sets, whose images are decoded once, in the evaluation pass (truncation shows there)."""
    try:
        with _opened(path) as image:
            if image.mode not in _SUPPORTED and not _scaled_mode(image.mode):
                return f"unsupported image mode {image.mode}"
    except Exception as e:  # noqa: BLE001 - any failure is a finding, not a crash
        return reason(e)
    return None


# PIL modes that convert("RGB") maps correctly (8 bits per channel, palettes, bilevel, other colour spaces)
_SUPPORTED = {"1", "L", "LA", "La", "P", "PA", "RGB", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr", "LAB", "HSV"}


def _scaled_mode(mode: str) -> bool:
    return mode.startswith("I;16") or mode in ("I", "F")


def to_rgb(image: Image.Image) -> Image.Image:
    """8-bit RGB: transparency composited onto white (transformers' convert_to_rgb, pixel for pixel), palettes
    through their colours, high bit depths scaled instead of clipped (see the module docstring)."""
    if image.mode == "RGB":
        return image
    if not _scaled_mode(image.mode):
        if "A" in image.getbands() or image.info.get("transparency") is not None:
            rgba = image.convert("RGBA")
            white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            return Image.alpha_composite(white, rgba).convert("RGB")
        return image.convert("RGB")
    a = np.asarray(image, dtype=np.float64)
    if not np.isfinite(a).all():
        raise DataError(f"{image.mode} image with NaN or infinite values")
    lo, hi = float(a.min()), float(a.max())
    if image.mode.startswith("I;16"):
        scale = 255 / 65535
    elif lo >= 0 and hi <= 255 and (image.mode == "I" or hi > 1):
        scale = 1.0  # integers, or floats beyond [0, 1], already in 8-bit range
    elif image.mode == "I" and lo >= 0 and hi <= 65535:
        scale = 255 / 65535
    elif image.mode == "F" and lo >= 0 and hi <= 1:
        scale = 255.0
    else:
        raise DataError(f"{image.mode} image with values in [{lo:g}, {hi:g}]: blocklora reads 32-bit integer "
                        "images in 0..65535 and float images in [0, 1] (or [0, 255]); rescale it")
    return Image.fromarray(np.rint(a * scale).astype(np.uint8), "L").convert("RGB")
