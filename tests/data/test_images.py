"""open_rgb converts every supported mode to 8-bit RGB; check_image names each kind of bad file."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
from PIL import Image, ImageFile

from clipmed.data.images import ImageError, check_image, open_rgb
from clipmed.errors import ClipmedError


def test_rgb_image_is_returned_as_rgb(tmp_path, kit):
    img = open_rgb(kit.save_image(tmp_path / "a.png"))
    assert img.mode == "RGB" and img.size == (8, 8)
    assert img.getpixel((0, 0)) == (200, 30, 30)
    assert check_image(tmp_path / "a.png") is None


def test_16bit_png_is_scaled_by_its_real_range(tmp_path):
    values = np.linspace(1000, 3000, 64, dtype=np.uint16).reshape(8, 8)  # a 12-bit scan in 16 bits
    Image.fromarray(values).save(tmp_path / "scan.png")
    assert Image.open(tmp_path / "scan.png").mode.startswith("I")
    pixels = np.asarray(open_rgb(tmp_path / "scan.png"))
    assert pixels.shape == (8, 8, 3) and pixels.dtype == np.uint8
    assert pixels.min() == 0 and pixels.max() == 255
    assert (pixels[..., 0] == pixels[..., 1]).all()


@pytest.mark.parametrize("dtype", [np.int32, np.float32])
def test_32bit_integer_and_float_images_are_scaled(tmp_path, dtype):
    values = np.arange(64, dtype=dtype).reshape(8, 8) * 1000 - 5000
    Image.fromarray(values).save(tmp_path / "scan.tif")
    pixels = np.asarray(open_rgb(tmp_path / "scan.tif"))
    assert pixels.min() == 0 and pixels.max() == 255


def test_flat_16bit_image_keeps_its_clipped_value(tmp_path):
    Image.fromarray(np.full((4, 4), 40, dtype=np.uint16)).save(tmp_path / "flat.png")
    assert open_rgb(tmp_path / "flat.png").getpixel((0, 0)) == (40, 40, 40)


def test_rgba_and_la_are_composited_on_black(tmp_path, kit):
    assert open_rgb(kit.save_image(tmp_path / "a.png", "RGBA")).getpixel((0, 0)) == (100, 15, 15)
    assert open_rgb(kit.save_image(tmp_path / "b.png", "LA")).getpixel((0, 0)) == (60, 60, 60)


def test_palette_with_transparency_is_composited_on_black(tmp_path):
    img = Image.new("P", (4, 4), 1)
    img.putpalette([255, 255, 255, 10, 200, 10] + [0] * 762)
    img.putpixel((0, 0), 0)
    img.save(tmp_path / "p.png", transparency=0)
    rgb = open_rgb(tmp_path / "p.png")
    assert rgb.mode == "RGB"
    assert rgb.getpixel((0, 0)) == (0, 0, 0)  # the transparent white pixel
    assert rgb.getpixel((1, 1)) == (10, 200, 10)


@pytest.mark.parametrize(("mode", "name", "expected"), [
    ("CMYK", "c.tif", (255, 0, 0)), ("CMYK", "c.jpg", None), ("P", "p.gif", None),
    ("L", "l.png", (120, 120, 120)), ("1", "b.png", (255, 255, 255)),
])
def test_other_modes_become_rgb(tmp_path, kit, mode, name, expected):
    img = open_rgb(kit.save_image(tmp_path / name, mode))
    assert img.mode == "RGB"
    if expected is not None:
        assert img.getpixel((0, 0)) == expected


def test_missing_and_zero_byte_files(tmp_path):
    assert check_image(tmp_path / "nope.png") == "missing file"
    (tmp_path / "empty.jpg").write_bytes(b"")
    assert check_image(tmp_path / "empty.jpg") == "zero-byte file"
    assert check_image(tmp_path) == "not a regular file"


def test_text_file_named_jpg_is_not_an_image(tmp_path):
    (tmp_path / "fake.jpg").write_text("this is a caption, not a picture")
    assert check_image(tmp_path / "fake.jpg") == "not an image"


def test_truncated_jpeg_is_rejected(tmp_path):
    noise = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(noise).save(tmp_path / "full.jpg", quality=95)
    data = (tmp_path / "full.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 2])
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False
    assert check_image(tmp_path / "cut.jpg").startswith("truncated or corrupt image: ")


def test_corrupt_png_data_is_rejected(tmp_path, kit):
    data = bytearray(kit.save_image(tmp_path / "a.png", size=(32, 32)).read_bytes())
    start = data.index(b"IDAT") + 4
    data[start:start + 8] = b"\x00" * 8
    (tmp_path / "bad.png").write_bytes(bytes(data))
    assert check_image(tmp_path / "bad.png").startswith("truncated or corrupt image: ")


def test_huge_image_is_rejected_before_decoding_without_pil_warning(tmp_path, kit, recwarn):
    assert check_image(kit.png_header_only(tmp_path / "big.png", 10_000, 10_000)) == "image too large: 10000x10000"
    # Beyond PIL's own hard limit the reason still says what is wrong.
    assert check_image(kit.png_header_only(tmp_path / "bomb.png", 30_000, 30_000)).startswith("image too large")
    assert not [w for w in recwarn if issubclass(w.category, Image.DecompressionBombWarning)]


def test_max_pixels_is_configurable(tmp_path, kit):
    path = kit.save_image(tmp_path / "a.png", size=(20, 10))
    assert check_image(path, max_pixels=199) == "image too large: 20x10"
    assert check_image(path, max_pixels=200) is None


def test_open_rgb_raises_a_clipmed_error_with_the_reason(tmp_path):
    with pytest.raises(ClipmedError, match="missing file") as info:
        open_rgb(tmp_path / "nope.png")
    assert isinstance(info.value, ImageError) and info.value.reason == "missing file"
    assert str(pickle.loads(pickle.dumps(info.value))) == f"{tmp_path / 'nope.png'}: missing file"
