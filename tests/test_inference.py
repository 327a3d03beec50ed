"""pneumoscan.inference.Predictor: preprocessing -> runner -> gate -> decision, one Result type."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageOps

from conftest import make_xray
from pneumoscan.errors import ConfigError
from pneumoscan.inference import Predictor, Result
from pneumoscan.stats import sigmoid


@pytest.fixture(scope="module")
def predictor(tiny_bundle: Path) -> Predictor:
    return Predictor.from_bundle(tiny_bundle)


def _photo(seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (96, 96, 3), dtype=np.uint8))


def test_predict_applies_preprocessing_network_and_decision(predictor: Predictor) -> None:
    images = [make_xray(i, pneumonia=i % 2 == 1) for i in range(4)]
    results = predictor.predict(images, names=[f"film{i}" for i in range(4)])
    log_odds, _ = predictor.forward(np.stack([predictor.preprocessing.pixels(im) for im in images]))
    decision = predictor.decision
    for result, z in zip(results, log_odds):
        assert isinstance(result, Result) and result.status == "ok" and result.reasons == ()
        assert result.log_odds == pytest.approx(float(z))
        assert result.probability == pytest.approx(float(sigmoid(z / decision.temperature)))
        assert (result.threshold, result.operating_point) == (decision.threshold, decision.default_operating_point)
        expected = "PNEUMONIA" if result.probability >= result.threshold else "NORMAL"
        assert result.label == expected
    assert [r.name for r in results] == [f"film{i}" for i in range(4)]
    assert predictor.predict([]) == []


def test_threshold_and_operating_point_choices(predictor: Predictor) -> None:
    image = make_xray(3)
    custom = predictor.predict([image], threshold=0.0)[0]
    assert custom.label == "PNEUMONIA" and custom.operating_point == "custom" and custom.threshold == 0.0
    assert predictor.predict([image], threshold=1.0)[0].label == ("PNEUMONIA" if custom.probability >= 1.0 else "NORMAL")
    named = predictor.predict([image], operating_point="high_specificity")[0]
    assert named.threshold == predictor.decision.operating_points["high_specificity"]
    for bad in ({"threshold": 1.5}, {"threshold": float("nan")}, {"operating_point": "aggressive"}):
        with pytest.raises(ConfigError):
            predictor.predict([image], **bad)
        with pytest.raises(ConfigError):
            predictor.predict_paths([], **bad)  # fails before any file is read


def test_the_gate_refuses_with_reasons_and_no_label(predictor: Predictor) -> None:
    refused, film = predictor.predict([_photo(), make_xray(5, size=(96, 96))])
    assert refused.status == "rejected" and refused.reasons == ("colour_image",)
    assert refused.label is None and refused.probability is None
    assert film.status == "ok"
    ungated = predictor.predict([_photo()], gate=False)[0]
    assert ungated.status == "ok" and ungated.label is not None and ungated.reasons == ("colour_image",)
    # the colour check sees the image itself, whatever produced it
    assert predictor.predict([_photo().convert("RGBA")])[0].reasons == ("colour_image",)


def test_predict_paths_keeps_order_reports_errors_and_batches_alike(predictor: Predictor, xray_root: Path,
                                                                   tmp_path: Path, monkeypatch) -> None:
    films = sorted((xray_root / "test").rglob("*.jpeg"))[:5]
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    missing = tmp_path / "missing.jpeg"
    paths = [films[0], broken, *films[1:3], missing, *films[3:]]
    results = predictor.predict_paths(paths, batch_size=2)
    assert [r.name for r in results] == [str(p) for p in paths]
    assert [r.status for r in results] == ["ok", "error", "ok", "ok", "error", "ok", "ok"]
    assert results[1].error_code == "invalid_image" and "broken.png" in results[1].error
    assert "cannot read the file" in results[4].error and results[4].label is None
    whole = predictor.predict_paths(films, batch_size=32)
    # (batch composition moves float32 convolutions in the last digits only)
    assert [r.probability for r in whole] == pytest.approx([r.probability for r in results if r.status == "ok"], abs=1e-6)
    # a memory bound on waiting decoded images flushes early and changes nothing
    monkeypatch.setattr("pneumoscan.inference.MAX_PENDING_PIXELS", 1)
    assert [r.probability for r in predictor.predict_paths(films)] == pytest.approx([r.probability for r in whole], abs=1e-6)
    # and the same files as decoded images give the same answers
    images = [predictor.preprocessing.load(p) for p in films]
    assert [r.probability for r in predictor.predict(images)] == pytest.approx([r.probability for r in whole], abs=1e-6)


def test_tta_averages_the_image_and_its_mirror(tiny_bundle: Path) -> None:
    plain = Predictor.from_bundle(tiny_bundle)
    tta = Predictor.from_bundle(tiny_bundle, tta=True)
    image = make_xray(9, pneumonia=True)
    both = [plain.predict([im])[0].log_odds for im in (image, ImageOps.mirror(image))]
    assert tta.predict([image])[0].log_odds == pytest.approx(sum(both) / 2, abs=1e-5)


def test_explain_gives_a_map_at_input_size(predictor: Predictor) -> None:
    explanation = predictor.explain(make_xray(11, pneumonia=True))
    size = predictor.spec.input_size
    assert explanation.cam.shape == (size, size)
    assert 0.0 <= explanation.cam.min() and explanation.cam.max() <= 1.0
    assert 0.0 <= explanation.central_share <= 1.0
