"""The bundled models by name: ``--model default`` and ``--model fast`` (the one-network student
distilled from the default, issue 26) on predict, evaluate, explain and serve, in either install."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import image_bytes, make_xray
from pneumoscan.errors import BundleError
from pneumoscan.integrity import (BUNDLED_MODELS, bundle_digest, bundled_model_path, default_bundle_path, read_spec,
                                  resolve_model, verify_bundle)


def _cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pneumoscan", *args], capture_output=True, text=True,
                          timeout=300, cwd=cwd)


def test_model_names_resolve_to_the_bundled_folders_and_paths_stay_paths(tmp_path: Path) -> None:
    assert set(BUNDLED_MODELS) == {"default", "fast"}
    assert resolve_model("default") == default_bundle_path()
    assert resolve_model("fast") == bundled_model_path("fast") != default_bundle_path()
    assert resolve_model("./fast") == Path("./fast")  # a folder called fast, spelled as a path
    assert resolve_model(str(tmp_path)) == tmp_path
    with pytest.raises(BundleError, match="the bundled models are default, fast"):
        bundled_model_path("fastest")


@pytest.mark.parametrize("name", sorted(BUNDLED_MODELS))
def test_every_bundled_model_is_complete_and_pinned(name: str) -> None:
    directory = bundled_model_path(name)
    spec = verify_bundle(directory)  # every file against the manifest, and the pinned digest
    assert spec.onnx is not None and spec.gate is not None and spec.gate.extractor
    assert spec.reported_metrics.get("test") and spec.reported_metrics.get("validation")
    assert spec.weights_dtype == "float16"


def test_the_fast_model_is_one_network_distilled_from_the_default() -> None:
    from pneumoscan.card import model_card

    fast, default = read_spec(bundled_model_path("fast")), read_spec(default_bundle_path())
    assert fast.members == 1 and default.members == 3
    card = model_card(fast)
    assert card["distilled_from"]["name"] == default.name
    assert card["population"] == model_card(default)["population"]  # both learnt from the Kermany films
    assert "Guangzhou" in card["population"]
    # the same split, so its validation figures sit beside the default's
    assert fast.provenance.split_manifest_sha256 == default.provenance.split_manifest_sha256
    # the same frozen gate extractor (its unused classification head aside), so the graph
    # shares the student's first blocks with it
    from safetensors.numpy import load_file

    ours, theirs = (load_file(str(bundled_model_path(name) / "gate_extractor.safetensors")) for name in ("fast", "default"))
    features = [key for key in theirs if key.startswith("features.")]
    assert len(features) > 200 and all((ours[key] == theirs[key]).all() for key in features)


def test_predict_evaluate_and_explain_take_a_model_name(tmp_path: Path, xray_root: Path) -> None:
    image = tmp_path / "film.png"
    image.write_bytes(image_bytes(make_xray(3, pneumonia=True)))
    csv = tmp_path / "fast.csv"
    done = _cli("predict", str(image), "--model", "fast", "--csv", str(csv))
    assert done.returncode == 0, done.stderr[-2000:]
    by_path = _cli("predict", str(image), "--model", str(bundled_model_path("fast")), "--csv", str(tmp_path / "path.csv"))
    assert by_path.returncode == 0 and csv.read_text() == (tmp_path / "path.csv").read_text()
    # a synthetic film is refused by the gate: --no-gate draws its heatmap anyway
    explained = _cli("explain", str(image), "--model", "fast", "--no-gate", "--out", str(tmp_path / "cams"))
    assert explained.returncode == 0, explained.stderr[-2000:]
    assert list((tmp_path / "cams").glob("*.png"))
    evaluated = _cli("evaluate", "--data", str(xray_root), "--split", "test", "--model", "fast",
                     "--out", str(tmp_path / "eval"))
    assert evaluated.returncode == 0, evaluated.stderr[-2000:]
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text())["n"] > 0


def test_a_folder_named_like_a_bundled_model_is_reached_by_its_path(tmp_path: Path) -> None:
    (tmp_path / "fast").mkdir()
    done = _cli("predict", "x.png", "--model", "./fast", cwd=tmp_path)
    assert done.returncode == 2 and "fast is not a model bundle" in done.stderr


def test_models_lists_every_bundled_model_with_its_test_figures() -> None:
    done = _cli("models")
    assert done.returncode == 0, done.stderr
    for name in BUNDLED_MODELS:
        spec = read_spec(bundled_model_path(name))
        accuracy = spec.reported_metrics["test"]["operating_points"]["balanced"]["accuracy"]["value"]
        assert f"{name} " in done.stdout and spec.name in done.stdout and f"accuracy {accuracy:.3f}" in done.stdout


def test_the_fast_model_serves_in_the_light_install() -> None:
    from test_light import _run

    result = _run("""
import json
from pneumoscan.inference import Predictor
from pneumoscan.web import create_app
client = create_app({"TESTING": True, "MODEL_DIR": "fast"}).test_client()
model = client.get("/api/v1/model").get_json()
print(json.dumps({"name": model["name"], "runner": type(Predictor.from_bundle("fast").runner).__name__}))
""")
    assert result.returncode == 0, result.stderr[-2000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out == {"name": read_spec(bundled_model_path("fast")).name, "runner": "OnnxRunner"}
    assert bundle_digest(bundled_model_path("fast"))
