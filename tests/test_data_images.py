"""ImageDataset and verify_images on real (tiny) image files, including broken ones."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from blocklora.data import ImageDataset, Item, verify_images
from blocklora.errors import DataError
from data_trees import write_image


def to_tensor(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(image, dtype=np.float32)).permute(2, 0, 1) / 255


def noisy_jpeg(size: int = 96) -> bytes:
    pixels = np.random.default_rng(0).integers(0, 256, (size, size, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "JPEG", quality=95)
    return buf.getvalue()


def test_image_dataset(tmp_path):
    a = write_image(tmp_path / "a.jpg", size=(7, 5))
    b = write_image(tmp_path / "b.png", color=(0, 255, 0), size=(4, 4))
    grey = tmp_path / "grey.png"
    Image.new("L", (3, 3), 128).save(grey)
    ds = ImageDataset([Item(str(a), 1), Item(str(b), 0), Item(str(grey), 2)], to_tensor)
    assert len(ds) == 3
    x, y = ds[1]
    assert y == 0 and x.shape == (3, 4, 4) and torch.allclose(x[1], torch.ones(4, 4))
    assert ds[2][0].shape == (3, 3, 3)  # grey -> RGB
    assert ds[0][0].shape == (3, 5, 7)
    image, label = ImageDataset([Item(str(a), 1)])[0]  # no transform: the PIL image
    assert isinstance(image, Image.Image) and image.mode == "RGB" and label == 1
    loader = DataLoader(ImageDataset([Item(str(b), 0)] * 2, to_tensor), batch_size=2)
    images, labels = next(iter(loader))
    assert images.shape == (2, 3, 4, 4) and labels.tolist() == [0, 0]


def test_image_dataset_custom_reader_and_errors(tmp_path):
    ds = ImageDataset([Item("k/1", 3)], to_tensor, reader=lambda key: Image.new("RGB", (2, 2)))
    assert ds[0][0].shape == (3, 2, 2) and ds[0][1] == 3
    (tmp_path / "bad.jpg").write_text("not an image")
    with pytest.raises(DataError, match=r"cannot read image .*bad\.jpg"):
        ImageDataset([Item(str(tmp_path / "bad.jpg"), 0)], to_tensor)[0]


def test_verify_images_finds_broken_files(tmp_path):
    good_jpg = tmp_path / "good.jpg"
    good_jpg.write_bytes(noisy_jpeg())
    good_png = write_image(tmp_path / "good.png")
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(noisy_jpeg()[: len(noisy_jpeg()) // 2])
    text = tmp_path / "notes.jpg"
    text.write_text("this is not an image")
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    missing = tmp_path / "missing.jpg"
    items = [Item(str(p), 0) for p in (good_jpg, truncated, good_png, text, empty, missing)] + [Item(str(text), 1)]
    bad = verify_images(items, workers=3)
    assert [p for p, _ in bad] == [str(truncated), str(text), str(empty), str(missing)]  # once each, in order
    reasons = dict(bad)
    assert "truncated" in reasons[str(truncated)]
    assert "cannot identify image file" in reasons[str(text)]
    assert reasons[str(missing)] == "file not found"
    assert verify_images([Item(str(good_jpg), 0)]) == []
    assert verify_images([]) == []


def test_verify_images_custom_reader():
    def reader(key: str) -> Image.Image:
        if key == "bad":
            raise DataError("no such key")
        return Image.new("RGB", (1, 1))

    assert verify_images([Item("ok", 0), Item("bad", 0)], reader) == [("bad", "no such key")]


def test_verify_images_is_fast(tmp_path):
    import time

    data = noisy_jpeg(64)
    paths = []
    for i in range(400):
        paths.append(tmp_path / f"{i}.jpg")
        paths[-1].write_bytes(data)
    t = time.perf_counter()
    assert verify_images([Item(str(p), 0) for p in paths]) == []
    assert time.perf_counter() - t < 5


# -- the safe opener: high bit depths, special files, bombs; the three check levels ------------------------------
def test_16_bit_and_float_images_are_scaled_not_clipped(tmp_path):
    from blocklora.data import open_image_file

    ramp = np.linspace(0, 65535, 64 * 64).reshape(64, 64)
    Image.fromarray(ramp.astype(np.uint16)).save(tmp_path / "g16.png")
    got = np.asarray(open_image_file(str(tmp_path / "g16.png")))
    assert got.shape == (64, 64, 3) and (got[..., 0] == got[..., 2]).all()
    stored = ramp.astype(np.uint16).astype(np.float64)
    assert np.array_equal(got[..., 0], np.rint(stored * 255 / 65535).astype(np.uint8))
    unit = np.linspace(0, 1, 32 * 32, dtype=np.float32).reshape(32, 32)
    Image.fromarray(unit).save(tmp_path / "f.tif")
    assert np.array_equal(np.asarray(open_image_file(str(tmp_path / "f.tif")))[..., 0],
                          np.rint(unit.astype(np.float64) * 255).astype(np.uint8))
    Image.fromarray((unit * 200).astype(np.float32)).save(tmp_path / "f255.tif")  # already in 8-bit range: as is
    assert np.asarray(open_image_file(str(tmp_path / "f255.tif"))).max() == 200
    Image.fromarray(unit * 2 - 1).save(tmp_path / "signed.tif")
    with pytest.raises(DataError, match=r"signed\.tif: F image with values in \[-1, 1\]"):
        open_image_file(str(tmp_path / "signed.tif"))
    Image.fromarray(np.full((4, 4), np.nan, np.float32)).save(tmp_path / "nan.tif")
    with pytest.raises(DataError, match="NaN"):
        open_image_file(str(tmp_path / "nan.tif"))


def test_special_files_and_bombs_are_refused_without_opening(tmp_path, monkeypatch):
    import os

    from blocklora.data import open_image_file
    from blocklora.data.decode import header_problem

    os.mkfifo(tmp_path / "pipe.png")  # opening it for reading would block forever
    assert header_problem(str(tmp_path / "pipe.png")) == "not a regular file: it is a FIFO (named pipe)"
    assert header_problem("/dev/null") == "not a regular file: it is a character device"
    with pytest.raises(DataError, match="FIFO"):
        open_image_file(str(tmp_path / "pipe.png"))
    write_image(tmp_path / "big.png", size=(60, 60))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 3000)
    with pytest.warns(Image.DecompressionBombWarning):  # PIL's warning (the CLI silences it): refused anyway
        assert "decompression bomb" in header_problem(str(tmp_path / "big.png"))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # over twice the limit: PIL's own error, same words
    assert "decompression bomb" in header_problem(str(tmp_path / "big.png"))


def test_check_levels_find_what_they_promise(tmp_path):
    import os

    good = write_image(tmp_path / "good.png", size=(20, 20))
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(good.read_bytes()[:60])
    text = tmp_path / "text.png"
    text.write_text("not an image")
    os.mkfifo(tmp_path / "pipe.png")
    items = [Item(str(p), 0) for p in (good, truncated, text, tmp_path / "pipe.png", tmp_path / "missing.png")]
    found = {level: [p.rsplit("/", 1)[1] for p, _ in verify_images(items, level=level)]
             for level in ("file", "header", "decode")}
    assert found == {"file": ["pipe.png", "missing.png"], "header": ["text.png", "pipe.png", "missing.png"],
                     "decode": ["truncated.png", "text.png", "pipe.png", "missing.png"]}
    ds = ImageDataset(items, to_tensor, report=True)  # an evaluation pass: reports, never raises
    assert [ds[i][3] is None for i in range(len(items))] == [True, False, False, False, False]


def test_folder_walk_follows_links_once_and_refuses_undecodable_names(tmp_path):
    import os

    from blocklora.data.layout import list_image_files

    write_image(tmp_path / "c" / "a.png")
    write_image(tmp_path / "c" / "sub" / "b.png")
    (tmp_path / "c" / "loop").symlink_to(".")
    (tmp_path / "c" / "sub" / "up").symlink_to("..")
    (tmp_path / "other").mkdir()
    write_image(tmp_path / "other" / "x.png")
    (tmp_path / "c" / "linked").symlink_to(tmp_path / "other")  # a link to a real folder elsewhere: followed
    assert [p.removeprefix(str(tmp_path / "c")) for p in list_image_files(tmp_path / "c")] == [
        "/a.png", "/linked/x.png", "/sub/b.png"]
    with open(os.fsencode(tmp_path / "c") + b"/caf\xe9.png", "wb") as fh:
        fh.write((tmp_path / "c" / "a.png").read_bytes())
    with pytest.raises(DataError, match=r"caf\\xe9\.png is not valid UTF-8"):
        list_image_files(tmp_path / "c")


# -- images as users have them: transparency, palettes, 16-bit colour, EXIF orientation ------------------------------
def _png16(path, width: int, height: int, colour_type: int, pixels: np.ndarray) -> None:
    """A 16-bit PNG written byte by byte (PIL cannot write 16-bit colour): colour type 2 = RGB, 6 = RGBA."""
    import struct
    import zlib

    raw = b"".join(b"\x00" + row.astype(">u2").tobytes() for row in pixels)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 16, colour_type, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw))
                     + chunk(b"IEND", b""))


def test_transparency_palettes_and_modes_decode_as_transformers_does(tmp_path):
    """transformers' convert_to_rgb (what its image processors apply) is the oracle, pixel for pixel: transparency
    onto white, palettes through their colours; a black drawing on a transparent background stays a drawing."""
    from PIL import ImageDraw
    from transformers.image_transforms import convert_to_rgb

    from blocklora.data import open_benchmark_image, open_image_file
    from photos import photos, sample_path

    ring = Image.new("RGBA", (24, 24), (0, 0, 0, 0))  # transparent pixels store black, as most editors write them
    ImageDraw.Draw(ring).ellipse((4, 4, 20, 20), outline=(0, 0, 0, 255), width=3)
    half = Image.new("RGBA", (8, 8), (200, 40, 10, 128))  # semi-transparent
    photo = photos()["tiny"]
    files = {"drawing.png": Image.open(sample_path("Minduka_Present_Blue_Pack.png")), "ring.png": ring,
             "half.png": half, "ring_la.png": ring.convert("LA"), "photo_cmyk.jpg": photo.convert("CMYK"),
             "photo_l.png": photo.convert("L"), "photo_1.png": photo.convert("1"), "photo_rgb.png": photo,
             "photo_p.png": photo.convert("P")}
    for name, image in files.items():
        image.save(tmp_path / name)
    ring.convert("P").save(tmp_path / "ring_p.png", transparency=0)  # a palette with a transparent index
    ring.convert("P").save(tmp_path / "ring.gif", transparency=0)
    photo.convert("L").save(tmp_path / "photo_l_trns.png", transparency=int(np.asarray(photo.convert("L"))[0, 0]))
    for path in sorted(tmp_path.iterdir()):
        expected = convert_to_rgb(Image.open(path), return_numpy=True)
        for reader in (open_image_file, open_benchmark_image):
            got = np.asarray(reader(str(path)))
            assert got.dtype == np.uint8 and np.array_equal(got, expected), (path.name, reader.__name__)
    for name in ("ring.png", "ring_p.png", "ring_la.png", "ring.gif"):
        px = np.asarray(open_image_file(str(tmp_path / name)))
        assert px[0, 0].tolist() == [255, 255, 255] and px.min() == 0  # white around, the black ring kept
    assert np.asarray(open_image_file(str(tmp_path / "half.png")))[0, 0].tolist() == [227, 147, 132]


def test_16_bit_colour_and_alpha_are_scaled(tmp_path):
    """16-bit RGB / RGBA PNGs (PIL keeps the high byte) come out at 8 bits, within one level of v * 255 / 65535;
    a transparent 16-bit pixel is white."""
    from blocklora.data import open_image_file

    rgb = np.array([[[65535, 0, 300], [30000, 65535, 12345]]], dtype=np.uint16)
    _png16(tmp_path / "rgb16.png", 2, 1, 2, rgb)
    got = np.asarray(open_image_file(str(tmp_path / "rgb16.png"))).astype(int)
    assert np.abs(got - np.rint(rgb.astype(np.float64) * 255 / 65535)).max() <= 1
    rgba = np.array([[[65535, 0, 0, 65535], [0, 0, 0, 0]]], dtype=np.uint16)
    _png16(tmp_path / "rgba16.png", 2, 1, 6, rgba)
    assert np.asarray(open_image_file(str(tmp_path / "rgba16.png"))).tolist() == [[[255, 0, 0], [255, 255, 255]]]


def test_exif_orientation_applies_to_user_images_not_to_benchmarks(tmp_path):
    """Phones store photos sideways with an EXIF Orientation tag. User data (folder, CSV, predict) is turned upright
    as PIL's ImageOps.exif_transpose and transformers' load_image do; the benchmark readers keep the stored pixels,
    as CoOp's read_image (PIL Image.open + convert("RGB")), CLIP-LoRA and open_clip do."""
    from PIL import ImageOps
    from transformers.image_utils import load_image

    from blocklora.data import open_benchmark_image, open_image_file
    from photos import photos

    photo = photos()["landscape"]
    for tag in range(1, 9):
        path = tmp_path / f"o{tag}.jpg"
        exif = Image.Exif()
        exif[0x0112] = tag
        photo.save(path, exif=exif, quality=95)
        stored = Image.open(path).convert("RGB")
        upright = np.asarray(open_image_file(str(path)))
        assert np.array_equal(upright, np.asarray(ImageOps.exif_transpose(Image.open(path)).convert("RGB")))
        assert np.array_equal(upright, np.asarray(load_image(str(path))))
        assert upright.shape[:2] == ((88, 150) if tag < 5 else (150, 88))  # 5..8 turn the image on its side
        assert np.array_equal(np.asarray(open_benchmark_image(str(path))), np.asarray(stored))


def test_user_datasets_read_upright_and_benchmark_readers_read_as_the_peers(tmp_path):
    from blocklora.data import load_dataset, open_benchmark_image, open_image_file
    from data_trees import make_fgvc, make_imagenet, make_zhou
    from gen_data import make_folder_dataset

    folder = make_folder_dataset(tmp_path / "folder", n_classes=2, train_per_class=1, test_per_class=1)
    csv = tmp_path / "data.csv"
    csv.write_text("path,label,split\n" + "".join(f"{p.relative_to(tmp_path)},{p.parent.name},{p.parts[-3]}\n"
                                                  for p in sorted(folder.rglob("*.png"))))
    assert load_dataset("folder", folder).image_reader is open_image_file
    assert load_dataset("csv", csv).image_reader is open_image_file
    make_zhou(tmp_path / "bench", "dtd")
    make_imagenet(tmp_path / "bench")
    make_fgvc(tmp_path / "bench")
    for key in ("dtd", "imagenet", "fgvc_aircraft"):
        assert load_dataset(key, tmp_path / "bench").image_reader is open_benchmark_image
