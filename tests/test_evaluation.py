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
    for name in ("roc.png", "confusion.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = (tmp_path / "report.md").read_text()
    assert "n = 12" in report and "roc_auc" in report
