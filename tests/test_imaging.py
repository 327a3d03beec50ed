"""pneumoscan.imaging: decoding any file to grey, and the one square preprocessing."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import image_bytes, make_xray
from pneumoscan.errors import InvalidImageError
from pneumoscan.imaging import Preprocessing, decode_image, square_resize
from pneumoscan.models import normalize


def test_decode_modes_all_become_8bit_grey() -> None:
    grey = make_xray(1)
    rgb = grey.convert("RGB")
    rgba = grey.convert("RGBA")
    wide = Image.fromarray(np.asarray(grey).astype(np.uint16) * 257)
    for image, fmt in ((grey, "PNG"), (rgb, "JPEG"), (rgba, "PNG"), (wide, "PNG"), (grey.convert("P"), "PNG")):
        decoded = decode_image(image_bytes(image, fmt))
        assert decoded.mode == "L" and decoded.size == grey.size
    # 16-bit is stretched to its own min..max range
    g = np.asarray(grey, float)
    expected = (g - g.min()) * 255.0 / (g.max() - g.min())
    assert np.abs(np.asarray(decode_image(image_bytes(wide)), float) - expected).max() <= 1.0


def test_decode_rejects_bad_input() -> None:
    with pytest.raises(InvalidImageError, match="empty"):
        decode_image(b"")
    with pytest.raises(InvalidImageError) as not_image:
        decode_image(b"%PDF-1.4 not an image at all")
    assert not_image.value.http_status == 415
    truncated = image_bytes(make_xray(2), "JPEG")[:200]
    with pytest.raises(InvalidImageError) as corrupt:
        decode_image(truncated, name="x.jpg")
    assert corrupt.value.http_status == 422 and "x.jpg" in str(corrupt.value)
    gif = image_bytes(make_xray(3), "GIF")
    with pytest.raises(InvalidImageError, match="GIF"):
        decode_image(gif)


def test_decode_refuses_too_many_pixels_before_decoding() -> None:
    with pytest.raises(InvalidImageError) as exc:
        decode_image(image_bytes(make_xray(4)), max_pixels=100)
    assert exc.value.http_status == 413


def test_square_resize_and_normalize() -> None:
    pixels = torch.from_numpy(square_resize(make_xray(5, size=(300, 120)), 48))
    assert pixels.shape == (1, 48, 48) and pixels.dtype == torch.uint8
    x = normalize(pixels.unsqueeze(0), (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    assert x.shape == (1, 3, 48, 48) and x.dtype == torch.float32
    assert -1.0 <= x.min() and x.max() <= 1.0
    torch.testing.assert_close(x[0, 0], pixels[0].float() / 127.5 - 1.0)


def test_equalize_maps_any_exposure_of_an_image_to_the_same_pixels() -> None:
    # Eight grey levels, so a strictly increasing intensity map merges none of them: histogram
    # equalisation must then give the same pixels for the original and its re-exposed copy.
    levels = np.random.default_rng(0).integers(0, 8, size=(64, 64))
    original = Image.fromarray((levels * 20 + 30).astype(np.uint8))
    dark_low_contrast = original.point(lambda v: (v - 30) // 4 + 5)
    gamma = original.point(lambda v: round(255 * (v / 255) ** 0.5))
    equalized = square_resize(original, 64, equalize=True)
    assert np.array_equal(square_resize(dark_low_contrast, 64, equalize=True), equalized)
    assert np.array_equal(square_resize(gamma, 64, equalize=True), equalized)
    assert not np.array_equal(square_resize(dark_low_contrast, 64), square_resize(original, 64))
    assert equalized.max() == 255  # spread over the full range, unlike the input's 30..170
    assert np.array_equal(square_resize(original, 64, equalize=False), square_resize(original, 64))


def test_preprocessing_reads_files_as_serving_decodes_bytes(tmp_path) -> None:
    path = tmp_path / "film.jpeg"
    make_xray(8, size=(300, 260)).save(path, quality=92)
    preprocessing = Preprocessing(size=64, equalize=True)
    from_file = preprocessing.read(path)
    from_bytes = preprocessing.pixels(preprocessing.decode(path.read_bytes(), name="film.jpeg"))
    assert from_file.shape == (1, 64, 64) and from_file.dtype == np.uint8
    assert np.array_equal(from_file, from_bytes)
    assert np.array_equal(preprocessing.pixels(make_xray(9)), square_resize(make_xray(9), 64, equalize=True))
    # a colour image is turned grey on the way in, not refused here (that is the gate's job)
    assert preprocessing.pixels(make_xray(9).convert("RGB")).shape == (1, 64, 64)


def test_exif_orientation_is_applied_when_decoding() -> None:
    """A film stored sideways with EXIF Orientation 8 decodes upright (not mirrored, not upside down)."""
    upright = Image.fromarray(np.tile(np.linspace(0, 200, 96, dtype=np.uint8), (64, 1)))  # dark left, bright right
    upright.paste(255, (4, 4, 20, 20))  # a mark in the top-left corner
    stored = upright.transpose(Image.Transpose.ROTATE_270)  # orientation 8 means: rotate 90° to view
    exif = Image.Exif()
    exif[0x0112] = 8
    import io

    buffer = io.BytesIO()
    stored.save(buffer, format="JPEG", quality=95, exif=exif)
    decoded = decode_image(buffer.getvalue())
    assert decoded.size == upright.size
    assert np.abs(np.asarray(decoded, float) - np.asarray(upright, float)).mean() < 3.0
    assert decode_image(image_bytes(stored, "JPEG")).size == stored.size  # without EXIF: as stored


def test_semi_transparent_png_is_composited_on_white() -> None:
    rgba = Image.new("RGBA", (80, 80), (0, 0, 0, 0))  # fully transparent
    half = Image.new("RGBA", (80, 80), (100, 100, 100, 128))
    assert np.asarray(decode_image(image_bytes(rgba))).min() == 255
    assert 170 < np.asarray(decode_image(image_bytes(half))).mean() < 185  # 100 over white at alpha 0.5
