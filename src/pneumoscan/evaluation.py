"""Metrics with bootstrap confidence intervals, plots, and the ``evaluate`` report.

The metric functions are pure: ``(y_true, y_score, threshold) -> numbers``. Plot functions
return a matplotlib Figure (Agg backend) and the caller saves it.
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Sequence

import numpy as np
from sklearn.metrics import roc_auc_score, roc_curve

METRIC_NAMES: tuple[str, ...] = (
    "accuracy", "roc_auc", "f1_weighted", "sensitivity", "specificity", "ppv", "npv", "loss",
)
_EPS = 1e-7


def youden_threshold(y_true: np.ndarray, y_score: np.ndarray) -> float:
    """The threshold maximising sensitivity + specificity - 1 (Youden's J) on these scores."""
    y_true = np.asarray(y_true)
    if len(np.unique(y_true)) < 2:
        return 0.5
    fpr, tpr, thresholds = roc_curve(y_true, y_score)
    best = int(np.argmax(tpr - fpr))
    return float(np.clip(thresholds[best], 0.0, 1.0))


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


def point_metrics(y_true: Sequence[int], y_score: Sequence[float], *, threshold: float) -> dict[str, float]:
    """Every metric in METRIC_NAMES at ``threshold`` (label 1 = pneumonia = positive)."""
    y = np.asarray(y_true, dtype=np.int64)
    s = np.asarray(y_score, dtype=np.float64)
    values = {k: float(v) for k, v in _threshold_metrics(y, s, threshold).items()}
    values["roc_auc"] = _auc(y, s)
    return {name: values[name] for name in METRIC_NAMES}


def bootstrap_metrics(y_true: Sequence[int], y_score: Sequence[float], *, threshold: float,
                      n_boot: int = 2000, seed: int = 0, level: float = 0.95) -> dict[str, Estimate]:
    """Point estimates and percentile bootstrap intervals (images resampled with replacement)."""
    y = np.asarray(y_true, dtype=np.int64)
    s = np.asarray(y_score, dtype=np.float64)
    if len(y) == 0:
        raise ValueError("no predictions to evaluate")
    point = point_metrics(y, s, threshold=threshold)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(y), size=(n_boot, len(y)))
    boot = _threshold_metrics(y[idx], s[idx], threshold)
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


def confusion_matrix(y_true: Sequence[int], y_score: Sequence[float], *, threshold: float) -> dict[str, int]:
    """``{"tn", "fp", "fn", "tp"}`` with PNEUMONIA as the positive class."""
    tn, fp, fn, tp = _counts(np.asarray(y_true), np.asarray(y_score) >= threshold)
    return {"tn": int(tn), "fp": int(fp), "fn": int(fn), "tp": int(tp)}


# ---------------------------------------------------------------------------------------------
# Calibration and operating points (all fitted on validation, never on test)

OPERATING_POINTS: tuple[str, ...] = ("balanced", "high_sensitivity", "high_specificity")


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


def brier_score(y_true: Sequence[int], prob: Sequence[float]) -> float:
    """Mean squared error of P(pneumonia) against the 0/1 label."""
    y = np.asarray(y_true, dtype=np.float64)
    return float(np.mean((np.asarray(prob, dtype=np.float64) - y) ** 2))


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


def operating_thresholds(y_true: Sequence[int], prob: Sequence[float], *, target: float = 0.95) -> dict[str, float]:
    """Thresholds on P(pneumonia) chosen on (validation) scores.

    ``balanced``: Youden's J. ``high_sensitivity``: the most specific threshold whose
    sensitivity is >= ``target``; ``high_specificity``: the most sensitive threshold whose
    specificity is >= ``target``. Each is clamped to the far side of ``balanced`` so the names
    keep their meaning: high_sensitivity never calls less pneumonia than balanced does.
    """
    y = np.asarray(y_true, dtype=np.int64)
    p = np.asarray(prob, dtype=np.float64)
    fpr, tpr, thresholds = roc_curve(y, p)
    thresholds = np.clip(thresholds, 0.0, 1.0)
    sensitive = np.flatnonzero(tpr >= target)
    specific = np.flatnonzero(1 - fpr >= target)
    balanced = youden_threshold(y, p)
    high_sensitivity = float(thresholds[sensitive[0]]) if sensitive.size else 0.0
    high_specificity = float(thresholds[specific[-1]]) if specific.size else 1.0
    return {
        "balanced": balanced,
        "high_sensitivity": min(high_sensitivity, balanced),
        "high_specificity": max(high_specificity, balanced),
    }


