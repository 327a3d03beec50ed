"""The review flag: the band chosen with the calibration, per-result reasons, force, evaluate's figures."""

from __future__ import annotations

import io
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import image_bytes, make_xray


def test_the_band_starts_where_the_calibrated_chance_of_a_wrong_label_exceeds_the_target() -> None:
    from pneumoscan.calibration import review_band

    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 400)
    p = np.where(y == 1, rng.uniform(0.9, 1.0, 400), rng.uniform(0.0, 0.1, 400))  # separable
    band = review_band(y, p, 0.5, target=0.98)
    assert (band["low"], band["high"]) == (pytest.approx(0.02), pytest.approx(0.98))
    assert band["widened_log_odds"] == 0 and band["accuracy_outside"] == 1.0
    assert band["coverage"] == pytest.approx(np.mean((p <= 0.02) | (p >= 0.98)), abs=1e-6)
    # a threshold outside (0.02, 0.98) is always inside the band
    assert review_band(y, p, 0.99)["high"] == pytest.approx(0.99)


def test_the_band_widens_until_the_calibration_set_reaches_the_target() -> None:
    from pneumoscan.calibration import review_band

    rng = np.random.default_rng(1)
    y = np.r_[np.ones(300, int), np.zeros(30, int), np.zeros(300, int)]
    # 30 normal films the model calls pneumonia with P 0.981-0.99: confident and wrong
    p = np.r_[rng.uniform(0.995, 1.0, 300), rng.uniform(0.981, 0.99, 30), rng.uniform(0.0, 0.01, 300)]
    band = review_band(y, p, 0.5, target=0.98)
    assert band["widened_log_odds"] > 0 and band["high"] > 0.98 and band["low"] < 0.02  # symmetric in log-odds
    assert band["accuracy_outside"] >= 0.98
    outside = (p <= band["low"]) | (p >= band["high"])
    assert ((p >= 0.5).astype(int) == y)[outside].mean() == pytest.approx(band["accuracy_outside"], abs=1e-6)


def test_review_reasons_cover_the_band_the_threshold_in_use_and_the_gate_margin() -> None:
    from pneumoscan.spec import Decision

    decision = Decision(threshold=0.5, review={"low": 0.1, "high": 0.9, "target_accuracy": 0.98,
                                               "distance_fraction": 0.9})
    assert decision.review_reasons(0.5, 0.5) == ("uncertain_probability",)
    assert decision.review_reasons(0.95, 0.5) == ()
    assert decision.review_reasons(0.95, 0.97) == ("uncertain_probability",)  # band widened to the threshold
    assert decision.review_reasons(0.01, 0.5, distance=95.0, gate_limit=100.0) == ("near_gate_limit",)
    assert decision.review_reasons(0.01, 0.5, distance=85.0, gate_limit=100.0) == ()
    assert Decision().review_reasons(0.5, 0.5) == ()  # a bundle calibrated before the band: no flag


def test_a_bundle_with_an_impossible_band_is_refused(tiny_bundle: Path, tmp_path: Path) -> None:
    from pneumoscan.errors import BundleError
    from pneumoscan.integrity import read_spec, rewrite_bundle

    spec = read_spec(tiny_bundle)
    bad = spec.replace(decision=replace(spec.decision, review={**spec.decision.review, "low": 0.9, "high": 0.1}))
    rewrite_bundle(tiny_bundle, bad, tmp_path / "b", extra_files={"split.csv": tiny_bundle / "split.csv"})
    with pytest.raises(BundleError, match="review band"):
        read_spec(tmp_path / "b")


def test_training_writes_the_band_into_the_bundle(tiny_bundle: Path) -> None:
    from pneumoscan.integrity import read_spec

    review = read_spec(tiny_bundle).decision.review
    assert review["target_accuracy"] == 0.98 and review["low"] <= read_spec(tiny_bundle).decision.threshold <= review["high"]
    assert 0 <= review["coverage"] <= 1 and review["n"] > 0


def _post(client, files, **fields):
    return client.post("/api/v1/predict", data={"file": files, **fields}, content_type="multipart/form-data")


