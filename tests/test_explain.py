"""Grad-CAM: maps, overlays, the chest-share warning, CLI and API."""

from __future__ import annotations

import base64
import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from conftest import image_bytes, make_xray
from pneumoscan.cli import app
from pneumoscan.heatmap import DISPLAY_WIDTH, central_share, overlay
from pneumoscan.inference import Predictor


def test_central_share() -> None:
    cam = np.zeros((100, 100), dtype=np.float32)
    cam[40:60, 40:60] = 1.0
    assert central_share(cam) == 1.0
    cam[:, :] = 0.0
    cam[0:5, 0:5] = 1.0  # a corner label, not lungs
    assert central_share(cam) == 0.0
    assert central_share(np.zeros((10, 10))) == 1.0


def test_explain_gives_a_map_and_releases_hooks(tiny_bundle: Path) -> None:
    predictor = Predictor.from_bundle(tiny_bundle)
    explanation = predictor.explain(make_xray(5, pneumonia=True))
    size = predictor.spec.input_size
    assert explanation.cam.shape == (size, size)
    assert 0.0 <= explanation.cam.min() and explanation.cam.max() <= 1.0
    assert 0.0 <= explanation.central_share <= 1.0
    layer = dict(predictor.model.named_modules())[predictor.spec.cam_layer]
    assert not layer._forward_hooks and not layer._backward_hooks
    # predictions are unchanged by explaining (no state leaks into the model)
    before = predictor.predict([make_xray(6)])[0].probability
    predictor.explain(make_xray(6))
    assert predictor.predict([make_xray(6)])[0].probability == pytest.approx(before, abs=1e-7)


def test_overlay_keeps_the_image_size() -> None:
    image = make_xray(1, size=(90, 70))
    cam = np.random.default_rng(0).random((64, 64)).astype(np.float32)
    out = overlay(image, cam, opacity=0.5)
    assert out.size == image.size and out.mode == "RGB"
    assert not np.array_equal(np.asarray(out)[..., 0], np.asarray(out)[..., 2])  # colour was added


