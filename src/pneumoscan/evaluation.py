"""Evaluate a bundle on a labelled folder (``pneumoscan evaluate``) and render the report.

Every labelled image is scored: the input gate is never applied here (a refused image would
silently leave the figures), but how many images it would refuse, and why, is reported.
"""

from __future__ import annotations

import csv
import json
import math
from collections import Counter
from pathlib import Path
from typing import Sequence

import numpy as np

from pneumoscan.errors import DatasetError
from pneumoscan.plots import confusion_figure, pyplot, reliability_figure, risk_coverage_figure, roc_figure
from pneumoscan.stats import (METRIC_NAMES, Estimate, bootstrap_metrics, brier_score, confusion_matrix,
                              expected_calibration_error, proportion, sigmoid)

__all__ = ["METRIC_NAMES", "evaluate_folder", "render_report"]


def _estimates(y_true: np.ndarray, y_score: np.ndarray, threshold: float, *, n_boot: int,
               seed: int) -> dict:
    estimates = bootstrap_metrics(y_true, y_score, threshold=threshold, n_boot=n_boot, seed=seed)
    return {"threshold": threshold,
            **{name: estimates[name].as_dict() for name in METRIC_NAMES},
            "confusion_matrix": confusion_matrix(y_true, y_score, threshold=threshold)}


def review_summary(y_true: np.ndarray, prob: np.ndarray, threshold: float | np.ndarray,
                   flagged: np.ndarray) -> dict:
    """Coverage (share not flagged for review) and accuracy among the unflagged, with 95% Wilson
    intervals, and the accuracy among the flagged."""
    y = np.asarray(y_true, dtype=np.int64)
    correct = (np.asarray(prob) >= np.asarray(threshold)).astype(np.int64) == y
    flagged = np.asarray(flagged, dtype=bool)
    n_out = int((~flagged).sum())
    return {"n": int(len(y)), "flagged": int(flagged.sum()),
            "coverage": proportion(n_out, len(y)).as_dict(),
            "accuracy_outside": proportion(int(correct[~flagged].sum()), n_out).as_dict(),
            "accuracy_flagged": proportion(int(correct[flagged].sum()), int(flagged.sum())).as_dict()}


def _review(spec, kept, y_true: np.ndarray, y_score: np.ndarray, threshold: float) -> dict:
    """The bundle's review flag on these images: its probability band alone, and every reason."""
    decision = spec.decision
    if not decision.review:
        return {"available": False}
    low, high = decision.review_band_for(threshold)
    # what Predictor flagged on each image (Decision.review_reasons), not a second computation
    in_band = np.array(["uncertain_probability" in o.review_reasons for _, o in kept])
    any_reason = np.array([bool(o.review_reasons) for _, o in kept])
    reasons = Counter(reason for _, o in kept for reason in o.review_reasons)
    return {"available": True, "band": {"low": low, "high": high}, "target_accuracy": decision.review["target_accuracy"],
            "fitted_on": decision.site.get("source", "site sample") if decision.site else "validation",
            "probability_band": review_summary(y_true, y_score, threshold, in_band),
            "any_reason": review_summary(y_true, y_score, threshold, any_reason),
            "reasons": dict(sorted(reasons.items())),
            "method": "95% Wilson intervals; 'any_reason' adds films near or beyond the gate's limit"}


#: Below this many readable images in a class, evaluate reports nothing (exit 2) rather than
#: figures such as sensitivity 1.0 from one film.
MIN_READABLE_PER_CLASS = 5


