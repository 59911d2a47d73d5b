"""Real photos for the preprocessing oracles, from files every install of the project has (no download).

Provenance: matplotlib (a dependency) ships sample images in matplotlib/mpl-data/sample_data:
- grace_hopper.jpg: a 512x600 photograph of Rear Admiral Grace Hopper (U.S. Navy photograph, public domain);
- Minduka_Present_Blue_Pack.png: a 128x128 RGBA drawing of a gift box on a transparent background (openclipart.org,
  public domain).
PHOTOS cuts and scales the photograph into real images of several sizes and aspect ratios (portrait, landscape, a
tall strip, a square, and one smaller than every model input, so processors also pad and upsample).
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

from PIL import Image


def sample_path(name: str) -> Path:
    """A file of matplotlib's sample data (grace_hopper.jpg, Minduka_Present_Blue_Pack.png)."""
    from matplotlib import cbook

    return Path(cbook.get_sample_data(name, asfileobj=False))


@cache
def photos() -> dict[str, Image.Image]:
    """name -> RGB photo: (width, height) 128x150 portrait, 150x88 landscape, 40x133 strip, 97x97 square, 23x19 tiny
    (cuts of grace_hopper.jpg scaled with PIL's bicubic filter: real photo content at each size)."""
    full = Image.open(sample_path("grace_hopper.jpg")).convert("RGB")  # 512x600
    return {
        "portrait": full.resize((128, 150), Image.BICUBIC),
        "landscape": full.crop((0, 100, 512, 400)).resize((150, 88), Image.BICUBIC),
        "strip": full.crop((150, 0, 330, 600)).resize((40, 133), Image.BICUBIC),
        "square": full.crop((0, 40, 512, 552)).resize((97, 97), Image.BICUBIC),
        "tiny": full.crop((100, 60, 400, 310)).resize((23, 19), Image.BICUBIC),
    }
