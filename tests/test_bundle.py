"""pneumoscan.models.bundle: round trip, integrity, format checks, atomic writes."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from pneumoscan.errors import BundleError
from pneumoscan.models import BundleSpec, create_classifier, load_bundle, read_spec, save_bundle, verify_bundle
from pneumoscan.spec import Decision
from pneumoscan.integrity import MANIFEST_FILE, write_manifest
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
    _write_sealed(spec_path, json.dumps({**raw, "format_version": 99}))
    with pytest.raises(BundleError, match="format version 99"):
        read_spec(tmp_path / "b")
    _write_sealed(spec_path, "{not json")
    with pytest.raises(BundleError, match="not valid JSON"):
        read_spec(tmp_path / "b")
    _write_sealed(spec_path, json.dumps({**raw, "backbone": "resnet50"}))
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
    _write_sealed(spec_path, json.dumps(raw))
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
    _write_sealed(path, json.dumps(raw))  # as a buggy tool would write it, manifest and all
    with pytest.raises(BundleError, match=message):
        load_bundle(tmp_path / "b")


def _write_sealed(path: Path, text: str) -> None:
    """Rewrite a bundle file and its manifest together (what a buggy tool, not a tamperer, does)."""
    path.write_text(text)
    write_manifest(path.parent)


@pytest.mark.parametrize("edit", [
    lambda raw: raw.update(class_names=["PNEUMONIA", "NORMAL"]),
    lambda raw: raw["decision"].update(threshold=0.9),
    lambda raw: raw["decision"].update(temperature=2.0),
    lambda raw: raw.update(gate=None),
])
def test_an_edited_model_json_is_refused_naming_it(model: torch.nn.Module, tmp_path: Path, edit) -> None:
    """model.json is covered like every other file: a swapped label, an edited threshold or
    temperature, a removed gate entry are all refused, in one line that names the file."""
    save_bundle(model, _spec(), tmp_path / "b")
    path = tmp_path / "b" / SPEC_FILE
    raw = json.loads(path.read_text())
    edit(raw)
    path.write_text(json.dumps(raw))
    for load in (read_spec, load_bundle, verify_bundle):
        with pytest.raises(BundleError, match=r"model\.json is corrupt or was modified") as caught:
            load(tmp_path / "b")
        assert "\n" not in str(caught.value)


def test_every_file_is_covered_and_the_digest_can_be_pinned(model: torch.nn.Module, tmp_path: Path) -> None:
    from pneumoscan.models import bundle_digest, seal_bundle

    split = tmp_path / "split.csv"
    split.write_text("path,label,role\na.png,0,train\n")
    save_bundle(model, _spec(), tmp_path / "b", extra_files={"split.csv": split})
    bundle = tmp_path / "b"
    digest = bundle_digest(bundle)
    assert verify_bundle(bundle, expected_digest=digest).name == _spec().name
    (bundle / "split.csv").write_text("path,label,role\na.png,0,validation\n")
    with pytest.raises(BundleError, match=r"split\.csv is corrupt or was modified"):
        verify_bundle(bundle)
    (bundle / "split.csv").write_text("path,label,role\na.png,0,train\n")
    # a tamperer who rewrites the manifest too is caught by a pinned digest
    raw = json.loads((bundle / SPEC_FILE).read_text())
    raw["decision"]["threshold"] = 0.99
    _write_sealed(bundle / SPEC_FILE, json.dumps(raw))
    assert verify_bundle(bundle).decision.threshold == 0.99  # unpinned: consistent, so accepted
    with pytest.raises(BundleError, match="digest .* was expected"):
        verify_bundle(bundle, expected_digest=digest)
    (bundle / "split.csv").unlink()
    with pytest.raises(BundleError, match=r"split\.csv is missing"):
        verify_bundle(bundle)
    # a bundle from before manifests: refused, with the command that seals it
    save_bundle(model, _spec(), tmp_path / "old")
    (tmp_path / "old" / MANIFEST_FILE).unlink()
    with pytest.raises(BundleError, match="pneumoscan seal --model"):
        load_bundle(tmp_path / "old")
    new_digest = seal_bundle(tmp_path / "old")
    assert bundle_digest(tmp_path / "old") == new_digest and load_bundle(tmp_path / "old")[1].name
    with pytest.raises(BundleError, match="already sealed"):
        seal_bundle(tmp_path / "old")
    (tmp_path / "old" / MANIFEST_FILE).unlink()
    (tmp_path / "old" / WEIGHTS_FILE).write_bytes(b"not the weights")
    with pytest.raises(BundleError, match="differs from model.json; not sealing"):
        seal_bundle(tmp_path / "old")


def test_the_packaged_bundle_is_pinned_by_its_digest(monkeypatch: pytest.MonkeyPatch) -> None:
    from pneumoscan import integrity
    from pneumoscan.models import bundle_digest, default_bundle_path

    assert bundle_digest(default_bundle_path()) == integrity.DEFAULT_BUNDLE_DIGEST
    assert read_spec(default_bundle_path()).members >= 1
    monkeypatch.setattr(integrity, "DEFAULT_BUNDLE_DIGEST", "0" * 64)  # as if its files and manifest were both edited
    with pytest.raises(BundleError, match="was expected"):
        read_spec(default_bundle_path())
