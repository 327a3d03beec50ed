"""The optional OpenVINO backend: the same exported graph, the same answers as ONNX Runtime."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import make_xray


def test_openvino_gives_onnx_runtimes_probabilities_and_heatmaps(exported_bundle: Path) -> None:
    pytest.importorskip("openvino", reason="the optional OpenVINO backend is not installed")
    from pneumoscan.inference import Predictor

    reference = Predictor.from_bundle(exported_bundle, backend="onnxruntime")
    openvino = Predictor.from_bundle(exported_bundle, backend="openvino")
    assert openvino.backend == "openvino" and openvino.runner.has_cam
    # unpinned: pinned, every gunicorn worker's inference thread would share the first core
    assert openvino.runner.compiled.get_property("ENABLE_CPU_PINNING") is False
    images = [make_xray(seed) for seed in range(6)]
    expected, got = reference.predict(images, gate=False), openvino.predict(images, gate=False)
    assert [r.label for r in got] == [r.label for r in expected]
    assert np.allclose([r.probability for r in got], [r.probability for r in expected], atol=1e-5, rtol=0)
    assert np.abs(openvino.explain(images[0]).cam - reference.explain(images[0]).cam).max() < 1e-4


def test_openvino_backend_without_the_package_names_the_extra(exported_bundle: Path, monkeypatch) -> None:
    from pneumoscan.errors import ConfigError
    from pneumoscan.inference import Predictor

    monkeypatch.setitem(sys.modules, "openvino", None)  # import openvino -> ImportError
    with pytest.raises(ConfigError, match=r"pip install 'pneumoscan\[openvino\]'"):
        Predictor.from_bundle(exported_bundle, backend="openvino")


def test_openvino_backend_needs_an_exported_graph(tiny_bundle: Path, tmp_path: Path) -> None:
    from pneumoscan.errors import ConfigError
    from pneumoscan.inference import Predictor
    from pneumoscan.integrity import read_spec

    if read_spec(tiny_bundle).onnx is not None:
        pytest.skip("this environment's test bundle is exported")
    with pytest.raises(ConfigError, match="has no ONNX model"):
        Predictor.from_bundle(tiny_bundle, backend="openvino")
