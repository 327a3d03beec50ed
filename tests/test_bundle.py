"""pneumoscan.models.bundle: round trip, integrity, format checks, atomic writes."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from pneumoscan.errors import BundleError
from pneumoscan.models import BundleSpec, create_classifier, load_bundle, read_spec, save_bundle
from pneumoscan.spec import Decision
from pneumoscan.models.bundle import SPEC_FILE, WEIGHTS_FILE


def _spec(threshold: float = 0.37, **kw) -> BundleSpec:
    fields = dict(backbone="efficientnet_lite0", head="pool", input_size=64,
                  mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), decision=Decision(threshold=threshold))
    return BundleSpec(**{**fields, **kw})


@pytest.fixture()
def model() -> torch.nn.Module:
    torch.manual_seed(0)
    return create_classifier("efficientnet_lite0", input_size=64).eval()


def test_round_trip_gives_identical_outputs(model: torch.nn.Module, tmp_path: Path) -> None:
    written = save_bundle(model, _spec(), tmp_path / "b")
    loaded, spec = load_bundle(tmp_path / "b")
    assert spec == written and spec.decision.threshold == 0.37 and len(spec.weights_sha256) == 64
    x = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)
    assert not loaded.training


def test_fp16_bundle_predicts_like_fp32(model: torch.nn.Module, tmp_path: Path) -> None:
    save_bundle(model, _spec(), tmp_path / "half", half=True)
    loaded, spec = load_bundle(tmp_path / "half")
    assert spec.weights_dtype == "float16"
    assert (tmp_path / "half" / WEIGHTS_FILE).stat().st_size < 0.6 * sum(
        v.numel() * 4 for v in model.state_dict().values())
    x = torch.randn(4, 3, 64, 64)
    with torch.no_grad():
        p_half = loaded(x).softmax(1)
        p_full = model(x).softmax(1)
    assert (p_half - p_full).abs().max() < 2e-2


def test_tampered_weights_are_refused(model: torch.nn.Module, tmp_path: Path) -> None:
    save_bundle(model, _spec(), tmp_path / "b")
    weights = tmp_path / "b" / WEIGHTS_FILE
    data = bytearray(weights.read_bytes())
    data[-10] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(BundleError, match="corrupt or was modified"):
        load_bundle(tmp_path / "b")


def test_missing_and_malformed_bundles(model: torch.nn.Module, tmp_path: Path) -> None:
    with pytest.raises(BundleError, match="does not exist"):
        load_bundle(tmp_path / "nothing")
    save_bundle(model, _spec(), tmp_path / "b")
    spec_path = tmp_path / "b" / SPEC_FILE
    raw = json.loads(spec_path.read_text())
    spec_path.write_text(json.dumps({**raw, "format_version": 99}))
    with pytest.raises(BundleError, match="format version 99"):
        read_spec(tmp_path / "b")
    spec_path.write_text("{not json")
    with pytest.raises(BundleError, match="not valid JSON"):
        read_spec(tmp_path / "b")
    spec_path.write_text(json.dumps({**raw, "backbone": "resnet50"}))
    with pytest.raises(BundleError, match="does not fit"):
        load_bundle(tmp_path / "b")
    (tmp_path / "b" / WEIGHTS_FILE).unlink()
    with pytest.raises(BundleError, match="missing"):
        load_bundle(tmp_path / "b")


def test_save_is_atomic_and_replaces(model: torch.nn.Module, tmp_path: Path,
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    save_bundle(model, _spec(), tmp_path / "b")
    before = (tmp_path / "b" / WEIGHTS_FILE).read_bytes()

    def broken_copy(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(shutil, "copyfile", broken_copy)
    with pytest.raises(OSError):
        save_bundle(model, _spec(threshold=0.9), tmp_path / "b", extra_files={"x": tmp_path / "y"})
    monkeypatch.undo()
    assert (tmp_path / "b" / WEIGHTS_FILE).read_bytes() == before
    assert read_spec(tmp_path / "b").decision.threshold == 0.37
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]  # no temporary leftovers
    save_bundle(model, _spec(threshold=0.6), tmp_path / "b")
    assert read_spec(tmp_path / "b").decision.threshold == 0.6


def test_bundle_without_calibration_loads_uncalibrated(model: torch.nn.Module, tmp_path: Path) -> None:
    """A format-1 bundle written before calibration existed: threshold 0.5, temperature 1."""
    from pneumoscan.inference import Predictor

    save_bundle(model, _spec(threshold=0.5), tmp_path / "old")
    spec_path = tmp_path / "old" / SPEC_FILE
    raw = json.loads(spec_path.read_text())
    decision = raw.pop("decision")
    raw.update(format_version=1, threshold=decision["threshold"], threshold_source="default",
               training={}, versions={}, gate={}, onnx={})  # the flat version-1 layout
    del raw["provenance"]
    spec_path.write_text(json.dumps(raw))
    predictor = Predictor.from_bundle(tmp_path / "old")
    assert predictor.decision.calibration == "none" and predictor.decision.temperature == 1.0
    assert predictor.decision.threshold_for() == (0.5, "balanced")
    assert predictor.spec.gate is None and predictor.spec.onnx is None


@pytest.mark.parametrize(("edit", "message"), [
    (lambda raw: raw.update(class_names=["PNEUMONIA", "NORMAL"]), "class_names must be"),
    (lambda raw: raw["decision"].update(temperature=0), "temperature must be a positive number"),
    (lambda raw: raw["decision"].update(temperature="warm"), "temperature must be a positive number"),
    (lambda raw: raw["decision"].update(threshold="abc"), "threshold must be a number between 0 and 1"),
    (lambda raw: raw["decision"].update(operating_points={"balanced": 1.7}), "operating point 'balanced'"),
    (lambda raw: raw["decision"].update(operating_points={"x": 0.3}), "default operating point 'balanced'"),
])
def test_values_a_network_cannot_be_served_with_are_refused(model: torch.nn.Module, tmp_path: Path,
                                                           edit, message: str) -> None:
    save_bundle(model, _spec(), tmp_path / "b")
    path = tmp_path / "b" / SPEC_FILE
    raw = json.loads(path.read_text())
    edit(raw)
    path.write_text(json.dumps(raw))
    with pytest.raises(BundleError, match=message):
        load_bundle(tmp_path / "b")
