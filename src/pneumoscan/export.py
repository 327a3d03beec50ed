"""Export a bundle's network to ONNX, and run it with ONNX Runtime.

The exported graph takes what the preprocessing makes, uint8 ``B x 1 x S x S`` pixels, and does
the backbone's normalisation itself. It returns the same two things as
:meth:`pneumoscan.inference.Predictor.forward`: the uncalibrated log-odds of pneumonia per image,
and the pooled backbone features that the input gate measures.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from pneumoscan.errors import BundleError, ConfigError
from pneumoscan.models import BundleSpec, Classifier

ONNX_FILE = "model.onnx"
OPSET = 17
#: Largest allowed difference of calibrated probabilities between ONNX Runtime and PyTorch.
PARITY_TOLERANCE = 1e-4


class _LogOddsAndFeatures(nn.Module):
    """uint8 pixels -> (log-odds, pooled features), normalisation included."""

    def __init__(self, model: Classifier, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.model = model
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1))

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = pixels.float() / 255.0
        x = (x.expand(-1, 3, -1, -1) - self.mean) / self.std
        feature_map = self.model.features(x)
        logits = self.model.head(feature_map)
        pooled = feature_map.mean(dim=(2, 3)) if feature_map.ndim == 4 else feature_map
        return logits[:, 1] - logits[:, 0], pooled


def export_onnx(model: Classifier, spec: BundleSpec, path: Path) -> None:
    """Write the network as ONNX (dynamic batch size) to ``path``.

    Raises:
        ConfigError: the backbone has an operation the exporter cannot express.
    """
    wrapper = _LogOddsAndFeatures(model.eval(), spec.mean, spec.std).eval()
    example = torch.zeros(2, 1, spec.input_size, spec.input_size, dtype=torch.uint8)
    try:
        # The TorchScript-based exporter: one self-contained file, no onnxscript needed.
        torch.onnx.export(wrapper, (example,), str(path), input_names=["pixels"],
                          output_names=["log_odds", "features"], opset_version=OPSET,
                          dynamic_axes={"pixels": {0: "batch"}, "log_odds": {0: "batch"}, "features": {0: "batch"}},
                          dynamo=False)
    except Exception as exc:  # the exporter raises many types; the user needs the backbone and why
        raise ConfigError(f"the {spec.backbone} network cannot be exported to ONNX: "
                          f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") from None


def usable_cores() -> int:
    """Cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def default_threads() -> int:
    """ONNX Runtime's threads: ``PNEUMOSCAN_INFERENCE_THREADS``, else every usable core."""
    configured = os.environ.get("PNEUMOSCAN_INFERENCE_THREADS")
    if configured:
        if not configured.isdigit() or int(configured) < 1:
            raise ConfigError(f"PNEUMOSCAN_INFERENCE_THREADS must be a positive whole number, got {configured!r}")
        return int(configured)
    return usable_cores()


class OnnxRunner:
    """An ONNX Runtime session over the exported graph, sized for a small CPU."""

    def __init__(self, path: Path, *, threads: int | None = None) -> None:
        try:
            import onnxruntime as ort
        except ImportError:
            raise ConfigError("onnxruntime is not installed (pip install onnxruntime)") from None
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or default_threads()
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        try:
            self.session = ort.InferenceSession(str(path), sess_options=options,
                                                providers=["CPUExecutionProvider"])
        except Exception as exc:
            raise BundleError(f"{path} is not a usable ONNX model: {str(exc).splitlines()[0]}") from None

    def __call__(self, pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """uint8 ``B x 1 x S x S`` -> (log-odds ``B``, pooled features ``B x C``)."""
        log_odds, features = self.session.run(None, {"pixels": np.ascontiguousarray(pixels, dtype=np.uint8)})
        return log_odds, features


def parity(model: Classifier, spec: BundleSpec, runner: OnnxRunner, pixels: torch.Tensor) -> float:
    """Largest difference of calibrated P(pneumonia) between PyTorch and ONNX Runtime on ``pixels``."""
    wrapper = _LogOddsAndFeatures(model.eval(), spec.mean, spec.std).eval()
    with torch.inference_mode():
        expected = wrapper(pixels)[0].double().numpy()
    actual = runner(pixels.numpy())[0].astype(np.float64)
    sigmoid = lambda z: 1.0 / (1.0 + np.exp(-z / spec.temperature))  # noqa: E731
    return float(np.max(np.abs(sigmoid(expected) - sigmoid(actual))))


def export_bundle_onnx(bundle_dir: Path | None, out_dir: Path | None = None, *,
                       real_images: Sequence[torch.Tensor] = ()) -> dict[str, Any]:
    """Export a bundle's network into ``out_dir`` (default: the bundle itself) as ``model.onnx``.

    The parity check runs on random pixels and on ``real_images`` (uint8 ``1 x S x S``); the
    bundle is written only when every probability matches PyTorch within PARITY_TOLERANCE.

    Raises:
        ConfigError: the network cannot be exported, or the exported model disagrees with PyTorch.
    """
    from pneumoscan.models import default_bundle_path, load_bundle, rewrite_bundle
    from pneumoscan.models.bundle import sha256_file

    bundle_dir = bundle_dir or default_bundle_path()
    out_dir = out_dir or bundle_dir
    model, spec = load_bundle(bundle_dir)
    size = spec.input_size
    generator = torch.Generator().manual_seed(0)
    random = torch.randint(0, 256, (8, 1, size, size), dtype=torch.uint8, generator=generator)
    with tempfile.TemporaryDirectory() as tmp:
        onnx_path = Path(tmp) / ONNX_FILE
        export_onnx(model, spec, onnx_path)
        runner = OnnxRunner(onnx_path)
        checks = {"random": parity(model, spec, runner, random)}
        if real_images:
            checks["real"] = parity(model, spec, runner, torch.stack(list(real_images)))
        worst = max(checks.values())
        if worst > PARITY_TOLERANCE:
            raise ConfigError(f"the ONNX export of {spec.backbone} disagrees with PyTorch: probabilities differ "
                              f"by up to {worst:.2e} (limit {PARITY_TOLERANCE:.0e}); not written")
        info = {"file": ONNX_FILE, "sha256": sha256_file(onnx_path), "opset": OPSET,
                "parity_max_abs_diff": {k: float(f"{v:.3g}") for k, v in checks.items()},
                "n_real_images": len(real_images)}
        rewrite_bundle(bundle_dir, spec.replace(onnx=info), out_dir,
                       extra_files={ONNX_FILE: onnx_path})
    return info