def test_every_answer_says_whether_to_review_it(client, app) -> None:
    predictor = app.extensions["pneumoscan"]
    results = _post(client, [(io.BytesIO(image_bytes(make_xray(s))), f"{s}.png") for s in range(4)]).get_json()["results"]
    band = predictor.decision.review
    for r in results:
        p, t = r["probability_pneumonia"], r["threshold"]
        inside = min(band["low"], t) < p < max(band["high"], t)
        assert r["review_recommended"] is bool(r["review_reasons"])
        assert ("uncertain_probability" in r["review_reasons"]) is inside
    # a band over everything flags every answer, and the page says so plainly
    predictor.spec = predictor.spec.replace(decision=replace(predictor.decision, review={**band, "low": 0.0, "high": 1.0}))
    results = _post(client, [(io.BytesIO(image_bytes(make_xray(1))), "a.png")]).get_json()["results"]
    assert results[0]["review_recommended"] is True and results[0]["review_reasons"] == ["uncertain_probability"]
    page = client.post("/", data={"file": [(io.BytesIO(image_bytes(make_xray(1))), "a.png")]},
                       content_type="multipart/form-data").get_data(as_text=True)
    assert "<strong>Review recommended</strong>" in page and 'data-review-reason="uncertain_probability"' in page


def test_force_analyses_a_refused_film_and_marks_it_outside_the_gate(client) -> None:
    photo = Image.fromarray(np.random.default_rng(1).integers(0, 255, (120, 120, 3), dtype=np.uint8))
    refused = _post(client, [(io.BytesIO(image_bytes(photo, "JPEG")), "holiday.jpg")]).get_json()["results"][0]
    assert refused["status"] == "rejected" and "label" not in refused
    forced = _post(client, [(io.BytesIO(image_bytes(photo, "JPEG")), "holiday.jpg")], force="true").get_json()["results"][0]
    assert forced["status"] == "ok" and forced["label"] in ("NORMAL", "PNEUMONIA")
    assert forced["outside_gate"] is True and forced["gate_reasons"] == ["colour_image"]
    assert forced["review_recommended"] is True and "outside_gate" in forced["review_reasons"]
    assert forced["messages"] == ["a colour image; radiographs are greyscale"]
    page = client.post("/", data={"file": [(io.BytesIO(image_bytes(photo, "JPEG")), "holiday.jpg")], "force": "true"},
                       content_type="multipart/form-data").get_data(as_text=True)
    assert "Analysed outside the input gate" in page and 'data-review-reason="outside_gate"' in page
    # an ordinary film is not marked
    plain = _post(client, [(io.BytesIO(image_bytes(make_xray(2))), "x.png")], force="true").get_json()["results"][0]
    assert "outside_gate" not in plain and "outside_gate" not in plain["review_reasons"]


def test_out_of_distribution_reads_as_unusual_with_its_distance_and_limit() -> None:
    from pneumoscan.gate import describe_reason

    assert describe_reason("out_of_distribution", distance=38.6, limit=37.2).startswith(
        "unusual for this model (distance 38.6, limit 37.2)")
    assert "frontal" in describe_reason("lateral_view") and "inverted" in describe_reason("inverted_image")


def test_evaluate_reports_coverage_and_accuracy_outside_the_band(tiny_bundle: Path, xray_root: Path, tmp_path: Path) -> None:
    from pneumoscan.evaluation import evaluate_folder

    metrics = evaluate_folder(tiny_bundle, xray_root, "test", tmp_path, n_boot=200, site_folds=2)
    review = metrics["review"]
    assert review["available"] and review["fitted_on"] == "validation"
    band, y = review["probability_band"], metrics["n_by_class"]
    assert band["n"] == sum(y.values()) and 0 <= band["flagged"] <= band["n"]
    coverage = band["coverage"]
    assert coverage["value"] == pytest.approx(1 - band["flagged"] / band["n"], abs=1e-6)
    assert coverage["ci_low"] <= coverage["value"] <= coverage["ci_high"]
    assert review["any_reason"]["flagged"] >= band["flagged"]
    assert "review_band" in metrics["site_calibrated"]
    assert (tmp_path / "risk_coverage.png").stat().st_size > 1000
    assert "## Review flag" in (tmp_path / "report.md").read_text()
    assert json.loads((tmp_path / "metrics.json").read_text())["review"]["available"] is True
