"""The input gate's image checks, and 'rejected' results in the API."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from conftest import image_bytes, make_xray
from pneumoscan.data import decode_image
from pneumoscan.gate import image_reasons


def _reasons(image: Image.Image, fmt: str = "PNG") -> list[str]:
    return image_reasons(decode_image(image_bytes(image, fmt)))


def test_xrays_pass_in_every_encoding() -> None:
    xray = make_xray(1, size=(96, 80))
    for image, fmt in ((xray, "PNG"), (xray, "JPEG"), (xray.convert("RGB"), "JPEG"), (xray.convert("RGBA"), "PNG")):
        assert _reasons(image, fmt) == [], (image.mode, fmt)


def test_each_check_fires() -> None:
    rng = np.random.default_rng(0)
    photo = Image.fromarray(rng.integers(0, 255, (96, 96, 3), dtype=np.uint8))
    red = Image.new("RGB", (96, 96), (200, 30, 30))
    assert "colour_image" in _reasons(photo, "JPEG")
    assert "colour_image" in _reasons(red) and "blank_or_constant" in _reasons(red)
    assert _reasons(Image.new("L", (100, 100), 128)) == ["blank_or_constant"]
    assert _reasons(make_xray(2, size=(40, 40))) == ["too_small"]
    assert _reasons(make_xray(3, size=(400, 100))) == ["extreme_aspect_ratio"]


def test_api_rejects_a_photo_but_predicts_the_xray(client) -> None:
    rng = np.random.default_rng(1)
    photo = Image.fromarray(rng.integers(0, 255, (120, 120, 3), dtype=np.uint8))
    files = [(io.BytesIO(image_bytes(photo, "JPEG")), "holiday.jpg"), (io.BytesIO(image_bytes(make_xray(4))), "x.png")]
    response = client.post("/api/v1/predict", data={"file": files}, content_type="multipart/form-data")
    assert response.status_code == 200
    rejected, ok = response.get_json()["results"]
    assert rejected == {"filename": "holiday.jpg", "status": "rejected", "reasons": ["colour_image"]}
    assert ok["status"] == "ok"
    page = client.post("/", data={"file": [(io.BytesIO(image_bytes(photo, "JPEG")), "holiday.jpg")]},
                       content_type="multipart/form-data").get_data(as_text=True)
    assert "does not look like a chest radiograph" in page and "colour image" in page
