"""pneumoscan.calibration: temperature scaling, operating points, the Decision it produces."""

from __future__ import annotations

import numpy as np
import pytest

from pneumoscan.calibration import (
    THRESHOLD_SOURCE,
    calibrate_on_validation,
    fit_temperature,
    operating_thresholds,
    youden_threshold,
)
from pneumoscan.stats import expected_calibration_error, point_metrics, sigmoid


def test_youden_threshold_separates_perfectly() -> None:
    y = np.array([0, 0, 0, 1, 1, 1])
    s = np.array([0.1, 0.2, 0.3, 0.7, 0.8, 0.9])
    t = youden_threshold(y, s)
    assert 0.3 < t <= 0.7
    assert point_metrics(y, s, threshold=t)["accuracy"] == 1.0


def test_temperature_scaling_recovers_a_known_temperature() -> None:
    rng = np.random.default_rng(0)
    true_log_odds = rng.normal(0, 2.0, 20000)
    y = (rng.random(20000) < sigmoid(true_log_odds)).astype(int)
    overconfident = true_log_odds * 3.0  # a network 3x too sure of itself
    temperature = fit_temperature(y, overconfident)
    assert temperature == pytest.approx(3.0, rel=0.08)
    assert expected_calibration_error(y, sigmoid(overconfident / temperature)) < 0.5 * \
        expected_calibration_error(y, sigmoid(overconfident))


def test_operating_points_meet_their_targets(scores) -> None:
    y, s = scores
    points = operating_thresholds(y, s)
    assert set(points) == {"balanced", "high_sensitivity", "high_specificity"}
    assert point_metrics(y, s, threshold=points["high_sensitivity"])["sensitivity"] >= 0.95
    assert point_metrics(y, s, threshold=points["high_specificity"])["specificity"] >= 0.95
    assert points["high_sensitivity"] <= points["balanced"] <= points["high_specificity"]


def test_calibrate_on_validation_reports_every_point() -> None:
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


def test_calibration_yields_the_bundles_decision() -> None:
    rng = np.random.default_rng(2)
    y = rng.integers(0, 2, 400)
    log_odds = (2 * y - 1) * 3.0 + rng.normal(0, 2.0, 400)
    result = calibrate_on_validation(y, log_odds)
    decision = result.decision
    assert decision.threshold_source == THRESHOLD_SOURCE
    assert decision.calibration == "temperature_scaling_on_validation"
    assert decision.threshold == decision.operating_points["balanced"]
    # the Decision's probability is the calibrated one the operating points were chosen on
    assert np.allclose(decision.probability(log_odds), sigmoid(log_odds / result.temperature))
    assert decision.threshold_for("high_sensitivity") == (decision.operating_points["high_sensitivity"],
                                                          "high_sensitivity")
    metrics = result.validation_metrics(n_by_class={"NORMAL": 1})
    assert metrics["n"] == 400 and metrics["n_by_class"] == {"NORMAL": 1}
    assert metrics["accuracy"] == result.report["operating_points"]["balanced"]["accuracy"]