def evaluate_folder(model_dir: Path | None, data_root: Path, split: str, out_dir: Path, *,
                    n_boot: int = 2000, seed: int = 0, batch_size: int = 32,
                    operating_point: str | None = None, tta: bool = False, backend: str = "auto",
                    site_folds: int | None = None, quiet: bool = True) -> dict:
    """Predict every image of ``data_root/split``, write the report files, return metrics.json.

    The top-level metrics are at the chosen operating point (the bundle's default unless
    given); ``operating_points`` repeats them at every named point of the bundle, and
    ``calibration`` gives ECE and Brier score with and without the bundle's temperature.

    ``split="validation"`` evaluates the bundle's own validation split (from its split.csv):
    the split its threshold and temperature were chosen on, so those figures are optimistic.
    Unless ``quiet``, a progress bar is drawn on stderr when it is a terminal.

    Raises:
        DatasetError: the split or a class folder is missing or empty.
        BundleError: the bundle cannot be loaded.
        ConfigError: an unknown operating point.
    """
    from pneumoscan.data import CLASS_NAMES, MIN_IMAGES_PER_CLASS, read_split, scan_evaluation_data
    from pneumoscan.inference import Predictor
    from pneumoscan.integrity import default_bundle_path

    predictor = Predictor.from_bundle(model_dir, tta=tta, backend=backend)
    if split == "validation":  # the bundle's own validation split (what it was tuned on)
        samples = read_split(Path(model_dir or default_bundle_path()), data_root)
        layout = f"the bundle's own validation split (its split.csv) of {data_root}"
    else:
        samples, layout = scan_evaluation_data(data_root, split)
    spec = predictor.spec
    threshold, point_name = predictor.decision.threshold_for(operating_point)
    from pneumoscan.progress import bar

    with bar(len(samples), f"evaluating {split}", quiet=quiet) as advance:
        outcomes = predictor.predict_paths([s.path for s in samples], batch_size=batch_size,
                                           threshold=threshold, gate=False, progress=advance)
    failed = [o for o in outcomes if o.status == "error"]
    kept = [(s, o) for s, o in zip(samples, outcomes) if o.status != "error"]
    readable = Counter(CLASS_NAMES[s.label] for s, _ in kept)
    short = [name for name in CLASS_NAMES if readable[name] < MIN_READABLE_PER_CLASS]
    if short:
        found = Counter(CLASS_NAMES[s.label] for s in samples)
        raise DatasetError("; ".join(f"{name}: {readable[name]} of {found[name]} image(s) readable" for name in short)
                           + f" in {split}; at least {MIN_READABLE_PER_CLASS} readable images per class are needed "
                           "for figures that mean anything (accuracy 1.0 on one image is not a result)")
    would_refuse = Counter(reason for _, o in kept for reason in o.reasons)
    y_true = np.array([s.label for s, _ in kept])
    y_score = np.array([o.probability for _, o in kept])
    y_raw = sigmoid(np.array([o.log_odds for _, o in kept]))
    metrics: dict = _estimates(y_true, y_score, threshold, n_boot=n_boot, seed=seed)
    metrics.update({
        "operating_point": point_name,
        "n": int(len(y_true)),
        "n_by_class": {name: int((y_true == i).sum()) for i, name in enumerate(CLASS_NAMES)},
        "n_unreadable": len(failed),
        "unreadable": [{"path": o.name, "error": o.error} for o in failed],
        "threshold_source": spec.decision.threshold_source,
        "operating_points": {name: _estimates(y_true, y_score, t, n_boot=n_boot, seed=seed)
                             for name, t in predictor.operating_points.items()},
        # Evaluation scores every image; this is what the input gate would have refused.
        "input_gate": {"applied": False, "has_feature_gate": predictor.gate is not None,
                       "would_refuse": sum(1 for _, o in kept if o.reasons),
                       "reasons": dict(sorted(would_refuse.items()))},
        "calibration": {
            "method": spec.decision.calibration, "temperature": spec.decision.temperature,
            "ece_15_before": round(expected_calibration_error(y_true, y_raw), 6),
            "ece_15_after": round(expected_calibration_error(y_true, y_score), 6),
            "brier_before": round(brier_score(y_true, y_raw), 6),
            "brier_after": round(brier_score(y_true, y_score), 6),
        },
        "tta": tta,
        "split": split,
        "data": str(data_root),
        "layout": layout,
        # below this many of a class, every figure here rests on too few images to trust
        "few_images": sorted(name for name in CLASS_NAMES if readable[name] < MIN_IMAGES_PER_CLASS),
        "min_images_per_class": MIN_IMAGES_PER_CLASS,
        "model": {"name": spec.name, "backbone": spec.backbone, "weights_sha256": spec.weights_sha256},
        "ci": {"method": "percentile bootstrap over images", "level": 0.95, "resamples": n_boot,
               "seed": seed},
    })
    metrics["review"] = _review(spec, kept, y_true, y_score, threshold)
    if site_folds is not None:
        z = np.array([o.log_odds for _, o in kept])
        metrics["site_calibrated"] = site_calibrated(y_true, z, folds=site_folds, n_boot=n_boot, seed=seed)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    with (out_dir / "predictions.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(("path", "true_label", "label", "probability_pneumonia", "threshold",
                         "gate_reasons", "error"))
        for s, o in zip(samples, outcomes):
            writer.writerow((s.path, CLASS_NAMES[s.label], o.label or "",
                             "" if o.probability is None else f"{o.probability:.6f}", threshold,
                             ";".join(o.reasons), o.error or ""))
    title = f"{spec.name} on {split}"
    auc = Estimate(**{k: (math.nan if v is None else v) for k, v in metrics["roc_auc"].items()})
    plt = pyplot()
    for name, fig in (
            ("roc.png", roc_figure(y_true, y_score, auc=auc, threshold=threshold, title=title)),
            ("confusion.png", confusion_figure(metrics["confusion_matrix"], class_names=CLASS_NAMES, title=title)),
            ("reliability.png", reliability_figure(y_true, y_raw, y_score, title=title)),
            ("risk_coverage.png", _risk_coverage(metrics, y_true, y_score, threshold, title))):
        if fig is None:
            continue
        fig.savefig(out_dir / name)
        plt.close(fig)
    (out_dir / "report.md").write_text(render_report(metrics, failed=[o.name for o in failed]))
    return metrics


