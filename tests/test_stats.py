"""pneumoscan.stats: metrics against scikit-learn, bootstrap intervals, ECE, sigmoid."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn import metrics as skm

from pneumoscan.stats import (
    METRIC_NAMES,
    bootstrap_metrics,
    brier_score,
    confusion_matrix,
    expected_calibration_error,
    point_metrics,
    sigmoid,
)


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


def test_sigmoid_is_stable_and_exact() -> None:
    z = np.array([-800.0, -30.0, -1.0, 0.0, 1.0, 30.0, 800.0])
    p = sigmoid(z)
    assert np.all(np.isfinite(p)) and p[0] == 0.0 and p[-1] == 1.0 and p[3] == 0.5
    assert p[2] == pytest.approx(1 / (1 + np.e)) and p[4] == pytest.approx(np.e / (1 + np.e))
    assert np.allclose(p + sigmoid(-z), 1.0)


def test_ece_and_brier_on_known_cases() -> None:
    assert brier_score([0, 1], [0.0, 1.0]) == 0.0
    assert brier_score([0, 1], [1.0, 0.0]) == 1.0
    # always 90% sure and right 90% of the time: calibrated; right half the time: ECE 0.4
    y = np.array([1] * 9 + [0])
    assert expected_calibration_error(y, np.full(10, 0.9)) == pytest.approx(0.0)
    assert expected_calibration_error(np.array([1, 0] * 5), np.full(10, 0.9)) == pytest.approx(0.4)