def sigmoid(z: np.ndarray) -> np.ndarray:
    """Numerically stable logistic function."""
    z = np.asarray(z, dtype=np.float64)
    return np.where(z >= 0, 1 / (1 + np.exp(-np.abs(z))), np.exp(-np.abs(z)) / (1 + np.exp(-np.abs(z))))


@dataclass(frozen=True)
class Calibration:
    """What validation decides: temperature, named thresholds, and the figures behind them."""

    temperature: float
    operating_points: dict[str, float]
    report: dict


def calibrate_on_validation(y_true: Sequence[int], log_odds: Sequence[float]) -> Calibration:
    """Fit temperature scaling, then choose the operating points on calibrated probabilities."""
    y = np.asarray(y_true, dtype=np.int64)
    z = np.asarray(log_odds, dtype=np.float64)
    temperature = fit_temperature(y, z)
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
    return Calibration(temperature, points, report)


# ---------------------------------------------------------------------------------------------
# Plots


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def reliability_figure(y_true: Sequence[int], prob_before: Sequence[float], prob_after: Sequence[float],
                       *, title: str, n_bins: int = 15):
    """Observed pneumonia rate against predicted P(pneumonia), before and after calibration."""
    plt = _pyplot()
    y = np.asarray(y_true, dtype=np.float64)
    edges = np.linspace(0, 1, n_bins + 1)
    fig, ax = plt.subplots(figsize=(5, 5), dpi=100)
    ax.plot([0, 1], [0, 1], ls="--", color="grey", lw=1, label="perfect calibration")
    for label, prob in (("before", prob_before), ("after", prob_after)):
        p = np.asarray(prob, dtype=np.float64)
        bins = np.clip(np.digitize(p, edges[1:-1], right=True), 0, n_bins - 1)
        xs, ys = [], []
        for b in range(n_bins):
            mask = bins == b
            if mask.any():
                xs.append(p[mask].mean())
                ys.append(y[mask].mean())
        ece = expected_calibration_error(y, p, n_bins=n_bins)
        ax.plot(xs, ys, marker="o", label=f"{label} temperature scaling (ECE {ece:.3f})")
    ax.set(xlabel="predicted P(pneumonia)", ylabel="observed pneumonia rate",
           title=f"{title} (n={len(y)})", xlim=(0, 1), ylim=(0, 1))
    ax.legend(loc="upper left")
    fig.tight_layout()
    return fig


def roc_figure(y_true: Sequence[int], y_score: Sequence[float], *, auc: Estimate, threshold: float,
               title: str):
    """ROC curve with the AUC and its CI, the operating point marked."""
    plt = _pyplot()
    y = np.asarray(y_true)
    s = np.asarray(y_score)
    fpr, tpr, _ = roc_curve(y, s)
    cm = confusion_matrix(y, s, threshold=threshold)
    fig, ax = plt.subplots(figsize=(5, 5), dpi=100)
    ax.plot(fpr, tpr, lw=2, label=f"AUC {auc.value:.3f} (95% CI {auc.ci_low:.3f}-{auc.ci_high:.3f})")
    ax.plot([0, 1], [0, 1], ls="--", color="grey", lw=1)
    op_fpr = cm["fp"] / max(cm["fp"] + cm["tn"], 1)
    op_tpr = cm["tp"] / max(cm["tp"] + cm["fn"], 1)
    ax.scatter([op_fpr], [op_tpr], color="red", zorder=3, label=f"threshold {threshold:.3f}")
    ax.set(xlabel="1 - specificity", ylabel="sensitivity", title=f"{title} (n={len(y)})",
           xlim=(0, 1), ylim=(0, 1.01))
    ax.legend(loc="lower right")
    fig.tight_layout()
    return fig