def _risk_coverage(metrics: dict, y_true: np.ndarray, y_score: np.ndarray, threshold: float, title: str):
    review = metrics["review"]
    if not review["available"]:
        return None
    points = {}
    for name, part in (("review band", review["probability_band"]),
                       ("review band + gate margin", review["any_reason"])):
        if part["accuracy_outside"]["value"] is not None:
            points[name] = (part["coverage"]["value"], 1 - part["accuracy_outside"]["value"])
    return risk_coverage_figure(y_true, y_score, threshold=threshold, points=points,
                                target=review["target_accuracy"], title=title)


def site_calibrated(y_true: np.ndarray, log_odds: np.ndarray, *, folds: int, n_boot: int, seed: int) -> dict:
    """The figures a site would see after calibrating on its own labelled sample, cross-fitted:
    every image predicted by a calibration fitted on the other ``folds - 1`` folds.

    Raises:
        ConfigError: ``folds`` below 2 or above the smaller class's count.
    """
    from pneumoscan.calibration import cross_fitted

    prob, threshold, decisions, band = cross_fitted(y_true, log_odds, folds=folds, seed=seed)
    estimates = bootstrap_metrics(y_true, prob, threshold=threshold, n_boot=n_boot, seed=seed)
    in_band = (prob > band[:, 0]) & (prob < band[:, 1])
    return {**{name: estimates[name].as_dict() for name in METRIC_NAMES},
            "confusion_matrix": confusion_matrix(y_true, prob, threshold=threshold),
            "n": int(len(y_true)), "folds": folds, "calibration_n": int(round(len(y_true) * (folds - 1) / folds)),
            "thresholds": [round(d.threshold, 6) for d in decisions],
            "temperatures": [round(d.temperature, 6) for d in decisions],
            "ece_15": round(expected_calibration_error(y_true, prob), 6),
            "review_band": {**review_summary(y_true, prob, threshold, in_band),
                            "bands": [[d.review["low"], d.review["high"]] for d in decisions]},
            "method": "stratified folds; temperature and the balanced threshold refitted on the other folds"}


