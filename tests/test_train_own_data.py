"""Training on a site's own films, end to end: one ``pneumoscan train`` makes a bundle that is
calibrated, gated on its own training films and exported, whose card describes that data; tiny
validation splits are warned about and fit nothing on so few; a plain labelled folder evaluates."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import TEST_INPUT, write_kaggle_layout

pytest.importorskip("torch", reason="training needs PyTorch (pneumoscan[train]); this is the light install")


def _train(data: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pneumoscan", "train", "--data", str(data), "--out", str(out), "--weights", "none",
         "--input-size", str(TEST_INPUT), "--epochs", "1", "--frozen-epochs", "0", "--batch-size", "16",
         "--accelerator", "cpu", "--devices", "1", *extra], capture_output=True, text=True, timeout=900)


def test_one_train_command_makes_a_gated_exported_bundle_whose_card_describes_the_data(tmp_path: Path) -> None:
    from pneumoscan.card import model_card
    from pneumoscan.inference import Predictor
    from pneumoscan.integrity import read_spec
    from pneumoscan.nonxray import synthetic_non_xrays

    data = write_kaggle_layout(tmp_path / "our_films", per_class={"train": 56, "val": 4, "test": 4})
    done = _train(data, tmp_path / "run", "--val-fraction", "0.34",
                  "--population", "Our hospital, 2019-2024, children aged 1-5, AP views")
    assert done.returncode == 0, done.stderr[-3000:]
    bundle = tmp_path / "run" / "bundle"
    assert done.stdout.strip().splitlines()[-1] == (
        f"bundle ready: {bundle} (calibrated, gated, exported to ONNX); serve it with: pneumoscan serve --model {bundle}")
    for stage in ("stage 1/3: training", "stage 2/3: fitting the input gate", "stage 3/3: exporting to ONNX"):
        assert stage in done.stderr
    assert "warning" not in done.stderr.lower()
    spec = read_spec(bundle)
    assert spec.gate is not None and spec.onnx is not None

    card = model_card(spec)
    assert card["gated"] is True and card["population"].startswith("Our hospital")
    assert not any("Kermany" in text or "Guangzhou" in text for text in (card["population"], *card["limitations"]))
    own = card["training_data"]["own_data"]
    assert own["folder"] == "our_films" and len(own["sha256"]) == 64
    assert own["n_by_split"]["test"] == {"NORMAL": 4, "PNEUMONIA": 4}
    assert sum(own["n_by_split"]["train"].values()) + sum(own["n_by_split"]["validation"].values()) == 120
    assert own["image_sizes"]["smallest"] == [72, 64] and own["image_sizes"]["n_read"] == 120

    # served without PyTorch's help, it refuses what is far from its training films
    predictor = Predictor.from_bundle(bundle, backend="onnxruntime")
    documents = [predictor.preprocessing.decode(data, name=name) for name, data in synthetic_non_xrays().items()]
    refused = sum(r.status == "rejected" for r in predictor.predict(documents))
    assert refused >= 0.9 * len(documents)


def test_a_tiny_validation_split_is_warned_about_fits_no_temperature_and_cross_fits_the_gate(tmp_path: Path) -> None:
    from pneumoscan.card import model_card
    from pneumoscan.integrity import read_spec

    data = write_kaggle_layout(tmp_path / "small", per_class={"train": 10, "val": 2})
    done = _train(data, tmp_path / "run", "--val-fraction", "0.25", "--no-export")
    assert done.returncode == 0, done.stderr[-3000:]
    warnings = [line for line in done.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "fewer than 20 of a class" in warnings[0] and "no temperature" in warnings[0]
    assert "cross-fitted" in warnings[0]
    assert "stage 2/2: fitting the input gate on the training films (its limit cross-fitted" in done.stderr
    bundle = tmp_path / "run" / "bundle"
    assert "gated" in done.stdout and "NOT gated" not in done.stdout and "not exported" in done.stdout
    assert "NOT calibrated (too few validation films" in done.stdout
    spec = read_spec(bundle)
    assert spec.onnx is None and spec.decision.temperature == 1.0
    assert spec.gate is not None and spec.gate.limit_from == "cross-fitted"
    card = model_card(spec)
    limitations = " ".join(card["limitations"])
    assert card["gated"] is True and "NO input gate" not in limitations
    assert "fewer than 20 images of a class" in limitations and "cross-fitted over the" in limitations
    assert card["population"].startswith("Not described")

    predicted = subprocess.run([sys.executable, "-m", "pneumoscan", "predict", "--model", str(bundle),
                                str(next((data / "train" / "NORMAL").iterdir()))],
                               capture_output=True, text=True, timeout=300)
    assert predicted.returncode == 0 and "no feature gate" not in predicted.stderr, predicted.stderr

    from pneumoscan.web import create_app

    client = create_app({"MODEL_DIR": str(bundle), "SECRET_KEY": "test"}).test_client()
    page = " ".join(client.get("/").get_data(as_text=True).split())
    assert "probabilities are <strong>not calibrated</strong> (too few validation films" in page
    assert "helped set its cross-fitted limit" in client.get("/model").get_data(as_text=True)


def test_evaluate_reads_a_plain_labelled_folder_and_says_so(tiny_bundle: Path, xray_root: Path, tmp_path: Path) -> None:
    plain = xray_root / "test"  # NORMAL/ and PNEUMONIA/ directly inside
    done = subprocess.run([sys.executable, "-m", "pneumoscan", "evaluate", "--model", str(tiny_bundle),
                           "--data", str(plain), "--out", str(tmp_path / "report"), "--bootstrap", "200"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.splitlines()[0] == f"read the labelled folder {plain} (NORMAL/, PNEUMONIA/)"
    assert "fewer than 20 readable images" in done.stderr  # 6 a class: the figures say they rest on few
    metrics = json.loads((tmp_path / "report" / "metrics.json").read_text())
    assert metrics["n"] == 12 and metrics["few_images"] == ["NORMAL", "PNEUMONIA"]
    assert "Few images" in (tmp_path / "report" / "report.md").read_text()
    kaggle = subprocess.run([sys.executable, "-m", "pneumoscan", "evaluate", "--model", str(tiny_bundle),
                             "--data", str(xray_root), "--out", str(tmp_path / "report2"), "--bootstrap", "200"],
                            capture_output=True, text=True, timeout=300)
    assert kaggle.stdout.splitlines()[0] == f"read the 'test' split of the Kaggle layout {xray_root}"
