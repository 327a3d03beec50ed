"""pneumoscan.bundle_tools: the independent gate, ensembles, site calibration."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from conftest import TEST_INPUT, make_xray
from pneumoscan.cli import app
from pneumoscan.errors import ConfigError, DatasetError
from pneumoscan.inference import Predictor
from pneumoscan.models import read_spec, verify_bundle

runner = CliRunner()


@pytest.fixture(scope="module")
def second_member(xray_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Another one-epoch run on the tiny bundle's split (split seed 0), with another seed."""
    from pneumoscan.training import TrainConfig, train

    out = tmp_path_factory.mktemp("member")
    train(TrainConfig(data=xray_root, out=out, weights="none", input_size=TEST_INPUT, epochs=1,
                      frozen_epochs=0, batch_size=8, val_fraction=0.25, lr=3e-3, accelerator="cpu",
                      devices="1", seed=5, split_seed=0))
    return out / "bundle"


@pytest.fixture(scope="module")
def ensemble_bundle(tiny_bundle: Path, second_member: Path, xray_root: Path,
                    tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("ensemble") / "bundle"
    result = runner.invoke(app, ["ensemble", str(tiny_bundle), str(second_member), "--data", str(xray_root),
                                 "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "2 members; validation" in result.output
    return out


def test_ensemble_averages_the_members_log_odds(ensemble_bundle: Path, tiny_bundle: Path,
                                                second_member: Path) -> None:
    spec = verify_bundle(ensemble_bundle)
    assert spec.members == 2 and spec.weights_dtype == "float16"
    assert spec.provenance.split_manifest_sha256 == read_spec(tiny_bundle).provenance.split_manifest_sha256
    assert [m["seed"] for m in spec.provenance.training["members"]] == [0, 5]
    images = [make_xray(i, pneumonia=i % 2 == 0) for i in range(4)]
    ensemble = Predictor.from_bundle(ensemble_bundle, backend="torch")
    members = [Predictor.from_bundle(b, backend="torch") for b in (tiny_bundle, second_member)]
    pixels = np.stack([ensemble.preprocessing.pixels(im) for im in images])
    mean = np.mean([m.forward(pixels)[0] for m in members], axis=0)
    # the members are stored in fp16 both times, so their mean is the ensemble's own
    np.testing.assert_allclose(ensemble.forward(pixels)[0], mean, atol=1e-5)
    result = ensemble.predict(images)[0]
    assert result.probability == pytest.approx(float(ensemble.decision.probability(result.log_odds)))
    # Grad-CAM of an ensemble: the mean of its members' maps
    explanation = ensemble.explain(images[0])
    assert explanation.cam.shape == (TEST_INPUT, TEST_INPUT) and explanation.cam.max() <= 1.0


def test_ensemble_refuses_members_that_disagree(tiny_bundle: Path, xray_root: Path, tmp_path: Path) -> None:
    from pneumoscan.bundle_tools import build_ensemble
    from pneumoscan.models import rewrite_bundle

    other = tmp_path / "other"
    spec = read_spec(tiny_bundle)
    rewrite_bundle(tiny_bundle, spec.replace(equalize=not spec.equalize), other)
    with pytest.raises(ConfigError, match="disagree on preprocessing.*equalize"):
        build_ensemble([tiny_bundle, other], xray_root, tmp_path / "out")
    with pytest.raises(ConfigError, match="at least 2"):
        build_ensemble([tiny_bundle], xray_root, tmp_path / "out")
    result = runner.invoke(app, ["ensemble", str(tiny_bundle), str(other), "--data", str(xray_root),
                                 "--out", str(tmp_path / "out")])
    assert isinstance(result.exception, ConfigError) and "equalize" in str(result.exception)  # main() prints it


def test_independent_gate_stays_when_the_classifier_changes(ensemble_bundle: Path, tiny_bundle: Path,
                                                           xray_root: Path, tmp_path: Path) -> None:
    """The gate measures a frozen ImageNet extractor, so a bundle with other fine-tuned weights
    gets the same gate features; and it is exported into the ONNX graph."""
    result = runner.invoke(app, ["fit-gate", "--data", str(xray_root), "--model", str(ensemble_bundle),
                                 "--out", str(tmp_path / "gated")])
    assert result.exit_code == 0, result.output
    assert "of the validation X-rays" in result.output and "inverted copies" in result.output
    gate = verify_bundle(tmp_path / "gated").gate
    assert gate.extractor == "efficientnet_lite0" and gate.extractor_file == "gate_extractor.safetensors"
    assert 0.0 <= gate.validation_refused <= 0.2 and gate.inverted_refused is not None
    single = tmp_path / "single-gated"
    assert runner.invoke(app, ["fit-gate", "--data", str(xray_root), "--model", str(tiny_bundle),
                               "--out", str(single)]).exit_code == 0
    a, b = Predictor.from_bundle(tmp_path / "gated"), Predictor.from_bundle(single)
    pixels = np.stack([a.preprocessing.pixels(make_xray(30 + i)) for i in range(3)])
    np.testing.assert_allclose(a.forward(pixels)[1], b.forward(pixels)[1], atol=1e-5)  # same gate features
    assert not np.allclose(a.forward(pixels)[0], b.forward(pixels)[0])  # different classifiers
    noise = Image.fromarray(np.random.default_rng(3).integers(0, 255, (80, 80), dtype=np.uint8))
    assert a.predict([noise])[0].reasons == ("out_of_distribution",)
    # the extractor file is checked like the weights
    extractor = tmp_path / "gated" / "gate_extractor.safetensors"
    data = extractor.read_bytes()  # its last bytes may be zeros already (the unused head is zeroed): flip them
    extractor.write_bytes(data[:-4] + bytes(byte ^ 0xFF for byte in data[-4:]))
    from pneumoscan.errors import BundleError

    with pytest.raises(BundleError, match="gate_extractor.safetensors"):
        Predictor.from_bundle(tmp_path / "gated")
    # ONNX: one graph computes the members' mean log-odds and the gate's features
    pytest.importorskip("onnxruntime")
    onnx = tmp_path / "onnx"
    shutil.copytree(single, onnx)
    assert runner.invoke(app, ["export", "--model", str(onnx)]).exit_code == 0
    ort, eager = Predictor.from_bundle(onnx), Predictor.from_bundle(onnx, backend="torch")
    assert ort.backend == "onnxruntime"
    np.testing.assert_allclose(ort.forward(pixels)[1], eager.forward(pixels)[1], atol=1e-4)
    refit = tmp_path / "refit"  # refitting the gate of an exported bundle re-exports its graph
    assert runner.invoke(app, ["fit-gate", "--data", str(xray_root), "--model", str(onnx), "--out", str(refit)]).exit_code == 0
    assert verify_bundle(refit).onnx is not None and Predictor.from_bundle(refit).backend == "onnxruntime"
    # an ensemble whose first member carries an independent gate keeps it, unchanged
    from pneumoscan.bundle_tools import build_ensemble

    report = build_ensemble([single, tiny_bundle], xray_root, tmp_path / "ens")
    kept = verify_bundle(tmp_path / "ens")
    assert report["gate_kept"] and kept.gate == read_spec(single).gate and kept.onnx is None
    joined = Predictor.from_bundle(tmp_path / "ens")
    np.testing.assert_allclose(joined.forward(pixels)[1], b.forward(pixels)[1], atol=1e-5)


def _site(root: Path, per_class: int) -> Path:
    for label, name in enumerate(("NORMAL", "PNEUMONIA")):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            make_xray(500 + 2 * i + label, pneumonia=bool(label)).save(root / name / f"site{i}.png")
    return root


def test_site_calibration_is_recorded_and_checked(tiny_bundle: Path, tmp_path: Path) -> None:
    site = _site(tmp_path / "site", 20)
    result = runner.invoke(app, ["calibrate", "--model", str(tiny_bundle), "--site", str(site),
                                 "--out", str(tmp_path / "cal")])
    assert result.exit_code == 0, result.output
    assert "site calibration from site (NORMAL 20, PNEUMONIA 20)" in result.output
    spec = verify_bundle(tmp_path / "cal")
    assert spec.weights_sha256 == read_spec(tiny_bundle).weights_sha256
    assert spec.decision.site["n_by_class"] == {"NORMAL": 20, "PNEUMONIA": 20}
    assert len(spec.decision.site["file_list_sha256"]) == 64 and spec.decision.threshold_source.startswith("site")
    from pneumoscan.card import model_card

    assert model_card(spec)["decision"]["site_calibration"]["source"] == "site"
    # the review band is refitted on the site's 40 films, around the site's threshold
    review = spec.decision.review
    assert review["n"] == 40 and review["low"] <= spec.decision.threshold <= review["high"]
    assert model_card(spec)["decision"]["review_band"] == dict(review)
    # bad site folders: one clear line each
    small = _site(tmp_path / "small", 19)
    (tmp_path / "lopsided" / "NORMAL").mkdir(parents=True)
    broken = _site(tmp_path / "broken", 20)
    (broken / "NORMAL" / "site3.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    for folder, message in ((small, "at least 20 of each class"), (tmp_path / "lopsided", "no PNEUMONIA/ class folder"),
                            (broken, "1 image(s) could not be read: .*site3.png")):
        result = runner.invoke(app, ["calibrate", "--model", str(tiny_bundle), "--site", str(folder),
                                     "--out", str(tmp_path / "x")])
        assert result.exit_code != 0 and isinstance(result.exception, (DatasetError, SystemExit))
    from pneumoscan.bundle_tools import recalibrate_bundle

    with pytest.raises(DatasetError, match="at least 20 of each class"):
        recalibrate_bundle(tiny_bundle, tmp_path / "x", site=small)
    with pytest.raises(DatasetError, match="could not be read: .*site3.png"):
        recalibrate_bundle(tiny_bundle, tmp_path / "x", site=broken)


def test_cross_fitted_site_calibration_never_predicts_an_image_with_its_own_fit() -> None:
    from pneumoscan.calibration import cross_fitted

    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 200)
    z = (2 * y - 1) * 2.0 + rng.normal(0, 1.5, 200) + 3.0  # shifted: the site needs its own threshold
    prob, threshold, decisions, band = cross_fitted(y, z, folds=5, seed=1)
    fold_bands = {(d.review["low"], d.review["high"]) for d in decisions}
    assert {tuple(row) for row in band} <= fold_bands  # each image judged by one fold's band
    assert np.all(band[:, 0] <= threshold) and np.all(threshold <= band[:, 1])
    temperatures = [d.temperature for d in decisions]
    assert len(decisions) == 5 and len(set(temperatures)) == 5
    # make one image an extreme outlier: the other folds' calibrations move, its own does not
    own_temperature = z[7] / np.log(prob[7] / (1 - prob[7]))
    z2 = z.copy()
    z2[7] = 40.0
    prob2, threshold2, decisions2, _ = cross_fitted(y, z2, folds=5, seed=1)
    assert prob2[7] == pytest.approx(1 / (1 + np.exp(-40.0 / own_temperature)), rel=1e-9)
    assert threshold2[7] == threshold[7]
    assert sum(t != u for t, u in zip(temperatures, [d.temperature for d in decisions2])) == 4
    with pytest.raises(ConfigError, match="--site-folds"):
        cross_fitted(y, z, folds=1)
    with pytest.raises(ConfigError, match="--site-folds"):
        cross_fitted(np.array([0, 0, 1, 1, 1]), np.zeros(5), folds=3)


def test_evaluate_reports_site_calibrated_figures(tiny_bundle: Path, xray_root: Path, tmp_path: Path) -> None:
    import json

    result = runner.invoke(app, ["evaluate", "--data", str(xray_root), "--split", "test", "--model",
                                 str(tiny_bundle), "--out", str(tmp_path / "r"), "--bootstrap", "100",
                                 "--site-folds", "2"])
    assert result.exit_code == 0, result.output
    assert "site-calibrated, 2-fold cross-fitted" in result.output
    metrics = json.loads((tmp_path / "r" / "metrics.json").read_text())
    site = metrics["site_calibrated"]
    assert site["n"] == 12 and site["folds"] == 2 and site["calibration_n"] == 6
    assert set(metrics["accuracy"]) == set(site["accuracy"]) == {"value", "ci_low", "ci_high"}
    assert "Site-calibrated, 2-fold cross-fitted" in (tmp_path / "r" / "report.md").read_text()
    bad = runner.invoke(app, ["evaluate", "--data", str(xray_root), "--split", "test", "--model",
                              str(tiny_bundle), "--out", str(tmp_path / "r2"), "--site-folds", "7"])
    assert isinstance(bad.exception, ConfigError) and "--site-folds must be between 2 and" in str(bad.exception)


def test_recorded_site_calibrated_figures_reach_the_model_card(tiny_bundle: Path, xray_root: Path,
                                                              tmp_path: Path) -> None:
    from pneumoscan.web import create_app

    bundle = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, bundle)
    result = runner.invoke(app, ["evaluate", "--data", str(xray_root), "--split", "test", "--model", str(bundle),
                                 "--out", str(tmp_path / "r"), "--bootstrap", "100", "--site-folds", "2", "--record"])
    assert result.exit_code == 0, result.output
    recorded = read_spec(bundle).reported_metrics["test"]["site_calibrated"]
    assert recorded["folds"] == 2 and recorded["n"] == 12
    page = create_app({"TESTING": True, "MODEL_DIR": str(bundle)}).test_client().get("/model").get_data(as_text=True)
    assert "site-calibrated (2-fold cross-fitted)" in page
