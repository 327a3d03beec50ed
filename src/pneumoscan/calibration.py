"""What validation decides: temperature scaling, the named operating points and the review band.

Training (when it writes a bundle) and the bundle tools (``pneumoscan calibrate``) both call
:func:`calibrate_on_validation`; nothing else fits a temperature or chooses a threshold. Never fit
on test.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple, Sequence

import numpy as np

from pneumoscan.spec import Decision
from pneumoscan.stats import brier_score, expected_calibration_error, point_metrics, sigmoid

OPERATING_POINTS: tuple[str, ...] = ("balanced", "high_sensitivity", "high_specificity")
#: How ``balanced`` is chosen (recorded in the bundle; bundles before it say "validation_youden").
THRESHOLD_SOURCE = "validation_prevalence_likelihood_ratio"
#: The sensitivity (specificity) that ``high_sensitivity`` (``high_specificity``) keeps on validation.
TARGET = 0.95
#: Accuracy the review band keeps outside itself (pre-registered as R1 in MODEL_CARD.md).
REVIEW_TARGET = 0.98
#: A film whose gate distance is beyond this share of the gate's limit is flagged for review
#: (7 of 525 validation films for the bundled model, where the limit itself refuses 3).
REVIEW_DISTANCE_FRACTION = 0.9


def youden_threshold(y_true: Sequence[int], y_score: Sequence[float]) -> float:
    """The threshold maximising sensitivity + specificity - 1 (Youden's J) on these scores."""
    from sklearn.metrics import roc_curve

    y_true = np.asarray(y_true)
    if len(np.unique(y_true)) < 2:
        return 0.5
    fpr, tpr, thresholds = roc_curve(y_true, y_score)
    best = int(np.argmax(tpr - fpr))
    return float(np.clip(thresholds[best], 0.0, 1.0))


def fit_temperature(y_true: Sequence[int], log_odds: Sequence[float]) -> float:
    """Temperature T minimising the NLL of sigmoid(log_odds / T) (temperature scaling)."""
    from scipy.optimize import minimize_scalar

    y = np.asarray(y_true, dtype=np.float64)
    z = np.asarray(log_odds, dtype=np.float64)

    def nll(log_t: float) -> float:
        scaled = z / np.exp(log_t)
        # log(1 + exp(-s)) written stably for both signs
        return float(np.mean(np.logaddexp(0, -scaled) * y + np.logaddexp(0, scaled) * (1 - y)))

    result = minimize_scalar(nll, bounds=(-3.0, 3.0), method="bounded")
    return float(np.exp(result.x))


def balanced_threshold(y_true: Sequence[int]) -> float:
    """The prior-free threshold on calibrated P(pneumonia): the calibration set's prevalence.

    Calling pneumonia when the calibrated posterior odds exceed the prior odds is calling it when
    the likelihood ratio exceeds 1, whatever the prevalence where the model is used. It is also
    where Youden's J computed with the calibrated probabilities as soft labels peaks. Unlike
    Youden's J on hard labels, it does not depend on the few images at the edge of the gap
    between the classes: on the carved validation split, which separates the classes almost
    perfectly, every threshold in that gap has the same J, so J alone picks an arbitrary one.
    """
    y = np.asarray(y_true, dtype=np.float64)
    return float(y.mean()) if 0 < y.sum() < len(y) else 0.5


def operating_thresholds(y_true: Sequence[int], prob: Sequence[float], *, target: float = TARGET) -> dict[str, float]:
    """Thresholds on calibrated P(pneumonia) chosen on (validation) scores.

    ``balanced``: :func:`balanced_threshold`. ``high_sensitivity``: the most specific threshold
    whose sensitivity is >= ``target``; ``high_specificity``: the most sensitive threshold whose
    specificity is >= ``target``. Each is clamped to the far side of ``balanced`` so the names
    keep their meaning: high_sensitivity never calls less pneumonia than balanced does.
    """
    from sklearn.metrics import roc_curve

    y = np.asarray(y_true, dtype=np.int64)
    p = np.asarray(prob, dtype=np.float64)
    fpr, tpr, thresholds = roc_curve(y, p)
    thresholds = np.clip(thresholds, 0.0, 1.0)
    sensitive = np.flatnonzero(tpr >= target)
    specific = np.flatnonzero(1 - fpr >= target)
    balanced = balanced_threshold(y)
    high_sensitivity = float(thresholds[sensitive[0]]) if sensitive.size else 0.0
    high_specificity = float(thresholds[specific[-1]]) if specific.size else 1.0
    return {
        "balanced": balanced,
        "high_sensitivity": min(high_sensitivity, balanced),
        "high_specificity": max(high_specificity, balanced),
    }


def review_band(y_true: Sequence[int], prob: Sequence[float], threshold: float, *,
                target: float = REVIEW_TARGET, step: float = 0.1) -> dict[str, Any]:
    """The band of calibrated P(pneumonia) around ``threshold`` inside which a person should review.

    It starts where the calibrated probability that the label is wrong exceeds ``1 - target``:
    ``(1 - target, target)``, widened to include ``threshold``. Only if this sample's accuracy
    outside that band is below ``target`` is it widened, symmetrically in log-odds by ``step``,
    until it is not. The start depends on the temperature (fitted on every image), not on where
    a near-separable validation split's few errors fall, so it does not jump from one split to
    the next; the widening is what keeps the stated accuracy when calibration is optimistic.
    """
    from scipy.special import logit

    y = np.asarray(y_true, dtype=np.int64)
    p = np.asarray(prob, dtype=np.float64)
    correct = (p >= threshold).astype(np.int64) == y
    low0, high0 = min(1 - target, threshold), max(target, threshold)
    edge = 1e-9
    widen = 0.0
    while True:
        low = float(sigmoid(logit(max(low0, edge)) - widen))
        high = float(sigmoid(logit(min(high0, 1 - edge)) + widen))
        outside = (p <= low) | (p >= high)
        accuracy = float(correct[outside].mean()) if outside.any() else 1.0  # nothing outside: done
        if accuracy >= target:
            break
        widen += step
    return {"low": round(low, 6), "high": round(high, 6), "target_accuracy": target,
            "distance_fraction": REVIEW_DISTANCE_FRACTION, "widened_log_odds": round(widen, 3),
            "n": int(len(y)), "coverage": round(float(outside.mean()), 6) if len(y) else None,
            "accuracy_outside": round(accuracy, 6)}


@dataclass(frozen=True)
class Calibration:
    """The bundle's new decision part and the validation figures behind it."""

    decision: Decision
    report: dict[str, Any]

    @property
    def temperature(self) -> float:
        return self.decision.temperature

    @property
    def operating_points(self) -> dict[str, float]:
        return dict(self.decision.operating_points)

    def validation_metrics(self, **extra: Any) -> dict[str, Any]:
        """``BundleSpec.val_metrics``: the balanced point's figures, n, the whole report, and ``extra``."""
        return {**self.report["operating_points"]["balanced"], "n": self.report["n"], **extra,
                "calibration": self.report}


def calibrate_on_validation(y_true: Sequence[int], log_odds: Sequence[float], *,
                            fit_scale: bool = True) -> Calibration:
    """Fit temperature scaling, then choose the operating points and the review band on calibrated
    probabilities. ``fit_scale=False`` keeps the temperature at 1 (too few validation images to
    fit it: a temperature fitted on 3 + 3 films made ECE worse)."""
    y = np.asarray(y_true, dtype=np.int64)
    z = np.asarray(log_odds, dtype=np.float64)
    temperature = fit_temperature(y, z) if fit_scale else 1.0
    raw, calibrated = sigmoid(z), sigmoid(z / temperature)
    points = operating_thresholds(y, calibrated)
    report = {
        "n": int(len(y)),
        "temperature": round(temperature, 6),
        "ece_15_before": round(expected_calibration_error(y, raw), 6),
        "ece_15_after": round(expected_calibration_error(y, calibrated), 6),
        "brier_before": round(brier_score(y, raw), 6),
        "brier_after": round(brier_score(y, calibrated), 6),
        "operating_points": {
            name: {"threshold": round(t, 6),
                   **{k: round(v, 6) for k, v in point_metrics(y, calibrated, threshold=t).items()}}
            for name, t in points.items()
        },
    }
    review = review_band(y, calibrated, points["balanced"])
    report["review"] = review
    decision = Decision(threshold=points["balanced"], threshold_source=THRESHOLD_SOURCE,
                        temperature=temperature,
                        calibration="temperature_scaling_on_validation" if fit_scale else "none (too few validation images)",
                        operating_points=points, default_operating_point="balanced", review=review)
    return Calibration(decision, report)


class CrossFit(NamedTuple):
    """What :func:`cross_fitted` returns, per image unless said otherwise."""

    prob: np.ndarray  # calibrated P(pneumonia), by the calibration that did not see the image
    threshold: np.ndarray  # that calibration's default threshold
    decisions: list[Decision]  # one per fold
    band: np.ndarray  # ``n x 2``: that calibration's review band (low, high)


def cross_fitted(y_true: Sequence[int], log_odds: Sequence[float], *, folds: int, seed: int = 0) -> CrossFit:
    """Site calibration measured honestly: ``folds`` stratified folds, each predicted by a
    calibration (:func:`calibrate_on_validation`: temperature, threshold, review band) fitted on
    the other folds only.

    Raises:
        ConfigError: ``folds`` below 2 or above the smaller class's count.
    """
    from sklearn.model_selection import StratifiedKFold

    from pneumoscan.errors import ConfigError

    y = np.asarray(y_true, dtype=np.int64)
    z = np.asarray(log_odds, dtype=np.float64)
    smallest = int(min(np.sum(y == 0), np.sum(y == 1)))
    if not 2 <= folds <= smallest:
        raise ConfigError(f"--site-folds must be between 2 and the smaller class's count ({smallest}), got {folds}")
    prob, threshold, band = np.empty(len(y)), np.empty(len(y)), np.empty((len(y), 2))
    decisions = []
    for fit_idx, held_idx in StratifiedKFold(folds, shuffle=True, random_state=seed).split(z, y):
        decision = calibrate_on_validation(y[fit_idx], z[fit_idx]).decision
        prob[held_idx] = decision.probability(z[held_idx])
        threshold[held_idx] = decision.threshold
        band[held_idx] = (decision.review["low"], decision.review["high"])
        decisions.append(decision)
    return CrossFit(prob, threshold, decisions, band)