def confusion_figure(counts: dict[str, int], *, class_names: Sequence[str], title: str):
    """2x2 confusion matrix with counts and row percentages."""
    plt = _pyplot()
    matrix = np.array([[counts["tn"], counts["fp"]], [counts["fn"], counts["tp"]]])
    fig, ax = plt.subplots(figsize=(4.5, 4), dpi=100)
    ax.imshow(matrix, cmap="Blues")
    for (i, j), value in np.ndenumerate(matrix):
        share = value / max(matrix[i].sum(), 1)
        ax.text(j, i, f"{value}\n({share:.0%})", ha="center", va="center",
                color="white" if value > matrix.max() / 2 else "black")
    ax.set(xticks=[0, 1], yticks=[0, 1], xticklabels=class_names, yticklabels=class_names,
           xlabel="predicted", ylabel="true", title=f"{title} (n={matrix.sum()})")
    fig.tight_layout()
    return fig


def training_curves_figure(metrics_csvs: Sequence[Path]):
    """Loss and accuracy per epoch from Lightning CSVLogger files (later files win per epoch)."""
    plt = _pyplot()
    rows = [row for path in metrics_csvs for row in csv.DictReader(path.open())]
    series: dict[str, dict[int, float]] = {}
    for row in rows:
        if not row.get("epoch"):
            continue
        epoch = int(float(row["epoch"]))
        for key in ("train_loss_epoch", "val_loss", "train_acc", "val_acc"):
            if row.get(key):
                series.setdefault(key, {})[epoch] = float(row[key])
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(9, 3.5), dpi=100)
    for key, ax in (("train_loss_epoch", ax_loss), ("val_loss", ax_loss), ("train_acc", ax_acc), ("val_acc", ax_acc)):
        if key in series:
            epochs = sorted(series[key])
            ax.plot([e + 1 for e in epochs], [series[key][e] for e in epochs], marker="o",
                    label=key.replace("_epoch", ""))
    ax_loss.set(xlabel="epoch", ylabel="loss", title="loss")
    ax_acc.set(xlabel="epoch", ylabel="accuracy", title="accuracy")
    for ax in (ax_loss, ax_acc):
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


# ---------------------------------------------------------------------------------------------
# The evaluate command


def _estimates(y_true: np.ndarray, y_score: np.ndarray, threshold: float, *, n_boot: int,
               seed: int) -> dict:
    estimates = bootstrap_metrics(y_true, y_score, threshold=threshold, n_boot=n_boot, seed=seed)
    return {"threshold": threshold,
            **{name: estimates[name].as_dict() for name in METRIC_NAMES},
            "confusion_matrix": confusion_matrix(y_true, y_score, threshold=threshold)}


