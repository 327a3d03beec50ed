"""The command line: predict, evaluate, and clear one-line errors for bad input."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from pneumoscan.cli import app

runner = CliRunner()


def run_cli(*args: str) -> subprocess.CompletedProcess:
    """Through the real entry point, so error handling is exercised as a user sees it."""
    return subprocess.run([sys.executable, "-m", "pneumoscan", *args], capture_output=True,
                          text=True, timeout=300)


def test_predict_csv_for_files_and_folders(tiny_bundle: Path, xray_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "preds.csv"
    one = next((xray_root / "train" / "NORMAL").iterdir())
    result = runner.invoke(app, ["predict", "--model", str(tiny_bundle), str(xray_root / "test"),
                                 str(one), "--csv", str(out)])
    assert result.exit_code == 0, result.output
    rows = list(csv.DictReader(out.open()))
    assert list(rows[0]) == ["path", "label", "probability_pneumonia", "threshold"]
    assert len(rows) == 13
    for row in rows:
        p, t = float(row["probability_pneumonia"]), float(row["threshold"])
        assert 0 <= p <= 1 and row["label"] == ("PNEUMONIA" if p >= t else "NORMAL")


def test_predict_table_and_partial_failure(tiny_bundle: Path, xray_root: Path, tmp_path: Path) -> None:
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 definitely not a whole jpeg")
    good = next((xray_root / "test" / "PNEUMONIA").iterdir())
    result = run_cli("predict", "--model", str(tiny_bundle), str(good), str(bad))
    assert result.returncode == 1
    assert good.name in result.stdout and "p(pneumonia)" in result.stdout
    assert "broken.jpg" in result.stderr and "1 of 2 file(s) could not be read" in result.stderr
    assert "Traceback" not in result.stderr


def test_evaluate_cli(tiny_bundle: Path, xray_root: Path, tmp_path: Path) -> None:
    result = runner.invoke(app, ["evaluate", "--data", str(xray_root), "--split", "test", "--model",
                                 str(tiny_bundle), "--out", str(tmp_path), "--bootstrap", "200"])
    assert result.exit_code == 0, result.output
    assert "roc_auc" in result.output
    assert json.loads((tmp_path / "metrics.json").read_text())["n"] == 12


@pytest.mark.parametrize("args,message", [
    (["evaluate", "--data", "/nonexistent/chest_xray"], "dataset folder /nonexistent/chest_xray does not exist"),
    (["train", "--data", "/nonexistent", "--out", "/tmp/x", "--backbone", "nope"], "unknown backbone 'nope'"),
    (["predict", "--model", "/nonexistent/bundle", "README.md"], "model bundle /nonexistent/bundle does not exist"),
])
def test_bad_input_gives_one_clear_line(args: list[str], message: str) -> None:
    result = run_cli(*args)
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def test_missing_split_and_tampered_bundle(tiny_bundle: Path, xray_root: Path, tmp_path: Path) -> None:
    result = run_cli("evaluate", "--data", str(xray_root), "--split", "holdout", "--model", str(tiny_bundle))
    assert result.returncode == 2 and "no 'holdout' split folder" in result.stderr
    import shutil

    copy = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, copy)
    weights = copy / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1] + b"\x00")
    result = run_cli("predict", "--model", str(copy), str(xray_root / "test"))
    assert result.returncode == 2 and "corrupt or was modified" in result.stderr
    assert "Traceback" not in result.stderr


def test_wrong_cli_arguments_are_usage_errors() -> None:
    result = run_cli("train", "--epochs", "many")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "Invalid value" in result.stderr or "Missing option" in result.stderr


def test_backbones_command_lists_registry() -> None:
    result = runner.invoke(app, ["backbones"])
    assert result.exit_code == 0 and "efficientnet_lite0" in result.output and "vgg19" in result.output


def test_calibrate_rewrites_only_the_spec(tiny_bundle: Path, xray_root: Path, tmp_path: Path) -> None:
    from pneumoscan.models import load_bundle, read_spec

    result = runner.invoke(app, ["calibrate", "--data", str(xray_root), "--model", str(tiny_bundle),
                                 "--out", str(tmp_path / "cal")])
    assert result.exit_code == 0, result.output
    assert "high_specificity" in result.output
    old, new = read_spec(tiny_bundle), read_spec(tmp_path / "cal")
    assert new.weights_sha256 == old.weights_sha256
    assert new.calibration == "temperature_scaling_on_validation"
    assert new.val_metrics["n"] == old.val_metrics["n"]  # the same validation images
    load_bundle(tmp_path / "cal")
    import shutil

    shutil.copytree(tiny_bundle, tmp_path / "nosplit")
    (tmp_path / "nosplit" / "split.csv").unlink()
    failed = run_cli("calibrate", "--data", str(xray_root), "--model", str(tmp_path / "nosplit"),
                     "--out", str(tmp_path / "x"))
    assert failed.returncode == 2 and "has no split.csv" in failed.stderr
