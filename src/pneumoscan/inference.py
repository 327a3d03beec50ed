"""Predictions from a model bundle: images or files in, one :class:`Result` per image out.

:class:`Predictor` loads a bundle and applies, in order, the bundle's preprocessing
(:class:`~pneumoscan.imaging.Preprocessing`), the network (a :mod:`~pneumoscan.runtime` runner),
the input gate (:func:`pneumoscan.gate.screen`) and the decision (:class:`~pneumoscan.spec.Decision`).
The CLI's ``predict`` and ``explain``, the web app and the bundle tools all call it; it never
imports Lightning, training or the exporter, and on ONNX Runtime it never imports PyTorch: the
network is built (from the bundle's weights) only when the PyTorch runner or the grad-cam path
needs it.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence

import numpy as np
from PIL import Image

from pneumoscan.errors import BundleError, PneumoscanError
from pneumoscan.gate import FeatureGate, screen
from pneumoscan.imaging import Preprocessing
from pneumoscan.integrity import bundle_digest, default_bundle_path, resolve_model, verify_bundle
from pneumoscan.runtime import Runner, open_runner, require_torch
from pneumoscan.spec import BundleSpec, Decision

if TYPE_CHECKING:
    from pneumoscan.heatmap import Explanation
    from pneumoscan.models import Classifier, Ensemble

#: Decoded pixels ``predict_paths`` holds before it runs a batch (64 MB of 8-bit grey).
MAX_PENDING_PIXELS = 64_000_000


@dataclass(frozen=True)
class Result:
    """One image's answer: a label (``ok``), a refusal by the input gate (``rejected``), or the
    reason the file could not be read (``error``)."""

    name: str
    status: str  # "ok", "rejected" or "error"
    label: str | None = None  # None unless ok: a refusal is not a diagnosis
    probability: float | None = None  # calibrated P(pneumonia), unless rejected or error
    log_odds: float | None = None  # uncalibrated logit(P(pneumonia)), for calibration reports
    threshold: float | None = None
    operating_point: str | None = None
    # The gate's machine-readable reasons. With the gate off they are still filled in (what it
    # would have refused) while the status stays ok.
    reasons: tuple[str, ...] = ()
    distance: float | None = None  # Mahalanobis distance to the training features, if gated
    error: str | None = None  # message, for status "error"
    error_code: str | None = None
    http_status: int | None = None
    # Why a person should look at this answer (``Decision.review_reasons``, plus ``outside_gate``
    # when the gate would have refused the film but it was analysed anyway); empty: no reason.
    review_reasons: tuple[str, ...] = ()

    @property
    def review_recommended(self) -> bool | None:
        """True when a person should review the answer; None when there is no answer."""
        return bool(self.review_reasons) if self.status == "ok" else None


def error_result(name: str, exc: PneumoscanError) -> Result:
    """The result of a file that could not be read or decoded."""
    return Result(name, "error", error=str(exc), error_code=exc.code, http_status=exc.http_status)


#: Columns of ``pneumoscan predict --csv`` (either engine); ``reasons`` holds the gate's reasons
#: (the API's names), or the error code for unreadable files; ``review_recommended`` is yes/no.
PREDICTION_COLUMNS = ("path", "status", "label", "probability_pneumonia", "threshold", "review_recommended",
                      "review_reasons", "reasons", "error")


def prediction_row(r: Result) -> tuple[str, ...]:
    """One result as a row of :data:`PREDICTION_COLUMNS`, every value a string."""
    return (r.name, r.status, r.label or "", "" if r.probability is None else f"{r.probability:.6f}",
            "" if r.threshold is None else f"{r.threshold:.6f}",
            {True: "yes", False: "no", None: ""}[r.review_recommended], ";".join(r.review_reasons),
            ";".join(r.reasons) if r.status != "error" else (r.error_code or ""), r.error or "")


class Predictor:
    """A loaded bundle: its preprocessing, network runner, input gate and decision.

    The network runs on ONNX Runtime when the bundle carries an exported model (and onnxruntime
    is installed), on PyTorch otherwise; both give the same probabilities. Heatmaps come from the
    ONNX graph's ``cam`` output when it has one (pool heads), else from grad-cam on PyTorch.
    """

    def __init__(self, model: "Classifier | Ensemble | None", spec: BundleSpec, runner: Runner, *,
                 gate: FeatureGate | None = None, tta: bool = False, directory: Path | None = None) -> None:
        self._model = model.eval() if model is not None else None
        self.directory = directory  # where the network's weights are read from when first needed
        self.spec = spec
        self.runner = runner
        self.gate = gate
        self.tta = tta
        self.digest: str | None = None  # the bundle's manifest sha256, when loaded from a directory
        # One forward at a time per process: concurrent requests would oversubscribe the cores.
        self._lock = threading.Lock()

    @classmethod
    def from_bundle(cls, path: str | Path | None = None, *, tta: bool = False, backend: str = "auto",
                    allow_torch_fallback: bool = False, expected_digest: str | None = None) -> "Predictor":
        """Load a bundle (the packaged default model when ``path`` is None; a string that names a
        bundled model, ``"fast"`` say, loads that one).

        ``tta`` averages the log-odds of each image and its horizontal mirror. ``backend``:
        ``auto``, ``onnxruntime`` or ``torch`` (see :func:`pneumoscan.runtime.open_runner`).
        ``expected_digest`` pins the bundle's manifest sha256.

        Raises:
            BundleError: missing, corrupt or tampered bundle (any file, model.json included).
            ConfigError: an unknown backend, or ``onnxruntime`` when it cannot be used.
        """
        directory = default_bundle_path() if path is None else resolve_model(path) if isinstance(path, str) else path
        spec = verify_bundle(directory, check_onnx=False,  # open_runner checks the ONNX file
                             expected_digest=expected_digest)
        gate = FeatureGate.load(directory / spec.gate.file) if spec.gate is not None else None
        # model.json rounds the threshold to 6 decimals
        if gate is not None and not math.isclose(gate.threshold, spec.gate.threshold, rel_tol=1e-6, abs_tol=1e-6):
            raise BundleError(f"{directory / spec.gate.file}: its threshold {gate.threshold:g} differs from the "
                              f"{spec.gate.threshold:g} model.json (and the model card) states; refusing to load the bundle")
        runner = open_runner(directory, spec, backend=backend, allow_torch_fallback=allow_torch_fallback)
        if gate is not None:  # one blank film: the gate must measure the features the network gives
            channels = runner(np.zeros((1, 1, spec.input_size, spec.input_size), dtype=np.uint8))[1].shape[-1]
            if channels != gate.mean.shape[0]:
                raise BundleError(f"{directory / spec.gate.file} measures {gate.mean.shape[0]} features, but the "
                                  f"network gives {channels}; refusing to load the bundle")
        predictor = cls(getattr(runner, "model", None), spec, runner, gate=gate, tta=tta, directory=directory)
        predictor.digest = bundle_digest(directory)
        return predictor

    @property
    def model(self) -> "Classifier | Ensemble":
        """The PyTorch network, built from the bundle's weights on first use.

        Raises:
            ConfigError: PyTorch is not installed.
        """
        if self._model is None:
            require_torch("the PyTorch network (--backend torch, grad-cam heatmaps)")
            from pneumoscan.models import build_network

            self._model = build_network(self.directory, self.spec)  # verified by from_bundle
        return self._model

    @property
    def backend(self) -> str:
        """``onnxruntime`` or ``torch``: what runs the network."""
        return self.runner.name

    @property
    def preprocessing(self) -> Preprocessing:
        return self.spec.preprocessing

    @property
    def decision(self) -> Decision:
        return self.spec.decision

    @property
    def operating_points(self) -> dict[str, float]:
        """Named thresholds from the bundle (at least the default one)."""
        return self.decision.points

    def forward(self, pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """uint8 ``B x 1 x S x S`` -> (uncalibrated log-odds ``B``, pooled features ``B x C``)."""
        with self._lock:
            log_odds, features = self.runner(pixels)
            if self.tta:
                log_odds = (log_odds + self.runner(np.ascontiguousarray(pixels[..., ::-1]))[0]) / 2
        return log_odds, features

    def predict(self, images: Sequence[Image.Image], *, names: Sequence[str] | None = None,
                operating_point: str | None = None, threshold: float | None = None,
                gate: bool = True) -> list[Result]:
        """Decoded images (any mode) -> one :class:`Result` each, in one batch.

        With ``gate`` (the default) an image the input gate refuses is ``rejected``, with its
        reasons and no label; without it every image gets a label and ``reasons`` still says what
        the gate would have refused.

        Raises:
            ConfigError: an unknown operating point or a threshold outside [0, 1].
        """
        cut, point = self.decision.threshold_for(operating_point, threshold)
        names = list(names) if names is not None else [f"image {i}" for i in range(len(images))]
        if not images:
            return []
        log_odds, features = self.forward(np.stack([self.preprocessing.pixels(im) for im in images]))
        probabilities = self.decision.probability(log_odds)
        results = []
        for name, image, z, p, f in zip(names, images, log_odds, probabilities, features):
            screening = screen(image, f, self.gate)
            if gate and not screening.passed:
                results.append(Result(name, "rejected", threshold=cut, operating_point=point,
                                      reasons=screening.reasons, distance=screening.distance))
                continue
            label = self.spec.class_names[1] if p >= cut else self.spec.class_names[0]
            review = self.decision.review_reasons(float(p), cut, screening.distance,
                                                  self.gate.threshold if self.gate is not None else None)
            if screening.reasons:  # analysed although the gate would have refused it
                review += ("outside_gate",)
            results.append(Result(name, "ok", label, float(p), float(z), cut, point,
                                  reasons=screening.reasons, distance=screening.distance, review_reasons=review))
        return results

    def predict_paths(self, paths: Sequence[str | Path], *, batch_size: int = 32,
                      operating_point: str | None = None, threshold: float | None = None,
                      gate: bool = True, progress: Callable[[int], None] | None = None) -> list[Result]:
        """Files -> one :class:`Result` each, in order, predicted ``batch_size`` at a time;
        a file that cannot be read gets status ``error`` with the reason. ``progress(n)`` is
        called as each batch (or unreadable file) is done, with its number of files."""
        self.decision.threshold_for(operating_point, threshold)  # a bad choice fails before any work
        results: list[Result | None] = [None] * len(paths)
        pending: list[tuple[int, Image.Image]] = []
        pending_pixels = 0

        def flush() -> None:
            batch = self.predict([image for _, image in pending], names=[str(paths[i]) for i, _ in pending],
                                 operating_point=operating_point, threshold=threshold, gate=gate)
            for (i, _), result in zip(pending, batch):
                results[i] = result
            if progress is not None:
                progress(len(pending))
            pending.clear()

        for i, path in enumerate(paths):
            try:
                image = self.preprocessing.load(path)
            except PneumoscanError as exc:
                results[i] = error_result(str(path), exc)
                if progress is not None:
                    progress(1)
                continue
            pending.append((i, image))
            pending_pixels += image.width * image.height
            # Decoded images wait here at full size (the gate checks them as they are): bound both.
            if len(pending) >= batch_size or pending_pixels >= MAX_PENDING_PIXELS:
                flush()
                pending_pixels = 0
        if pending:
            flush()
        return [r for r in results if r is not None]

    def explain(self, image: Image.Image) -> "Explanation":
        """The heatmap of the log-odds (PNEUMONIA minus NORMAL) at the model's input size: the
        ONNX graph's class activation map when it has one, else grad-cam on PyTorch.

        Raises:
            ConfigError: the bundle names no Grad-CAM layer, or PyTorch is needed and missing.
        """
        from pneumoscan.heatmap import cam_image, explanation

        pixels = self.preprocessing.pixels(image)
        with self._lock:
            if getattr(self.runner, "has_cam", False):
                return explanation(cam_image(self.runner.cam(pixels[None])[0], self.spec.input_size))
            require_torch(f"a heatmap for this bundle (its {'ONNX graph has no CAM output' if self.spec.onnx else 'network is not exported'})")
            from pneumoscan.explain import explain

            return explain(self.model, self.spec, pixels)