def evaluate_folder(model_dir: Path | None, data_root: Path, split: str, out_dir: Path, *,
                    n_boot: int = 2000, seed: int = 0, batch_size: int = 32,
                    operating_point: str | None = None, tta: bool = False, backend: str = "auto") -> dict:
    """Predict every image of ``data_root/split``, write the report files, return metrics.json.

    The top-level metrics are at the chosen operating point (the bundle's default unless
    given); ``operating_points`` repeats them at every named point of the bundle, and
    ``calibration`` gives ECE and Brier score with and without the bundle's temperature.

    ``split="validation"`` evaluates the bundle's own validation split (from its split.csv):
    the split its threshold and temperature were chosen on, so those figures are optimistic.

    Raises:
        DatasetError: the split or a class folder is missing or empty.
        BundleError: the bundle cannot be loaded.
        ConfigError: an unknown operating point.
    """
    from pneumoscan.data import CLASS_NAMES, scan_split
    from pneumoscan.inference import Predictor
    from pneumoscan.models import default_bundle_path

    predictor = Predictor.from_bundle(model_dir, tta=tta, backend=backend)
    if split == "validation":  # the bundle's own validation split (what it was tuned on)
        samples = split_samples(Path(model_dir or default_bundle_path()), data_root)
    else:
        samples = scan_split(data_root, split)
    spec = predictor.spec
    threshold, point_name = predictor.threshold_for(operating_point)
    outcomes = predictor.predict_paths([s.path for s in samples], batch_size=batch_size,
                                       threshold=threshold)
    failed = [o for o in outcomes if o.error is not None]
    kept = [(s, o) for s, o in zip(samples, outcomes) if o.error is None]
    y_true = np.array([s.label for s, _ in kept])
    y_score = np.array([o.probability for _, o in kept])
    y_raw = sigmoid(np.array([o.log_odds for _, o in kept]))
    metrics: dict = _estimates(y_true, y_score, threshold, n_boot=n_boot, seed=seed)
    metrics.update({
        "operating_point": point_name,
        "n": int(len(y_true)),
        "n_by_class": {name: int((y_true == i).sum()) for i, name in enumerate(CLASS_NAMES)},
        "n_unreadable": len(failed),
        "threshold_source": spec.threshold_source,
        "operating_points": {name: _estimates(y_true, y_score, t, n_boot=n_boot, seed=seed)
                             for name, t in predictor.operating_points.items()},
        "calibration": {
            "method": spec.calibration, "temperature": spec.temperature,
            "ece_15_before": round(expected_calibration_error(y_true, y_raw), 6),
            "ece_15_after": round(expected_calibration_error(y_true, y_score), 6),
            "brier_before": round(brier_score(y_true, y_raw), 6),
            "brier_after": round(brier_score(y_true, y_score), 6),
        },
        "tta": tta,
        "split": split,
        "data": str(data_root),
        "model": {"name": spec.name, "backbone": spec.backbone, "weights_sha256": spec.weights_sha256},
        "ci": {"method": "percentile bootstrap over images", "level": 0.95, "resamples": n_boot,
               "seed": seed},
    })
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    with (out_dir / "predictions.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(("path", "true_label", "label", "probability_pneumonia", "threshold", "error"))
        for s, o in zip(samples, outcomes):
            writer.writerow((s.path, CLASS_NAMES[s.label], o.label or "",
                             "" if o.probability is None else f"{o.probability:.6f}", threshold,
                             o.error or ""))
    title = f"{spec.name} on {split}"
    auc = Estimate(**{k: (math.nan if v is None else v) for k, v in metrics["roc_auc"].items()})
    plt = _pyplot()
    for name, fig in (
            ("roc.png", roc_figure(y_true, y_score, auc=auc, threshold=threshold, title=title)),
            ("confusion.png", confusion_figure(metrics["confusion_matrix"], class_names=CLASS_NAMES, title=title)),
            ("reliability.png", reliability_figure(y_true, y_raw, y_score, title=title))):
        fig.savefig(out_dir / name)
        plt.close(fig)
    (out_dir / "report.md").write_text(render_report(metrics, failed=[o.path for o in failed]))
    return metrics


def render_report(metrics: dict, *, failed: Sequence[str] = ()) -> str:
    """A readable Markdown summary of metrics.json."""
    cm = metrics["confusion_matrix"]
    lines = [
        f"# Evaluation of {metrics['model']['name']} on the {metrics['split']} split",
        "",
        f"- data: `{metrics['data']}`",
        f"- n = {metrics['n']} images ({', '.join(f'{k} {v}' for k, v in metrics['n_by_class'].items())})",
        f"- operating point: {metrics['operating_point']}, threshold on calibrated P(pneumonia): "
        f"{metrics['threshold']:.4f} ({metrics['threshold_source']})",
        f"- test-time augmentation (flip averaging): {'on' if metrics['tta'] else 'off'}",
        f"- 95% intervals: percentile bootstrap, {metrics['ci']['resamples']} resamples of images",
        "",
        "| metric | value | 95% CI |",
        "|---|---:|---:|",
    ]
    def fmt(v: float | None) -> str:
        return "n/a" if v is None else f"{v:.3f}"

    for name in METRIC_NAMES:
        m = metrics[name]
        lines.append(f"| {name} | {fmt(m['value'])} | {fmt(m['ci_low'])} - {fmt(m['ci_high'])} |")
    lines += [
        "",
        "Confusion matrix (rows true, columns predicted):",
        "",
        "| | pred NORMAL | pred PNEUMONIA |",
        "|---|---:|---:|",
        f"| NORMAL | {cm['tn']} | {cm['fp']} |",
        f"| PNEUMONIA | {cm['fn']} | {cm['tp']} |",
        "",
        "![ROC](roc.png) ![confusion](confusion.png)",
        "",
        "## Every operating point (thresholds chosen on validation)",
        "",
        "| operating point | threshold | " + " | ".join(METRIC_NAMES) + " |",
        "|---|---:|" + "---:|" * len(METRIC_NAMES),
    ]
    for name, point in metrics["operating_points"].items():
        cells = [f"{fmt(point[m]['value'])} ({fmt(point[m]['ci_low'])}-{fmt(point[m]['ci_high'])})"
                 for m in METRIC_NAMES]
        lines.append(f"| {name} | {point['threshold']:.4f} | " + " | ".join(cells) + " |")
    cal = metrics["calibration"]
    lines += [
        "",
        f"## Calibration ({cal['method']}, temperature {cal['temperature']:.3f})",
        "",
        "| | before | after |",
        "|---|---:|---:|",
        f"| ECE (15 bins) | {cal['ece_15_before']:.4f} | {cal['ece_15_after']:.4f} |",
        f"| Brier score | {cal['brier_before']:.4f} | {cal['brier_after']:.4f} |",
        "",
        "![reliability](reliability.png)",
        "",
    ]
    if failed:
        lines += [f"{len(failed)} file(s) could not be read and are left out:", ""]
        lines += [f"- `{p}`" for p in failed] + [""]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Re-calibrating an existing bundle on its own validation split


def split_samples(bundle_dir: Path, data_root: Path, *, role: str = "val") -> list:
    """The bundle's validation (or ``role="train"``) images, from its ``split.csv``, under ``data_root``.

    Raises:
        BundleError: the bundle has no split.csv.
        DatasetError: a listed image is missing under ``data_root``.
    """
    from pneumoscan.data import CLASS_NAMES, Sample
    from pneumoscan.errors import BundleError, DatasetError

    split_csv = bundle_dir / "split.csv"
    if not split_csv.is_file():
        raise BundleError(f"{bundle_dir} has no split.csv, so its validation split is unknown")
    samples = []
    for row in csv.DictReader(split_csv.open()):
        if row["role"] != role:
            continue
        path = data_root / row["path"]
        if not path.is_file():
            raise DatasetError(f"{path} (listed in {split_csv}) does not exist; is --data the "
                               "folder the model was trained on?")
        samples.append(Sample(path, CLASS_NAMES.index(row["label"]), row["patient_id"]))
    return samples


def recalibrate_bundle(bundle_dir: Path | None, data_root: Path, out_dir: Path) -> dict:
    """Fit temperature and operating points on the bundle's own validation split; write a new bundle.

    The weights are copied unchanged (same sha256); only ``model.json`` gains the calibration.
    """
    from pneumoscan.inference import Predictor
    from pneumoscan.models import default_bundle_path, rewrite_bundle

    bundle_dir = bundle_dir or default_bundle_path()
    predictor = Predictor.from_bundle(bundle_dir)
    samples = split_samples(bundle_dir, data_root)
    outcomes = predictor.predict_paths([s.path for s in samples])
    bad = [o for o in outcomes if o.error]
    if bad:
        from pneumoscan.errors import DatasetError

        raise DatasetError(f"{len(bad)} validation image(s) could not be read, e.g. {bad[0].error}")
    calibration = calibrate_on_validation([s.label for s in samples], [o.log_odds for o in outcomes])
    spec = predictor.spec
    val_metrics = {**spec.val_metrics, **calibration.report["operating_points"]["balanced"],
                   "n": calibration.report["n"], "calibration": calibration.report}
    new_spec = spec.replace(
        temperature=calibration.temperature, calibration="temperature_scaling_on_validation",
        operating_points=calibration.operating_points, default_operating_point="balanced",
        threshold=calibration.operating_points["balanced"], threshold_source="validation_youden",
        val_metrics=val_metrics)
    rewrite_bundle(bundle_dir, new_spec, out_dir)
    return calibration.report


def record_evaluation(bundle_dir: Path | None, metrics: dict) -> None:
    """Store an evaluation's figures (with CIs, per operating point) in the bundle's ``model.json``
    under ``reported_metrics[split]``, where the model card shows them. Weights are untouched.

    Raises:
        BundleError: the metrics were computed with other weights than the bundle holds.
    """
    from pneumoscan.errors import BundleError
    from pneumoscan.models import default_bundle_path, read_spec, rewrite_bundle

    bundle_dir = bundle_dir or default_bundle_path()
    spec = read_spec(bundle_dir)
    if metrics["model"]["weights_sha256"] != spec.weights_sha256:
        raise BundleError(f"these metrics belong to other weights than those in {bundle_dir}")
    keep = ("n", "n_by_class", "n_unreadable", "operating_point", "tta", "ci", "calibration")
    entry = {key: metrics[key] for key in keep if key in metrics}
    entry["operating_points"] = metrics["operating_points"]
    entry["dataset"] = Path(str(metrics["data"])).name
    entry["evaluated"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    reported = {**spec.reported_metrics, metrics["split"]: entry}
    rewrite_bundle(bundle_dir, spec.replace(reported_metrics=reported), bundle_dir)


# The share of synthetic documents and screenshots a gate must refuse before fit-gate stops warning.
SYNTHETIC_REFUSAL_TARGET = 0.99


def synthetic_refusals(predictor) -> dict:
    """How many of :mod:`pneumoscan.nonxray`'s documents and screenshots ``predictor`` refuses,
    through the same image checks and feature gate as the web app.

    They pass every image check, so this measures the feature gate alone. A gate is only as good
    as the features it is fitted on: fine-tuning recipes that make the network invariant to
    contrast or blur also made documents look like X-rays to it (39% refused instead of 99%),
    so every new gate is measured here before it ships.
    """
    from pneumoscan.data import decode_image
    from pneumoscan.gate import image_reasons
    from pneumoscan.nonxray import synthetic_non_xrays

    images = [decode_image(data) for data in synthetic_non_xrays().values()]
    refused = sum(bool(image_reasons(image)) or predictor.is_out_of_distribution(prediction)
                  for image, prediction in zip(images, predictor.predict_images(images)))
    return {"n": len(images), "refused": int(refused), "target": SYNTHETIC_REFUSAL_TARGET}


def fit_bundle_gate(bundle_dir: Path | None, data_root: Path, out_dir: Path, *, quantile: float = 0.995,
                    batch_size: int = 32) -> dict:
    """Fit the input gate's feature statistics on the bundle's own training images, its threshold
    at ``quantile`` of the validation images' distances; write a new bundle (weights unchanged)."""
    import tempfile

    import torch

    from pneumoscan.errors import ConfigError
    from pneumoscan.gate import GATE_FILE, FeatureGate
    from pneumoscan.inference import Predictor, read_bundle_pixels
    from pneumoscan.models import default_bundle_path, rewrite_bundle
    from pneumoscan.models.bundle import sha256_file

    if not 0.5 < quantile < 1.0:
        raise ConfigError(f"--quantile must be between 0.5 and 1, got {quantile}")
    bundle_dir = Path(bundle_dir or default_bundle_path())
    predictor = Predictor.from_bundle(bundle_dir)

    def features(role: str) -> np.ndarray:
        samples = split_samples(bundle_dir, data_root, role=role)
        chunks = []
        for start in range(0, len(samples), batch_size):
            batch = [read_bundle_pixels(predictor.spec, s.path) for s in samples[start:start + batch_size]]
            chunks.append(predictor.forward(torch.stack(batch))[1].numpy())
        return np.concatenate(chunks)

    train_features, val_features = features("train"), features("val")
    gate = FeatureGate.fit(train_features, val_features, quantile=quantile)
    predictor.gate = gate  # this local predictor now stands for the gated bundle being written
    synthetic = synthetic_refusals(predictor)
    with tempfile.TemporaryDirectory() as tmp:
        gate_path = Path(tmp) / GATE_FILE
        gate.save(gate_path)
        info = {"file": GATE_FILE, "sha256": sha256_file(gate_path), "threshold": round(gate.threshold, 6),
                "quantile": quantile, "method": "mahalanobis, Ledoit-Wolf covariance of pooled backbone features",
                "n_train": int(len(train_features)), "n_val": int(len(val_features)),
                "synthetic_non_xrays": synthetic}
        spec = predictor.spec.replace(gate=info)
        rewrite_bundle(bundle_dir, spec, out_dir, extra_files={GATE_FILE: gate_path})
    return info
