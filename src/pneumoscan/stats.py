"""Numbers from labels and scores: metrics, bootstrap confidence intervals, ECE, Brier, sigmoid.

Every function is pure: ``(y_true, y_score[, threshold]) -> numbers``. Label 1 (PNEUMONIA) is the
positive class throughout.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

METRIC_NAMES: tuple[str, ...] = (
    "accuracy", "roc_auc", "f1_weighted", "sensitivity", "specificity", "ppv", "npv", "loss",
)
_EPS = 1e-7


def sigmoid(z: np.ndarray | float) -> np.ndarray:
    """Numerically stable logistic function (float64)."""
    z = np.asarray(z, dtype=np.float64)
    e = np.exp(-np.abs(z))
    return np.where(z >= 0, 1 / (1 + e), e / (1 + e))


def _counts(y_true: np.ndarray, y_pred: np.ndarray) -> tuple[np.ndarray, ...]:
    """tn, fp, fn, tp along the last axis (works on one vector or a stack of resamples)."""
    t = y_true.astype(bool)
    p = y_pred.astype(bool)
    tp = np.sum(t & p, axis=-1)
    tn = np.sum(~t & ~p, axis=-1)
    fp = np.sum(~t & p, axis=-1)
    fn = np.sum(t & ~p, axis=-1)
    return tn, fp, fn, tp


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / np.maximum(den, 1), np.nan)


def _threshold_metrics(y_true: np.ndarray, y_score: np.ndarray, threshold: float) -> dict[str, np.ndarray]:
    """Every metric except AUC, vectorised over leading axes."""
    y_pred = y_score >= threshold
    tn, fp, fn, tp = _counts(y_true, y_pred)
    n = tn + fp + fn + tp
    pos, neg = tp + fn, tn + fp
    f1_pos = _ratio(2 * tp, 2 * tp + fp + fn)
    f1_neg = _ratio(2 * tn, 2 * tn + fn + fp)
    f1_weighted = (np.nan_to_num(f1_pos) * pos + np.nan_to_num(f1_neg) * neg) / n
    p = np.clip(y_score, _EPS, 1 - _EPS)
    loss = -np.mean(np.where(y_true.astype(bool), np.log(p), np.log(1 - p)), axis=-1)
    return {
        "accuracy": (tp + tn) / n,
        "f1_weighted": f1_weighted,
        "sensitivity": _ratio(tp, pos),
        "specificity": _ratio(tn, neg),
        "ppv": _ratio(tp, tp + fp),
        "npv": _ratio(tn, tn + fn),
        "loss": loss,
    }


def _auc(y_true: np.ndarray, y_score: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score  # here, so that serving starts without scikit-learn

    return float(roc_auc_score(y_true, y_score)) if 0 < y_true.sum() < len(y_true) else math.nan


@dataclass(frozen=True)
class Estimate:
    """A point estimate with its 95% bootstrap interval."""

    value: float
    ci_low: float
    ci_high: float

    def as_dict(self) -> dict[str, float | None]:
        return {k: (None if math.isnan(v) else round(v, 6)) for k, v in
                (("value", self.value), ("ci_low", self.ci_low), ("ci_high", self.ci_high))}


def proportion(successes: int, n: int) -> Estimate:
    """A proportion with its 95% Wilson score interval (nan when ``n`` is 0)."""
    if n == 0:
        return Estimate(math.nan, math.nan, math.nan)
    from scipy.stats import binomtest

    interval = binomtest(int(successes), int(n)).proportion_ci(confidence_level=0.95, method="wilson")
    return Estimate(successes / n, float(interval.low), float(interval.high))


def point_metrics(y_true: Sequence[int], y_score: Sequence[float], *,
                  threshold: float | np.ndarray) -> dict[str, float]:
    """Every metric in METRIC_NAMES at ``threshold`` (one for all, or one per image)."""
    y = np.asarray(y_true, dtype=np.int64)
    s = np.asarray(y_score, dtype=np.float64)
    values = {k: float(v) for k, v in _threshold_metrics(y, s, threshold).items()}
    values["roc_auc"] = _auc(y, s)
    return {name: values[name] for name in METRIC_NAMES}


def bootstrap_metrics(y_true: Sequence[int], y_score: Sequence[float], *, threshold: float | np.ndarray,
                      n_boot: int = 2000, seed: int = 0, level: float = 0.95) -> dict[str, Estimate]:
    """Point estimates and percentile bootstrap intervals (images resampled with replacement).

    ``threshold`` is one for all images, or one per image (cross-fitted calibrations), resampled
    with its image.

    Raises:
        ValueError: no predictions.
    """
    y = np.asarray(y_true, dtype=np.int64)
    s = np.asarray(y_score, dtype=np.float64)
    if len(y) == 0:
        raise ValueError("no predictions to evaluate")
    threshold = np.asarray(threshold, dtype=np.float64) if np.ndim(threshold) else float(threshold)
    point = point_metrics(y, s, threshold=threshold)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(y), size=(n_boot, len(y)))
    cut = threshold[idx] if np.ndim(threshold) else threshold
    boot = _threshold_metrics(y[idx], s[idx], cut)
    boot["roc_auc"] = np.array([_auc(y[i], s[i]) for i in idx])
    alpha = (1 - level) / 2
    result = {}
    for name in METRIC_NAMES:
        samples = boot[name][~np.isnan(boot[name])]
        if samples.size == 0:
            low = high = math.nan
        else:
            low, high = (float(q) for q in np.quantile(samples, [alpha, 1 - alpha]))
        result[name] = Estimate(point[name], low, high)
    return result


def confusion_matrix(y_true: Sequence[int], y_score: Sequence[float], *,
                     threshold: float | np.ndarray) -> dict[str, int]:
    """``{"tn", "fp", "fn", "tp"}`` with PNEUMONIA as the positive class."""
    tn, fp, fn, tp = _counts(np.asarray(y_true), np.asarray(y_score) >= threshold)
    return {"tn": int(tn), "fp": int(fp), "fn": int(fn), "tp": int(tp)}


def expected_calibration_error(y_true: Sequence[int], prob: Sequence[float], *, n_bins: int = 15) -> float:
    """Top-label ECE (Guo et al. 2017): confidence max(p, 1-p) in ``n_bins`` equal-width bins."""
    y = np.asarray(y_true, dtype=np.int64)
    p = np.asarray(prob, dtype=np.float64)
    predicted = (p >= 0.5).astype(np.int64)
    confidence = np.where(predicted == 1, p, 1 - p)
    correct = (predicted == y).astype(np.float64)
    edges = np.linspace(0.5, 1.0, n_bins + 1)
    bins = np.clip(np.digitize(confidence, edges[1:-1], right=True), 0, n_bins - 1)
    ece = 0.0
    for b in range(n_bins):
        mask = bins == b
        if mask.any():
            ece += mask.mean() * abs(correct[mask].mean() - confidence[mask].mean())
    return float(ece)


def reliability_bins(y_true: Sequence[int], prob: Sequence[float], *, n_bins: int = 15) -> tuple[list[float], list[float]]:
    """(mean predicted P, observed positive rate) of each non-empty equal-width bin of P."""
    y = np.asarray(y_true, dtype=np.float64)
    p = np.asarray(prob, dtype=np.float64)
    edges = np.linspace(0, 1, n_bins + 1)
    bins = np.clip(np.digitize(p, edges[1:-1], right=True), 0, n_bins - 1)
    xs, ys = [], []
    for b in range(n_bins):
        mask = bins == b
        if mask.any():
            xs.append(float(p[mask].mean()))
            ys.append(float(y[mask].mean()))
    return xs, ys


def brier_score(y_true: Sequence[int], prob: Sequence[float]) -> float:
    """Mean squared error of P(pneumonia) against the 0/1 label."""
    y = np.asarray(y_true, dtype=np.float64)
    return float(np.mean((np.asarray(prob, dtype=np.float64) - y) ** 2))
