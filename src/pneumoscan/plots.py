"""Every figure: ROC, confusion matrix, reliability diagram, risk-coverage, training curves.

Each function returns a matplotlib Figure (Agg backend); the caller saves and closes it. Titles
are wrapped to the figure's width, so a long model name is never cut off.
"""

from __future__ import annotations

import csv
import textwrap
from pathlib import Path
from typing import Sequence

import numpy as np

from pneumoscan.stats import Estimate, confusion_matrix, expected_calibration_error, reliability_bins

TITLE_SIZE = 10  # points


def pyplot():
    """matplotlib.pyplot on the Agg backend (no screen needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _figure(width: float, height: float, ncols: int = 1):
    return pyplot().subplots(1, ncols, figsize=(width, height), dpi=100, layout="constrained")


def _title(ax, text: str) -> None:
    """The figure's title, centred on the figure and wrapped to its width (at most 0.7 em per
    character, with a margin), so constrained layout always has room for it."""
    figure = ax.figure
    width_pt = figure.get_figwidth() * 72 * 0.9
    figure.suptitle(textwrap.fill(text, max(20, int(width_pt / (0.7 * TITLE_SIZE)))), fontsize=TITLE_SIZE)


def reliability_figure(y_true: Sequence[int], prob_before: Sequence[float], prob_after: Sequence[float],
                       *, title: str, n_bins: int = 15):
    """Observed pneumonia rate against predicted P(pneumonia), before and after calibration."""
    fig, ax = _figure(5, 5.3)
    ax.plot([0, 1], [0, 1], ls="--", color="grey", lw=1, label="perfect calibration")
    for label, prob in (("before", prob_before), ("after", prob_after)):
        xs, ys = reliability_bins(y_true, prob, n_bins=n_bins)
        ece = expected_calibration_error(y_true, prob, n_bins=n_bins)
        ax.plot(xs, ys, marker="o", label=f"{label} temperature scaling (ECE {ece:.3f})")
    ax.set(xlabel="predicted P(pneumonia)", ylabel="observed pneumonia rate", xlim=(0, 1), ylim=(0, 1))
    _title(ax, f"{title} (n={len(y_true)})")
    ax.legend(loc="upper left", fontsize=9)
    return fig


def risk_coverage_figure(y_true: Sequence[int], prob: Sequence[float], *, threshold: float | np.ndarray,
                         points: dict[str, tuple[float, float]], target: float, title: str):
    """Error rate among the films answered without review, against the share answered, as films
    are set aside for review from the highest calibrated chance of a wrong label down (``p`` for a
    NORMAL answer, ``1 - p`` for PNEUMONIA): the order in which the review band takes them, so a
    band's point lies on the curve. ``points`` marks review bands: name -> (coverage, error rate
    outside)."""
    y = np.asarray(y_true, dtype=np.int64)
    p = np.asarray(prob, dtype=np.float64)
    t = np.broadcast_to(np.asarray(threshold, dtype=np.float64), p.shape)
    called = (p >= t).astype(np.int64)
    chance_wrong = np.where(called == 1, 1 - p, p)
    order = np.argsort(chance_wrong, kind="stable")  # most certain first
    wrong = (called != y)[order]
    kept = np.arange(1, len(y) + 1)
    fig, ax = _figure(5.5, 4.5)
    ax.plot(kept / len(y), np.cumsum(wrong) / kept, lw=1.5, label="answered without review")
    ax.axhline(1 - target, ls="--", color="grey", lw=1, label=f"target error {1 - target:.2f}")
    for name, (coverage, error) in points.items():
        ax.plot([coverage], [error], marker="o", ls="none", label=f"{name}: coverage {coverage:.2f}, error {error:.3f}")
    ax.set(xlabel="coverage (share answered without review)", ylabel="error rate among them", xlim=(0, 1),
           ylim=(0, max(0.05, float(np.max(np.cumsum(wrong) / kept)) * 1.1)))
    _title(ax, f"{title} (n={len(y)})")
    ax.legend(loc="upper left", fontsize=8)
    return fig


def roc_figure(y_true: Sequence[int], y_score: Sequence[float], *, auc: Estimate, threshold: float,
               title: str):
    """ROC curve with the AUC and its CI, the operating point marked."""
    from sklearn.metrics import roc_curve

    y = np.asarray(y_true)
    s = np.asarray(y_score)
    fpr, tpr, _ = roc_curve(y, s)
    cm = confusion_matrix(y, s, threshold=threshold)
    fig, ax = _figure(5, 5.3)
    ax.plot(fpr, tpr, lw=2, label=f"AUC {auc.value:.3f} (95% CI {auc.ci_low:.3f}-{auc.ci_high:.3f})")
    ax.plot([0, 1], [0, 1], ls="--", color="grey", lw=1)
    op_fpr = cm["fp"] / max(cm["fp"] + cm["tn"], 1)
    op_tpr = cm["tp"] / max(cm["tp"] + cm["fn"], 1)
    ax.scatter([op_fpr], [op_tpr], color="red", zorder=3, label=f"threshold {threshold:.3f}")
    ax.set(xlabel="1 - specificity", ylabel="sensitivity", xlim=(0, 1), ylim=(0, 1.01))
    _title(ax, f"{title} (n={len(y)})")
    ax.legend(loc="lower right", fontsize=9)
    return fig


def confusion_figure(counts: dict[str, int], *, class_names: Sequence[str], title: str):
    """2x2 confusion matrix with counts and row percentages."""
    matrix = np.array([[counts["tn"], counts["fp"]], [counts["fn"], counts["tp"]]])
    fig, ax = _figure(4.8, 4.6)
    ax.imshow(matrix, cmap="Blues")
    for (i, j), value in np.ndenumerate(matrix):
        share = value / max(matrix[i].sum(), 1)
        ax.text(j, i, f"{value}\n({share:.0%})", ha="center", va="center",
                color="white" if value > matrix.max() / 2 else "black")
    ax.set(xticks=[0, 1], yticks=[0, 1], xticklabels=class_names, yticklabels=class_names,
           xlabel="predicted", ylabel="true")
    _title(ax, f"{title} (n={matrix.sum()})")
    return fig


def training_curves_figure(metrics_csvs: Sequence[Path]):
    """Loss and accuracy per epoch from Lightning CSVLogger files (later files win per epoch)."""
    series: dict[str, dict[int, float]] = {}
    for path in metrics_csvs:
        with path.open(newline="") as handle:
            for row in csv.DictReader(handle):
                if not row.get("epoch"):
                    continue
                epoch = int(float(row["epoch"]))
                for key in ("train_loss_epoch", "val_loss", "train_acc", "val_acc"):
                    if row.get(key):
                        series.setdefault(key, {})[epoch] = float(row[key])
    fig, (ax_loss, ax_acc) = _figure(9, 3.5, ncols=2)
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
    return fig
