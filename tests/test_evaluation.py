"""pneumoscan.evaluation: the evaluate report (every image scored, the gate's refusals counted)."""

from __future__ import annotations

import json
from pathlib import Path

from pneumoscan.evaluation import METRIC_NAMES, evaluate_folder


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
    assert lines[0] == "path,true_label,label,probability_pneumonia,threshold,gate_reasons,error" and len(lines) == 13
    assert set(saved["operating_points"]) == {"balanced", "high_sensitivity", "high_specificity"}
    assert saved["operating_point"] == "balanced"
    assert saved["operating_points"]["balanced"]["accuracy"] == saved["accuracy"]
    assert {"ece_15_before", "ece_15_after", "brier_before", "brier_after"} <= set(saved["calibration"])
    for name in ("roc.png", "confusion.png", "reliability.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = (tmp_path / "report.md").read_text()
    assert "n = 12" in report and "roc_auc" in report and "high_specificity" in report


def test_evaluate_the_bundles_own_validation_split(tiny_bundle: Path, xray_root: Path, tmp_path: Path) -> None:
    from pneumoscan.models import read_spec

    metrics = evaluate_folder(tiny_bundle, xray_root, "validation", tmp_path, n_boot=100)
    assert metrics["n"] == read_spec(tiny_bundle).val_metrics["n"]
    assert metrics["split"] == "validation"


def test_evaluate_scores_every_image_and_counts_what_the_gate_would_refuse(
        tiny_bundle: Path, xray_root: Path, tmp_path: Path) -> None:
    import shutil

    from PIL import Image

    root = tmp_path / "data"
    shutil.copytree(xray_root / "test", root / "test")
    colour = Image.new("RGB", (96, 96), (200, 30, 30))
    colour.paste((20, 40, 220), (20, 20, 70, 70))
    colour.save(root / "test" / "NORMAL" / "IM-9999-0001.png")
    metrics = evaluate_folder(tiny_bundle, root, "test", tmp_path / "report", n_boot=100)
    assert metrics["n"] == 13  # the colour image is scored, not dropped
    gate = metrics["input_gate"]
    assert gate["applied"] is False and gate["would_refuse"] >= 1 and gate["reasons"]["colour_image"] == 1
    rows = (tmp_path / "report" / "predictions.csv").read_text().splitlines()
    colour_row = next(r for r in rows if "IM-9999-0001" in r)
    assert ",colour_image," in colour_row and ",NORMAL," in colour_row  # labelled all the same
    report = (tmp_path / "report" / "report.md").read_text()
    assert "input gate: not applied" in report and "colour_image 1" in report
