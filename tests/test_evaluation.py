"""pneumoscan.evaluation: metrics against scikit-learn, bootstrap intervals, the report."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from sklearn import metrics as skm

from pneumoscan.evaluation import (
    METRIC_NAMES,
    bootstrap_metrics,
    confusion_matrix,
    evaluate_folder,
    point_metrics,
    youden_threshold,
)


@pytest.fixture()
def scores() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 300)
    s = np.clip(0.35 * y + rng.normal(0.35, 0.2, 300), 0.001, 0.999)
    return y, s


@pytest.mark.parametrize("threshold", [0.3, 0.5, 0.62])
def test_point_metrics_match_sklearn(scores, threshold: float) -> None:
    y, s = scores
    pred = (s >= threshold).astype(int)
    got = point_metrics(y, s, threshold=threshold)
    tn, fp, fn, tp = skm.confusion_matrix(y, pred).ravel()
    assert got["accuracy"] == pytest.approx(skm.accuracy_score(y, pred))
    assert got["roc_auc"] == pytest.approx(skm.roc_auc_score(y, s))
    assert got["f1_weighted"] == pytest.approx(skm.f1_score(y, pred, average="weighted"))
    assert got["sensitivity"] == pytest.approx(skm.recall_score(y, pred))
    assert got["specificity"] == pytest.approx(skm.recall_score(y, pred, pos_label=0))
    assert got["ppv"] == pytest.approx(skm.precision_score(y, pred))
    assert got["npv"] == pytest.approx(skm.precision_score(y, pred, pos_label=0))
    assert got["loss"] == pytest.approx(skm.log_loss(y, s))
    assert confusion_matrix(y, s, threshold=threshold) == {"tn": tn, "fp": fp, "fn": fn, "tp": tp}


def test_bootstrap_intervals_bracket_the_estimate(scores) -> None:
    y, s = scores
    result = bootstrap_metrics(y, s, threshold=0.5, n_boot=500, seed=1)
    assert set(result) == set(METRIC_NAMES)
    for name, est in result.items():
        assert est.ci_low <= est.value <= est.ci_high, name
        assert est.ci_high - est.ci_low > 0, name
    # more data -> narrower interval
    big = bootstrap_metrics(np.tile(y, 10), np.tile(s, 10), threshold=0.5, n_boot=300, seed=1)
    width = lambda e: e.ci_high - e.ci_low  # noqa: E731
    assert width(big["accuracy"]) < width(result["accuracy"])
    again = bootstrap_metrics(y, s, threshold=0.5, n_boot=500, seed=1)
    assert again == result


def test_youden_threshold_separates_perfectly() -> None:
    y = np.array([0, 0, 0, 1, 1, 1])
    s = np.array([0.1, 0.2, 0.3, 0.7, 0.8, 0.9])
    t = youden_threshold(y, s)
    assert 0.3 < t <= 0.7
    assert point_metrics(y, s, threshold=t)["accuracy"] == 1.0


def test_evaluate_folder_writes_the_report(tiny_bundle: Path, xray_root: Path, tmp_path: Path) -> None:
    metrics = evaluate_folder(tiny_bundle, xray_root, "test", tmp_path, n_boot=200)
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved == metrics
    assert saved["n"] == 12 and saved["n_by_class"] == {"NORMAL": 6, "PNEUMONIA": 6}
    for name in METRIC_NAMES:
        assert set(saved[name]) == {"value", "ci_low", "ci_high"}
    cm = saved["confusion_matrix"]
    assert sum(cm.values()) == 12
    lines = (tmp_path / "predictions.csv").read_text().splitlines()
    assert lines[0] == "path,true_label,label,probability_pneumonia,threshold,error" and len(lines) == 13
    assert set(saved["operating_points"]) == {"balanced", "high_sensitivity", "high_specificity"}
    assert saved["operating_point"] == "balanced"
    assert saved["operating_points"]["balanced"]["accuracy"] == saved["accuracy"]
    assert {"ece_15_before", "ece_15_after", "brier_before", "brier_after"} <= set(saved["calibration"])
    for name in ("roc.png", "confusion.png", "reliability.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = (tmp_path / "report.md").read_text()
    assert "n = 12" in report and "roc_auc" in report and "high_specificity" in report


def test_temperature_scaling_recovers_a_known_temperature() -> None:
    from pneumoscan.evaluation import expected_calibration_error, fit_temperature, sigmoid

    rng = np.random.default_rng(0)
    true_log_odds = rng.normal(0, 2.0, 20000)
    y = (rng.random(20000) < sigmoid(true_log_odds)).astype(int)
    overconfident = true_log_odds * 3.0  # a network 3x too sure of itself
    temperature = fit_temperature(y, overconfident)
    assert temperature == pytest.approx(3.0, rel=0.08)
    assert expected_calibration_error(y, sigmoid(overconfident / temperature)) < 0.5 * \
        expected_calibration_error(y, sigmoid(overconfident))


def test_operating_points_meet_their_targets(scores) -> None:
    from pneumoscan.evaluation import operating_thresholds

    y, s = scores
    points = operating_thresholds(y, s)
    assert set(points) == {"balanced", "high_sensitivity", "high_specificity"}
    assert point_metrics(y, s, threshold=points["high_sensitivity"])["sensitivity"] >= 0.95
    assert point_metrics(y, s, threshold=points["high_specificity"])["specificity"] >= 0.95
    assert points["high_sensitivity"] <= points["balanced"] <= points["high_specificity"]


def test_calibrate_on_validation_reports_every_point() -> None:
    from pneumoscan.evaluation import brier_score, calibrate_on_validation, sigmoid

    rng = np.random.default_rng(1)
    true_log_odds = rng.normal(0.5, 1.5, 3000)
    y = (rng.random(3000) < sigmoid(true_log_odds)).astype(int)
    log_odds = true_log_odds * 2.5
    result = calibrate_on_validation(y, log_odds)
    assert result.temperature > 1.5  # the scores were made overconfident by 2.5x
    report = result.report
    assert report["ece_15_after"] < report["ece_15_before"]
    assert report["brier_after"] <= report["brier_before"] + 1e-9
    assert set(report["operating_points"]) == set(result.operating_points)
    assert brier_score([0, 1], [0.0, 1.0]) == 0.0


def test_evaluate_the_bundles_own_validation_split(tiny_bundle: Path, xray_root: Path, tmp_path: Path) -> None:
    from pneumoscan.models import read_spec

    metrics = evaluate_folder(tiny_bundle, xray_root, "validation", tmp_path, n_boot=100)
    assert metrics["n"] == read_spec(tiny_bundle).val_metrics["n"]
    assert metrics["split"] == "validation"