def render_report(metrics: dict, *, failed: Sequence[str] = ()) -> str:
    """A readable Markdown summary of metrics.json."""
    cm = metrics["confusion_matrix"]
    lines = [
        f"# Evaluation of {metrics['model']['name']} on the {metrics['split']} split",
        "",
        *([f"> **Few images:** {', '.join(metrics['few_images'])} has fewer than "
           f"{metrics['min_images_per_class']} readable images; every figure below rests on too few to trust.", ""]
          if metrics.get("few_images") else []),
        f"- data: `{metrics['data']}` ({metrics.get('layout', 'Kaggle layout')})",
        f"- n = {metrics['n']} images ({', '.join(f'{k} {v}' for k, v in metrics['n_by_class'].items())})",
        f"- operating point: {metrics['operating_point']}, threshold on calibrated P(pneumonia): "
        f"{metrics['threshold']:.4f} ({metrics['threshold_source']})",
        f"- test-time augmentation (flip averaging): {'on' if metrics['tta'] else 'off'}",
        f"- input gate: not applied (every labelled image is scored); it would have refused "
        f"{metrics['input_gate']['would_refuse']} of {metrics['n']} images"
        + (f" ({', '.join(f'{k} {v}' for k, v in metrics['input_gate']['reasons'].items())})"
           if metrics['input_gate']['reasons'] else "")
        + ("" if metrics['input_gate']['has_feature_gate'] else "; this bundle has no feature gate, "
           "so only the image checks ran"),
        f"- 95% intervals: percentile bootstrap, {metrics['ci']['resamples']} resamples of images",
        "",
        "| metric | value | 95% CI |",
        "|---|---:|---:|",
    ]
    def fmt(v: float | None) -> str:
        return "n/a" if v is None else f"{v:.3f}"

    def with_ci(estimate: dict) -> str:
        return f"{fmt(estimate['value'])} ({fmt(estimate['ci_low'])}-{fmt(estimate['ci_high'])})"

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
        cells = [with_ci(point[m]) for m in METRIC_NAMES]
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
    review = metrics.get("review") or {}
    if review.get("available"):
        lines += [
            f"## Review flag (band {review['band']['low']:.3f}-{review['band']['high']:.3f} on calibrated "
            f"P(pneumonia), fitted on {review['fitted_on']}, target accuracy {review['target_accuracy']:.2f} outside it)",
            "",
            "| flag | flagged | coverage (95% CI) | accuracy outside (95% CI) | accuracy of the flagged |",
            "|---|---:|---:|---:|---:|",
            *[f"| {label} | {part['flagged']} of {part['n']} | {with_ci(part['coverage'])} | "
              f"{with_ci(part['accuracy_outside'])} | {fmt(part['accuracy_flagged']['value'])} |"
              for label, part in (("probability band", review["probability_band"]),
                                  ("any reason (band, gate margin)", review["any_reason"]))],
            "",
            "![risk-coverage](risk_coverage.png)",
            "",
        ]
    site = metrics.get("site_calibrated")
    if site:
        lines += [
            f"## Site-calibrated, {site['folds']}-fold cross-fitted",
            "",
            f"Each image is predicted by a temperature and threshold fitted on the other folds only "
            f"({site['calibration_n']} images each), never on itself.",
            "",
            "| metric | value | 95% CI |",
            "|---|---:|---:|",
            *[f"| {name} | {fmt(site[name]['value'])} | {fmt(site[name]['ci_low'])} - {fmt(site[name]['ci_high'])} |"
              for name in METRIC_NAMES],
            "",
        ]
        band = site.get("review_band")
        if band:
            lines += [f"Review band refitted in each fold: {band['flagged']} of {band['n']} flagged, coverage "
                      f"{with_ci(band['coverage'])}, accuracy outside {with_ci(band['accuracy_outside'])}.", ""]
    if failed:
        lines += [f"{len(failed)} file(s) could not be read and are left out:", ""]
        lines += [f"- `{p}`" for p in failed] + [""]
    return "\n".join(lines)
