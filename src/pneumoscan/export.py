"""Export a bundle's network to ONNX (``pneumoscan export``). Serving never imports this module.

The exported graph is :class:`pneumoscan.models.PixelNetwork`: it takes what the preprocessing
makes, uint8 ``B x 1 x S x S`` pixels, does the backbone's normalisation itself, and returns the
uncalibrated log-odds of pneumonia and the pooled features the input gate measures; for pool
heads also ``cam``, each member's class activation map of the log-odds, so that serving draws
heatmaps without PyTorch (:mod:`pneumoscan.heatmap`).
:class:`pneumoscan.runtime.OnnxRunner` runs it.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from pneumoscan.errors import ConfigError
from pneumoscan.models import Classifier, Ensemble, supports_cam
from pneumoscan.runtime import OnnxRunner, TorchRunner
from pneumoscan.spec import BundleSpec, OnnxInfo

ONNX_FILE = "model.onnx"
OPSET = 17
#: Largest allowed difference of calibrated probabilities between ONNX Runtime and PyTorch.
PARITY_TOLERANCE = 1e-4


def export_onnx(model: Classifier | Ensemble, spec: BundleSpec, path: Path, *,
                extractor: Classifier | None = None, share_frozen_layers: bool = True) -> None:
    """Write the network (every member, and the gate's extractor) as one ONNX graph (dynamic batch
    size) to ``path``; the first blocks they all hold byte for byte are computed once
    (``share_frozen_layers=False``: each network whole, for benchmarks).

    Raises:
        ConfigError: the backbone has an operation the exporter cannot express.
    """
    with_cam = supports_cam(model)
    network = TorchRunner.for_bundle(model, spec, extractor=extractor, with_cam=with_cam,
                                     share_frozen_layers=share_frozen_layers).network
    example = torch.zeros(2, 1, spec.input_size, spec.input_size, dtype=torch.uint8)
    outputs = ["log_odds", "features", "cam"] if with_cam else ["log_odds", "features"]
    try:
        # The TorchScript-based exporter: one self-contained file, no onnxscript needed.
        torch.onnx.export(network, (example,), str(path), input_names=["pixels"],
                          output_names=outputs, opset_version=OPSET,
                          dynamic_axes={"pixels": {0: "batch"}, **{name: {0: "batch"} for name in outputs}},
                          # Unfolded, batch norms stay apart from the (fp16-exact) convolution
                          # weights; ONNX Runtime fuses them itself when the session starts.
                          do_constant_folding=spec.weights_dtype != "float16", dynamo=False)
    except Exception as exc:  # the exporter raises many types; the user needs the backbone and why
        raise ConfigError(f"the {spec.backbone} network cannot be exported to ONNX: "
                          f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") from None
    if spec.weights_dtype == "float16":
        store_fp16_weights(path)


def store_fp16_weights(path: Path, *, min_elements: int = 1024) -> int:
    """Store every float32 weight of an ONNX file that fp16 holds exactly as fp16, behind a Cast.

    A bundle's weights are fp16 already, so most are exact and the file halves; ONNX Runtime
    folds the Casts into float32 constants when the session starts, so inference runs in
    float32 at the same speed and gives the same numbers. Weights the exporter changed (folded
    batch norms) stay float32. Returns the number of weights converted.
    """
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load(str(path))
    graph = model.graph
    converted, casts = 0, []
    for initializer in list(graph.initializer):
        if initializer.data_type != onnx.TensorProto.FLOAT:
            continue
        values = numpy_helper.to_array(initializer)
        if values.size < min_elements or not np.array_equal(values.astype(np.float16).astype(np.float32), values):
            continue
        name = initializer.name
        half = numpy_helper.from_array(values.astype(np.float16), f"{name}__fp16")
        graph.initializer.remove(initializer)
        graph.initializer.append(half)
        casts.append(helper.make_node("Cast", [half.name], [name], to=onnx.TensorProto.FLOAT, name=f"{name}__cast"))
        converted += 1
    for node in reversed(casts):
        graph.node.insert(0, node)
    onnx.save(model, str(path))
    return converted


def parity(torch_runner: TorchRunner, spec: BundleSpec, runner: OnnxRunner, pixels: np.ndarray) -> float:
    """Largest difference of calibrated P(pneumonia) between PyTorch and ONNX Runtime on ``pixels``."""
    expected = spec.decision.probability(torch_runner(pixels)[0])
    actual = spec.decision.probability(runner(pixels)[0])
    return float(np.max(np.abs(expected - actual)))


def cam_agreement(model: Classifier | Ensemble, spec: BundleSpec, runner: OnnxRunner,
                  pixels: np.ndarray) -> dict[str, float]:
    """The graph's heatmaps against the grad-cam package's on PyTorch, image by image: the lowest
    Pearson correlation and the largest absolute difference of the [0, 1] maps."""
    from pneumoscan.explain import explain
    from pneumoscan.heatmap import cam_image

    correlations, differences = [], []
    for image, raw in zip(pixels, runner.cam(pixels)):
        reference = explain(model, spec, image).cam
        ours = cam_image(raw, spec.input_size)
        differences.append(float(np.abs(ours - reference).max()))
        if reference.std() > 0 and ours.std() > 0:
            correlations.append(float(np.corrcoef(ours.ravel(), reference.ravel())[0, 1]))
    return {"min_correlation": min(correlations, default=1.0), "max_abs_diff": max(differences),
            "n_images": len(pixels)}


def export_bundle_onnx(bundle_dir: Path | None, out_dir: Path | None = None, *,
                       real_images: Sequence[np.ndarray] = ()) -> OnnxInfo:
    """Export a bundle's network into ``out_dir`` (default: the bundle itself) as ``model.onnx``.

    The parity check runs on random pixels and on ``real_images`` (uint8 ``1 x S x S``); the
    bundle is written only when every probability matches PyTorch within PARITY_TOLERANCE.

    Raises:
        ConfigError: the network cannot be exported, or the exported model disagrees with PyTorch.
    """
    from pneumoscan.models import default_bundle_path, load_bundle, load_gate_extractor, rewrite_bundle
    from pneumoscan.integrity import sha256_file

    bundle_dir = bundle_dir or default_bundle_path()
    out_dir = out_dir or bundle_dir
    model, spec = load_bundle(bundle_dir, check_onnx=False)  # the graph is about to be replaced
    extractor = load_gate_extractor(bundle_dir, spec)
    torch_runner = TorchRunner.for_bundle(model, spec, extractor=extractor)
    size = spec.input_size
    random = np.random.default_rng(0).integers(0, 256, (8, 1, size, size), dtype=np.uint8)
    with tempfile.TemporaryDirectory() as tmp:
        onnx_path = Path(tmp) / ONNX_FILE
        export_onnx(model, spec, onnx_path, extractor=extractor)
        runner = OnnxRunner(onnx_path)
        checks = {"random": parity(torch_runner, spec, runner, random)}
        if real_images:
            checks["real"] = parity(torch_runner, spec, runner, np.stack(list(real_images)))
        worst = max(checks.values())
        if worst > PARITY_TOLERANCE:
            raise ConfigError(f"the ONNX export of {spec.backbone} disagrees with PyTorch: probabilities differ "
                              f"by up to {worst:.2e} (limit {PARITY_TOLERANCE:.0e}); not written")
        agreement = {}
        if runner.has_cam:
            sample = np.stack(list(real_images)[:16]) if real_images else random
            agreement = {k: float(f"{v:.4g}") for k, v in cam_agreement(model, spec, runner, sample).items()}
        info = OnnxInfo(file=ONNX_FILE, sha256=sha256_file(onnx_path), opset=OPSET,
                        parity_max_abs_diff={k: float(f"{v:.3g}") for k, v in checks.items()},
                        n_real_images=len(real_images), cam_agreement=agreement)
        rewrite_bundle(bundle_dir, spec.replace(onnx=info), out_dir, extra_files={ONNX_FILE: onnx_path})
    return info
