"""Predictions from a model bundle: bytes, images or files in, calibrated-threshold labels out.

This is what the CLI's ``predict`` and the web app call; it never imports Lightning.
"""

from __future__ import annotations

import logging
import math
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np
import torch
from PIL import Image

from pneumoscan.data import decode_image, load_image, normalize, square_resize
from pneumoscan.errors import BundleError, ConfigError, PneumoscanError
from pneumoscan.models import BundleSpec, Classifier, default_bundle_path, load_bundle

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    from pneumoscan.explain import Explanation
    from pneumoscan.export import OnnxRunner
    from pneumoscan.gate import FeatureGate


def _load_gate(directory: Path, spec: BundleSpec) -> "FeatureGate | None":
    """The bundle's feature gate (its sha256 was checked with the bundle), or None."""
    if not spec.gate:
        return None
    from pneumoscan.gate import FeatureGate

    return FeatureGate.load(directory / spec.gate.get("file", "gate.safetensors"))


@dataclass(frozen=True)
class Prediction:
    """One image's result."""

    label: str
    probability_pneumonia: float  # calibrated (temperature-scaled) when the bundle is
    threshold: float
    operating_point: str
    ood_distance: float | None = None  # Mahalanobis distance to the training features, if gated


@dataclass(frozen=True)
class PathOutcome:
    """One file's result in a batch: a prediction, or the reason it has none."""

    path: str
    label: str | None = None
    probability: float | None = None  # calibrated
    log_odds: float | None = None  # uncalibrated logit(P(pneumonia)), for calibration reports
    error: str | None = None


BACKENDS = ("auto", "onnxruntime", "torch")


def _onnx_runner(directory: Path, spec: BundleSpec, backend: str,
                 allow_torch_fallback: bool = False) -> "OnnxRunner | None":
    """The bundle's ONNX Runtime session when ``backend`` asks for (or allows) one, else None.

    With ``allow_torch_fallback``, an ONNX file that is tampered or unusable gives a warning and
    None (PyTorch runs instead); without it, an error.

    Raises:
        ConfigError: ``onnxruntime`` was asked for, but the bundle has no ONNX model or
            onnxruntime is not installed.
        BundleError: the ONNX file is tampered or unusable, and fallback is not allowed.
    """
    if backend not in BACKENDS:
        raise ConfigError(f"unknown inference backend '{backend}'; choose one of {', '.join(BACKENDS)}")
    if backend == "torch":
        return None
    if not spec.onnx:
        if backend == "onnxruntime":
            raise ConfigError(f"{directory} has no ONNX model; run 'pneumoscan export --model {directory}' first")
        return None
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        if backend == "onnxruntime":
            raise ConfigError("the onnxruntime backend needs the onnxruntime package (pip install onnxruntime)") from None
        return None
    from pneumoscan.export import OnnxRunner
    from pneumoscan.models import verify_part

    try:
        verify_part(directory, spec.onnx)
        return OnnxRunner(directory / spec.onnx["file"])
    except BundleError as exc:
        if not allow_torch_fallback:
            raise
        log.warning("%s; running the network on PyTorch instead", exc)
        return None


def bundle_pixels(spec: BundleSpec, image: Image.Image) -> torch.Tensor:
    """Greyscale image -> the uint8 ``1 x S x S`` a bundle's network takes: the square resize it
    was trained with, and histogram equalisation when it was trained with that. The one place the
    serving side turns an image into the network's input."""
    return square_resize(image, spec.input_size, equalize=spec.equalize)


def read_bundle_pixels(spec: BundleSpec, path: str | Path) -> torch.Tensor:
    """An image file -> :func:`bundle_pixels` (JPEGs decoded at no more resolution than needed).

    Raises:
        InvalidImageError: the file cannot be read or decoded.
    """
    return bundle_pixels(spec, load_image(path, draft_size=spec.input_size))


