"""ONNX export and the ONNX Runtime backend: same probabilities as PyTorch, checked files, clear errors."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

pytest.importorskip("onnxruntime")

from conftest import make_xray  # noqa: E402
from pneumoscan.imaging import square_resize  # noqa: E402
from pneumoscan.errors import BundleError, ConfigError  # noqa: E402
from pneumoscan.inference import Predictor  # noqa: E402


@pytest.fixture(scope="module")
def onnx_bundle(tiny_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from pneumoscan.export import export_bundle_onnx
    from pneumoscan.models import read_spec

    out = tmp_path_factory.mktemp("onnx") / "bundle"
    size = read_spec(tiny_bundle).input_size
    real = [square_resize(make_xray(i, pneumonia=i % 2 == 0), size) for i in range(6)]
    info = export_bundle_onnx(tiny_bundle, out, real_images=real)
    assert info.n_real_images == 6 and max(info.parity_max_abs_diff.values()) <= 1e-4
    return out


def test_export_writes_a_checked_onnx_model_and_keeps_the_rest(onnx_bundle: Path, tiny_bundle: Path) -> None:
    from pneumoscan.models import read_spec, verify_bundle
    from pneumoscan.models.bundle import sha256_file

    spec = verify_bundle(onnx_bundle)
    assert spec.onnx.sha256 == sha256_file(onnx_bundle / "model.onnx")
    assert spec.weights_sha256 == read_spec(tiny_bundle).weights_sha256
    assert (onnx_bundle / "split.csv").read_bytes() == (tiny_bundle / "split.csv").read_bytes()


@pytest.mark.parametrize("tta", [False, True])
def test_onnxruntime_and_pytorch_give_the_same_probabilities(onnx_bundle: Path, xray_root: Path, tta: bool) -> None:
    onnx = Predictor.from_bundle(onnx_bundle, tta=tta)
    eager = Predictor.from_bundle(onnx_bundle, tta=tta, backend="torch")
    assert (onnx.backend, eager.backend) == ("onnxruntime", "torch")
    paths = sorted((xray_root / "test").rglob("*.jpeg"))
    a, b = onnx.predict_paths(paths, batch_size=5), eager.predict_paths(paths, batch_size=5)
    assert len(a) == len(paths)
    assert max(abs(x.probability - y.probability) for x, y in zip(a, b)) <= 1e-4
    assert [x.label for x in a] == [y.label for y in b]
    images = [make_xray(40 + i) for i in range(3)]
    pixels = np.stack([onnx.preprocessing.pixels(im) for im in images])
    fa, fb = onnx.forward(pixels)[1], eager.forward(pixels)[1]
    assert np.allclose(fa, fb, atol=1e-4)  # the gate sees the same features


def test_tampered_onnx_is_refused_unless_fallback_is_allowed(onnx_bundle: Path, tmp_path: Path, caplog) -> None:
    bundle = tmp_path / "bundle"
    shutil.copytree(onnx_bundle, bundle)
    onnx_file = bundle / "model.onnx"
    onnx_file.write_bytes(onnx_file.read_bytes()[:-16] + b"\x00" * 16)
    with pytest.raises(BundleError, match="model.onnx is missing, corrupt or was modified"):
        Predictor.from_bundle(bundle)
    caplog.set_level(logging.WARNING)
    predictor = Predictor.from_bundle(bundle, allow_torch_fallback=True)
    assert predictor.backend == "torch" and "running the network on PyTorch instead" in caplog.text


def test_onnxruntime_backend_needs_an_exported_model(tiny_bundle: Path) -> None:
    with pytest.raises(ConfigError, match="has no ONNX model, which this install needs to run it: run 'pneumoscan export"):
        Predictor.from_bundle(tiny_bundle, backend="onnxruntime")
    with pytest.raises(ConfigError, match="unknown inference backend"):
        Predictor.from_bundle(tiny_bundle, backend="tensorrt")


class _Spectrum(nn.Module):
    """A feature extractor with an FFT, which the ONNX exporter has no operator for."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.fft.rfft2(x).abs()[..., :4, :4]


def test_a_network_that_cannot_be_exported_gives_a_clear_error(tiny_bundle: Path, tmp_path: Path) -> None:
    from pneumoscan.export import export_onnx
    from pneumoscan.models import Classifier, read_spec

    network = Classifier(_Spectrum(), nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 2)), blocks=[], cam_layer="")
    with pytest.raises(ConfigError, match="cannot be exported to ONNX"):
        export_onnx(network, read_spec(tiny_bundle), tmp_path / "model.onnx")


def test_export_and_predict_through_the_cli(tiny_bundle: Path, xray_root: Path, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from pneumoscan.cli import app

    bundle = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, bundle)
    runner = CliRunner()
    result = runner.invoke(app, ["export", "--model", str(bundle), "--data", str(xray_root)])
    assert result.exit_code == 0, result.output
    assert "largest probability difference from PyTorch: random" in result.output and "real" in result.output
    rows = {}
    for backend in ("onnxruntime", "torch"):
        out = tmp_path / f"{backend}.csv"
        result = runner.invoke(app, ["predict", "--model", str(bundle), "--backend", backend,
                                     str(xray_root / "test"), "--csv", str(out)])
        assert result.exit_code == 0, result.output
        rows[backend] = [line.split(",") for line in out.read_text().splitlines()[1:]]
    for a, b in zip(rows["onnxruntime"], rows["torch"]):
        assert a[0] == b[0] and a[1] == b[1] == "ok" and a[2] == b[2] and abs(float(a[3]) - float(b[3])) <= 1e-4
    result = runner.invoke(app, ["export", "--model", str(bundle), "--format", "tflite"])
    assert result.exit_code == 2 and "unknown export format" in result.output


def test_the_web_app_serves_with_onnxruntime(onnx_bundle: Path) -> None:
    from pneumoscan.web import create_app

    app = create_app({"TESTING": True, "MODEL_DIR": str(onnx_bundle)})
    assert app.test_client().get("/readyz").get_json()["backend"] == "onnxruntime"
    app = create_app({"TESTING": True, "MODEL_DIR": str(onnx_bundle), "BACKEND": "torch"})
    assert app.test_client().get("/readyz").get_json()["backend"] == "torch"


def test_the_graph_draws_the_heatmap_grad_cam_draws(onnx_bundle: Path, xray_root: Path) -> None:
    """For the pool head, the graph's class activation map of the log-odds is Grad-CAM at the
    last feature map: the same map, without gradients and without PyTorch at serving time."""
    from pneumoscan.explain import explain
    from pneumoscan.imaging import Preprocessing
    from pneumoscan.inference import Predictor
    from pneumoscan.models import read_spec

    spec = read_spec(onnx_bundle)
    agreement = spec.onnx.cam_agreement
    assert agreement["n_images"] > 0 and agreement["min_correlation"] > 0.99
    predictor = Predictor.from_bundle(onnx_bundle)
    assert predictor.runner.has_cam
    for path in sorted((xray_root / "test" / "PNEUMONIA").iterdir())[:3]:
        image = Preprocessing(spec.input_size).load(path)
        ours = predictor.explain(image).cam
        reference = explain(predictor.model, spec, predictor.preprocessing.pixels(image)).cam
        assert ours.shape == reference.shape == (spec.input_size, spec.input_size)
        assert np.abs(ours - reference).max() < 0.1
        if reference.std() > 0:  # all-zero when no location argues for pneumonia: then both are
            assert np.corrcoef(ours.ravel(), reference.ravel())[0, 1] > 0.99
