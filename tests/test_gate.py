"""The input gate's image checks, and 'rejected' results in the API."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from conftest import image_bytes, make_xray
from pneumoscan.gate import FeatureGate, image_reasons, screen
from pneumoscan.imaging import decode_image


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
    assert rejected["status"] == "rejected" and rejected["reasons"] == ["colour_image"]
    assert set(rejected) == {"filename", "status", "reasons", "messages", "image_sha256"}
    assert rejected["messages"] == ["a colour image; radiographs are greyscale"]
    assert ok["status"] == "ok"
    page = client.post("/", data={"file": [(io.BytesIO(image_bytes(photo, "JPEG")), "holiday.jpg")]},
                       content_type="multipart/form-data").get_data(as_text=True)
    assert "The input gate refused this film" in page and 'data-reason="colour_image"' in page
    assert "a colour image; radiographs are greyscale" in page
    assert 'class="thumbnail" src="data:image/png;base64,' in page and 'class="analyse-anyway"' in page


def _document_page() -> Image.Image:
    """Black lines of text on a white, A4-shaped page."""
    from PIL import ImageDraw

    page = Image.new("L", (300, 420), 250)
    draw = ImageDraw.Draw(page)
    for row in range(24):
        draw.text((20, 20 + row * 16), "Findings: no focal consolidation. Invoice total 42.00", fill=10)
    return page


def test_feature_gate_fits_on_the_bundles_split_and_refuses_strangers(tiny_bundle, xray_root, tmp_path) -> None:
    import json

    from typer.testing import CliRunner

    from pneumoscan.cli import app
    from pneumoscan.errors import BundleError
    from pneumoscan.inference import Predictor
    from pneumoscan.models import read_spec

    result = CliRunner().invoke(app, ["fit-gate", "--data", str(xray_root), "--model", str(tiny_bundle),
                                      "--out", str(tmp_path / "gated")])
    assert result.exit_code == 0, result.output
    spec = read_spec(tmp_path / "gated")
    assert spec.weights_sha256 == read_spec(tiny_bundle).weights_sha256 and spec.gate.n_train > 0
    predictor = Predictor.from_bundle(tmp_path / "gated")
    xray = predictor.predict([make_xray(77)])[0]
    noise = Image.fromarray(np.random.default_rng(3).integers(0, 255, (80, 80), dtype=np.uint8))
    stranger = predictor.predict([noise])[0]
    assert stranger.distance > xray.distance
    assert stranger.status == "rejected" and stranger.reasons == ("out_of_distribution",)
    assert stranger.label is None and stranger.probability is None  # a refusal is not a diagnosis
    # A grey document passes every image check (grey, contrasty, page-shaped): only the feature gate sees it.
    document = _document_page()
    assert image_reasons(document) == []
    assert predictor.predict([document])[0].reasons == ("out_of_distribution",)
    # the gate file is checked like the weights
    gate_file = tmp_path / "gated" / "gate.safetensors"
    gate_file.write_bytes(gate_file.read_bytes()[:-8] + b"\x00" * 8)
    with pytest.raises(BundleError, match="gate.safetensors"):
        Predictor.from_bundle(tmp_path / "gated")
    assert json.loads((tmp_path / "gated" / "model.json").read_text())["gate"]["quantile"] == 0.995
    # every new gate is measured on the synthetic documents and screenshots, and says when it is weak
    synthetic = spec.gate.synthetic_non_xrays
    assert synthetic["n"] == 80 and 0 <= synthetic["refused"] <= 80
    assert f"refuses {synthetic['refused']} of 80 synthetic" in result.output
    assert ("warning: this gate refuses fewer than 99%" in result.output) == (synthetic["refused"] < 79.2)


def test_synthetic_non_xrays_are_deterministic_and_pass_every_image_check() -> None:
    from pneumoscan.imaging import decode_image
    from pneumoscan.nonxray import synthetic_non_xrays

    first = synthetic_non_xrays()
    assert len(first) == 80 and first == synthetic_non_xrays()
    assert {name.split("/")[0] for name in first} == {"document", "screenshot"}
    # only the feature gate can refuse them, which is why they measure it
    assert all(image_reasons(decode_image(data)) == [] for data in first.values())


def test_colour_check_works_on_images_from_any_source() -> None:
    """The colour check used to see only what decode_image recorded in Image.info."""
    rng = np.random.default_rng(5)
    photo = Image.fromarray(rng.integers(0, 255, (96, 96, 3), dtype=np.uint8))
    assert "colour_image" in image_reasons(photo)  # an RGB image straight from Pillow
    assert "colour_image" in image_reasons(photo.convert("RGBA"))
    assert "colour_image" in image_reasons(decode_image(image_bytes(photo)))  # decoded to grey, source known
    assert image_reasons(make_xray(6, size=(96, 96)).convert("RGB")) == []  # grey in an RGB container


def test_screen_asks_the_feature_gate_only_when_the_image_checks_pass() -> None:
    gate = FeatureGate(mean=np.zeros(4), precision=np.eye(4), threshold=3.0)
    xray = make_xray(7, size=(96, 96))
    near, far = np.array([1.0, 0, 0, 0]), np.array([0, 4.0, 0, 0])
    assert screen(xray, near, gate).reasons == () and screen(xray, near, gate).distance == pytest.approx(1.0)
    assert screen(xray, far, gate).reasons == ("out_of_distribution",)
    tiny = make_xray(8, size=(40, 40))
    assert screen(tiny, far, gate).reasons == ("too_small",)  # image reasons first, alone
    assert screen(xray, far, None).reasons == () and screen(xray, None, gate).distance is None


def test_polarity_detector_refuses_negative_films_with_their_own_reason(tmp_path) -> None:
    rng = np.random.default_rng(9)
    upright = rng.normal(0, 1, (300, 6))
    inverted = upright + np.array([0, 0, 3.0, 0, 0, 0])  # near in distance, on the other side of a plane
    gate = FeatureGate.fit(upright, upright[:50], quantile=0.99, inverted_features=inverted[::2])
    assert gate.inverted(inverted).mean() > 0.9 and gate.inverted(upright).mean() < 0.1
    xray = make_xray(10, size=(96, 96))
    assert screen(xray, inverted[1], gate).reasons == ("inverted_image",)
    assert screen(xray, upright[1], gate).reasons == ()
    gate.save(tmp_path / "gate.safetensors")  # the detector travels with the gate file
    loaded = FeatureGate.load(tmp_path / "gate.safetensors")
    assert np.array_equal(loaded.inverted(inverted), gate.inverted(inverted))


def test_a_cross_fitted_limit_holds_on_new_films_where_six_validation_films_cannot_set_one() -> None:
    """40 training and 6 validation films of 64 features: the limit from a quantile of the 6
    validation distances depends on which 6; the cross-fitted one (out-of-fold distances over all
    46) refuses few new films from the same distribution, and every film far from it."""
    from pneumoscan.gate import FeatureGate

    rng = np.random.default_rng(0)
    mixing = rng.normal(size=(64, 64)) / 8

    def films(n: int, shift: float = 0.0) -> np.ndarray:
        return rng.normal(size=(n, 64)) @ mixing + shift

    train, val, new, far = films(40), films(6), films(2000), films(200, shift=3.0)
    crossed = FeatureGate.fit(train, val, quantile=0.995, cross_fit_folds=5)
    assert np.isfinite(crossed.threshold)
    # the same statistics as the plain fit: only the limit differs
    plain = FeatureGate.fit(train, val, quantile=0.995)
    np.testing.assert_allclose(crossed.mean, plain.mean)
    assert crossed.threshold > plain.threshold  # near the largest of 6 distances: a low quantile of new films'
    assert np.mean(crossed.distances(new) > crossed.threshold) < 0.05
    assert np.mean(plain.distances(new) > plain.threshold) > 0.2  # the 6-film limit refuses many real films
    assert np.all(crossed.distances(far) > crossed.threshold)