class Predictor:
    """A loaded bundle plus the exact preprocessing it was trained with.

    The network runs on ONNX Runtime when the bundle carries an exported model (and onnxruntime
    is installed), on PyTorch otherwise; both give the same probabilities. Grad-CAM always runs
    on the PyTorch network.
    """

    def __init__(self, model: Classifier, spec: BundleSpec, *, tta: bool = False,
                 gate: "FeatureGate | None" = None, onnx: "OnnxRunner | None" = None) -> None:
        self.model = model.eval()
        self.spec = spec
        self.tta = tta
        self.gate = gate
        self.onnx = onnx
        # One forward at a time per process: concurrent requests would oversubscribe the cores.
        self._lock = threading.Lock()

    @property
    def backend(self) -> str:
        """``onnxruntime`` or ``torch``: what runs the network."""
        return "onnxruntime" if self.onnx is not None else "torch"

    @classmethod
    def from_bundle(cls, path: str | Path | None = None, *, tta: bool = False, backend: str = "auto",
                    allow_torch_fallback: bool = False) -> "Predictor":
        """Load a bundle (the packaged default model when ``path`` is None).

        ``tta`` averages the logits of each image and its horizontal mirror. ``backend``:
        ``auto`` (ONNX Runtime when the bundle has an ONNX model and onnxruntime is installed),
        ``onnxruntime`` or ``torch``. ``allow_torch_fallback`` turns a tampered or unusable ONNX
        file into a logged warning and PyTorch inference instead of an error.

        Raises:
            BundleError: missing, corrupt or tampered bundle (weights, gate or ONNX file).
            ConfigError: an unknown backend, or ``onnxruntime`` when it cannot be used.
        """
        directory = default_bundle_path() if path is None else Path(path)
        model, spec = load_bundle(directory, check_onnx=False)  # the ONNX file is checked below
        return cls(model, spec, tta=tta, gate=_load_gate(directory, spec),
                   onnx=_onnx_runner(directory, spec, backend, allow_torch_fallback))

    @property
    def operating_points(self) -> dict[str, float]:
        """Named thresholds from the bundle (at least the default one)."""
        return self.spec.operating_points or {self.spec.default_operating_point: self.spec.threshold}

    def threshold_for(self, operating_point: str | None = None, threshold: float | None = None) -> tuple[float, str]:
        """``(threshold, operating point name)``: an explicit threshold wins, then a named point.

        Raises:
            ConfigError: an unknown operating point or a threshold outside [0, 1].
        """
        if threshold is not None:
            if not 0.0 <= threshold <= 1.0 or math.isnan(threshold):
                raise ConfigError(f"threshold must be between 0 and 1, got {threshold}")
            return threshold, "custom"
        name = operating_point or self.spec.default_operating_point
        points = self.operating_points
        if name not in points:
            raise ConfigError(f"unknown operating point '{name}'; this model has: {', '.join(points)}")
        return points[name], name

    def label_for(self, probability: float, threshold: float | None = None) -> str:
        """Class name for a probability at ``threshold`` (the bundle's by default)."""
        cut = self.spec.threshold if threshold is None else threshold
        return self.spec.class_names[1] if probability >= cut else self.spec.class_names[0]

    def calibrate(self, log_odds: float) -> float:
        """Uncalibrated log-odds -> calibrated P(pneumonia) (the bundle's temperature)."""
        z = log_odds / self.spec.temperature
        return 1.0 / (1.0 + math.exp(-z)) if z >= 0 else math.exp(z) / (1.0 + math.exp(z))

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        """Greyscale image -> uint8 ``1 x S x S`` (the same square resize, and equalisation, as training)."""
        return bundle_pixels(self.spec, image)

    @torch.inference_mode()
    def forward(self, pixels: torch.Tensor) -> tuple[list[float], torch.Tensor]:
        """uint8 ``B x 1 x S x S`` -> (uncalibrated logit(P(pneumonia)) per image, pooled features)."""
        if self.onnx is not None:
            return self._forward_onnx(pixels)
        x = normalize(pixels, self.spec.mean, self.spec.std)
        with self._lock:
            feature_map = self.model.features(x)
            logits = self.model.head(feature_map)
            if self.tta:
                logits = (logits + self.model(x.flip(-1))) / 2
        pooled = feature_map.mean(dim=(2, 3)) if feature_map.ndim == 4 else feature_map
        return (logits[:, 1] - logits[:, 0]).tolist(), pooled

    def _forward_onnx(self, pixels: torch.Tensor) -> tuple[list[float], torch.Tensor]:
        array = pixels.numpy()
        with self._lock:
            log_odds, features = self.onnx(array)
            if self.tta:
                log_odds = (log_odds + self.onnx(array[..., ::-1])[0]) / 2
        return log_odds.astype(float).tolist(), torch.from_numpy(features)

    def log_odds(self, pixels: torch.Tensor) -> list[float]:
        """uint8 ``B x 1 x S x S`` -> uncalibrated logit(P(pneumonia)) per image."""
        return self.forward(pixels)[0]

    def predict_images(self, images: Sequence[Image.Image], *, operating_point: str | None = None,
                       threshold: float | None = None) -> list[Prediction]:
        """Predict decoded greyscale images in one batch."""
        cut, name = self.threshold_for(operating_point, threshold)
        if not images:
            return []
        log_odds, features = self.forward(self._batch([self.preprocess(im) for im in images]))
        distances = self.gate.distances(features.numpy()) if self.gate is not None else [None] * len(images)
        return [Prediction(self.label_for(p, cut), p, cut, name, None if d is None else float(d))
                for p, d in zip((self.calibrate(z) for z in log_odds), distances)]

    @staticmethod
    def _batch(pixels: Sequence[torch.Tensor]) -> torch.Tensor:
        """Stack ``1 x S x S`` tensors into a batch with numpy, so that the ONNX Runtime path never
        starts torch's own thread pool beside ONNX Runtime's on a small CPU."""
        return torch.from_numpy(np.stack([p.numpy() for p in pixels]))

    def is_out_of_distribution(self, prediction: Prediction) -> bool:
        """True when the bundle has a feature gate and the image lies beyond its threshold."""
        return (self.gate is not None and prediction.ood_distance is not None
                and prediction.ood_distance > self.gate.threshold)

    def decode(self, data: bytes, *, name: str = "image") -> Image.Image:
        """Decode an uploaded file in memory (JPEG decodes at reduced scale where it can).

        Raises:
            InvalidImageError: the bytes are not a readable image.
        """
        return decode_image(data, name=name, draft_size=self.spec.input_size)

    def explain(self, image: Image.Image, *, target: int = 1) -> "Explanation":
        """Grad-CAM of class ``target`` (PNEUMONIA by default) at the model's input size.

        Raises:
            ConfigError: the bundle names no Grad-CAM layer, or its layer gives no spatial map.
        """
        from pneumoscan.explain import Explanation, central_share, grad_cam

        layer = self.spec.cam_layer or self.model.cam_layer
        x = normalize(self.preprocess(image)[None], self.spec.mean, self.spec.std)
        try:
            with self._lock:
                cam = grad_cam(self.model, x, layer=layer, target=target)[0]
        except (KeyError, ValueError, RuntimeError) as exc:
            raise ConfigError(f"Grad-CAM is not available for {self.spec.backbone}: {exc}") from None
        return Explanation(cam=cam, central_share=central_share(cam))

    def predict_paths(self, paths: Sequence[str | Path], *, batch_size: int = 32,
                      threshold: float | None = None) -> list[PathOutcome]:
        """Predict files in batches; unreadable files get an error instead of a prediction."""
        outcomes: list[PathOutcome | None] = [None] * len(paths)
        pending: list[tuple[int, torch.Tensor]] = []

        def flush() -> None:
            for (i, _), z in zip(pending, self.log_odds(self._batch([px for _, px in pending]))):
                p = self.calibrate(z)
                outcomes[i] = PathOutcome(str(paths[i]), self.label_for(p, threshold), p, z)
            pending.clear()

        for i, path in enumerate(paths):
            try:
                pending.append((i, read_bundle_pixels(self.spec, path)))
            except PneumoscanError as exc:
                outcomes[i] = PathOutcome(str(path), error=str(exc))
            if len(pending) >= batch_size:
                flush()
        if pending:
            flush()
        return [o for o in outcomes if o is not None]