def test_explain_cli_writes_overlays(tiny_bundle: Path, xray_root: Path, tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["explain", "--model", str(tiny_bundle), str(xray_root / "test" / "NORMAL"),
                                      "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    written = sorted(tmp_path.glob("*.gradcam.png"))
    assert len(written) == 6 and all(f"-> {tmp_path}" in line for line in result.output.splitlines())
    png = Image.open(written[0])
    source = Image.open(xray_root / "test" / "NORMAL" / written[0].name.replace(".gradcam.png", ".jpeg"))
    # the overlay is drawn at display width (as on the page: an 8000^2 film is not overlaid at full
    # size) in the film's own aspect ratio; a caption strip (label, probability, threshold, colour
    # scale) is added below it
    film_height = round(DISPLAY_WIDTH * source.height / source.width)
    assert png.mode == "RGB" and png.width == DISPLAY_WIDTH and png.height > film_height
    assert np.asarray(png)[film_height // 2, :, :].std() > 0  # the film fills the width: no strip beside it


def test_api_explain_returns_a_png(client) -> None:
    data = {"file": [(io.BytesIO(image_bytes(make_xray(3))), "x.png")], "explain": "true"}
    result = client.post("/api/v1/predict", data=data, content_type="multipart/form-data").get_json()["results"][0]
    png = base64.b64decode(result["gradcam_png"])
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert 0.0 <= result["gradcam_central_share"] <= 1.0
    plain = client.post("/api/v1/predict", data={"file": [(io.BytesIO(image_bytes(make_xray(3))), "x.png")]},
                        content_type="multipart/form-data").get_json()["results"][0]
    assert "gradcam_png" not in plain
    assert plain["probability_pneumonia"] == result["probability_pneumonia"]


def test_upload_page_shows_the_heatmap(client) -> None:
    data = {"file": [(io.BytesIO(image_bytes(make_xray(4))), "y.png")], "explain": "true"}
    page = client.post("/", data=data, content_type="multipart/form-data").get_data(as_text=True)
    # The X-ray and the heatmap come as separate layers, so the page can toggle and fade the heatmap.
    assert 'class="xray" src="data:image/png;base64,' in page
    assert 'class="heatmap" src="data:image/png;base64,' in page
    assert 'class="cam-opacity"' in page and 'class="cam-legend"' in page
    assert "may be using something other than the lungs" not in page  # the unmeasured warning is gone
    # the film is drawn at its own aspect ratio, DISPLAY_WIDTH wide, the heatmap at the same size
    film = Image.open(io.BytesIO(base64.b64decode(page.split('class="xray" src="data:image/png;base64,')[1].split('"')[0])))
    layer = Image.open(io.BytesIO(base64.b64decode(page.split('class="heatmap" src="data:image/png;base64,')[1].split('"')[0])))
    source = make_xray(4)
    assert film.width == DISPLAY_WIDTH >= 448 and layer.size == film.size
    assert abs(film.height / film.width - source.height / source.width) < 0.01


def test_the_heatmap_is_hidden_by_default_on_normal_results(client, app) -> None:
    from dataclasses import replace

    predictor = app.extensions["pneumoscan"]
    for threshold, label, checked in ((1.0, "NORMAL", False), (0.0, "PNEUMONIA", True)):
        predictor.spec = predictor.spec.replace(decision=replace(predictor.decision, threshold=threshold,
                                                                  operating_points={"balanced": threshold}))
        data = {"file": [(io.BytesIO(image_bytes(make_xray(4))), "y.png")], "explain": "true"}
        page = client.post("/", data=data, content_type="multipart/form-data").get_data(as_text=True)
        assert f'<p class="label">{label}</p>' in page
        toggle = page.split('class="cam-toggle"')[1].split(">")[0]
        assert ("checked" in toggle) is checked
        assert ("so the map is hidden" in page) is (label == "NORMAL")


def test_explain_cli_skips_what_the_gate_refuses(tiny_bundle: Path, xray_root: Path, tmp_path: Path) -> None:
    import numpy as np
    from PIL import Image

    photo = tmp_path / "in" / "holiday.jpg"
    photo.parent.mkdir()
    Image.fromarray(np.random.default_rng(2).integers(0, 255, (100, 100, 3), dtype=np.uint8)).save(photo)
    film = next((xray_root / "test" / "NORMAL").iterdir())
    result = CliRunner().invoke(app, ["explain", str(photo), str(film), "--model", str(tiny_bundle),
                                      "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    assert "holiday.jpg: rejected by the input gate (colour_image); no heatmap" in result.output
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [f"{film.stem}.gradcam.png"]
    forced = CliRunner().invoke(app, ["explain", str(photo), "--no-gate", "--model", str(tiny_bundle),
                                      "--out", str(tmp_path / "forced")])
    assert forced.exit_code == 0 and (tmp_path / "forced" / "holiday.gradcam.png").is_file()


def test_a_large_jpeg_is_drawn_from_a_display_scale_decode(client, monkeypatch) -> None:
    """The network's input decodes at the scale covering its input size; the page's film is
    decoded again at the scale covering the display width, so a 512-px overlay is not upsampled."""
    import pneumoscan.web.uploads as uploads

    film = make_xray(5, size=(2400, 2000))  # smooth: well under the test app's 2 MB upload limit
    calls = []
    original = uploads.decode_image

    def recording(data, **kwargs):
        image = original(data, **kwargs)
        calls.append((kwargs.get("draft_size"), image.size))
        return image

    monkeypatch.setattr(uploads, "decode_image", recording)
    data = {"file": [(io.BytesIO(image_bytes(film, "JPEG")), "big.jpg")], "explain": "true", "force": "true"}
    page = client.post("/", data=data, content_type="multipart/form-data").get_data(as_text=True)
    assert calls == [(DISPLAY_WIDTH, (1200, 1000))]  # 1/2: the smallest DCT scale covering 512 px both ways
    shown = Image.open(io.BytesIO(base64.b64decode(page.split('class="xray" src="data:image/png;base64,')[1].split('"')[0])))
    assert shown.size == (DISPLAY_WIDTH, round(DISPLAY_WIDTH * 2000 / 2400))
