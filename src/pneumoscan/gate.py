"""The input gate: refuse what cannot be a chest radiograph before trusting a prediction.

:func:`screen` is the one gate decision; the web app, ``predict``, ``explain``, the bundle tools
and the benchmarks all reach it through :meth:`pneumoscan.inference.Predictor.predict`. It first
checks the image itself (size, shape, colour, contrast, DICOM tags), then, only when those pass,
asks the :class:`FeatureGate` whether the backbone's pooled features lie far (Mahalanobis
distance) from those of the training X-rays. Each refusal is a machine-readable reason, the
names the API returns.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

#: ``Image.info`` key where :func:`pneumoscan.imaging.decode_image` records the source's colourfulness.
COLOURFULNESS_KEY = "pneumoscan_colourfulness"
#: ``Image.info`` keys where :func:`pneumoscan.dicom.pixels.decode_dicom` records Modality and ViewPosition.
DICOM_MODALITY_KEY = "pneumoscan_dicom_modality"
DICOM_VIEW_KEY = "pneumoscan_dicom_view_position"

RADIOGRAPH_MODALITIES = frozenset({"CR", "DX"})  # computed and digital radiography
LATERAL_VIEWS = frozenset({"LL", "RL", "LAT", "LATERAL", "LLD", "RLD"})  # DICOM ViewPosition codes

MIN_SIDE = 64  # pixels: smaller images carry too little detail to read
MAX_ASPECT = 2.5  # long side / short side; chest films are close to square
MIN_CONTRAST = 8.0  # standard deviation of grey levels (0-255): below this the image is blank
MAX_COLOURFULNESS = 12.0  # mean chroma distance from grey (0-255 scale); radiographs are grey


_GREY_MODES = frozenset({"L", "LA", "I", "I;16", "I;16B", "I;16L", "F", "1"})


_SAMPLE_SIDE = 1024


def _sample(image: Image.Image) -> Image.Image:
    """At most about 1024 x 1024 of the image's own pixels (every k-th, no averaging), so that a
    pixel statistic costs no float copy of a full-size image and keeps its per-pixel meaning."""
    step = max(1, -(-max(image.size) // _SAMPLE_SIDE))
    if step == 1:
        return image
    return image.resize((-(-image.width // step), -(-image.height // step)), Image.Resampling.NEAREST)


def colourfulness(image: Image.Image) -> float:
    """Mean distance of each pixel's chroma (YCbCr Cb, Cr) from neutral grey, on a 0-255 scale.

    A greyscale image made by :func:`pneumoscan.imaging.decode_image` carries its source's value
    in ``Image.info``; a colour image from anywhere else is measured here.
    """
    if image.mode in _GREY_MODES:
        return float(image.info.get(COLOURFULNESS_KEY, 0.0))
    ycbcr = np.asarray(_sample(image).convert("RGB").convert("YCbCr"), dtype=np.float32)
    return float(np.mean(np.abs(ycbcr[..., 1] - 128.0) + np.abs(ycbcr[..., 2] - 128.0)))


def image_reasons(image: Image.Image) -> list[str]:
    """Reasons to refuse an image (any mode, any source) by itself; empty when it passes every check."""
    reasons: list[str] = []
    width, height = image.size
    if min(width, height) < MIN_SIDE:
        reasons.append("too_small")
    if max(width, height) / max(min(width, height), 1) > MAX_ASPECT:
        reasons.append("extreme_aspect_ratio")
    if colourfulness(image) > MAX_COLOURFULNESS:
        reasons.append("colour_image")
    if float(np.asarray(_sample(image).convert("L"), dtype=np.float32).std()) < MIN_CONTRAST:
        reasons.append("blank_or_constant")
    if DICOM_MODALITY_KEY in image.info and image.info[DICOM_MODALITY_KEY] not in RADIOGRAPH_MODALITIES:
        reasons.append("dicom_modality_not_radiograph")  # CT, MR, US, a secondary capture...
    if image.info.get(DICOM_VIEW_KEY, "") in LATERAL_VIEWS:
        reasons.append("lateral_view")  # the model saw frontal (AP) films only
    return reasons


def describe_reason(reason: str, *, distance: float | None = None, limit: float | None = None) -> str:
    """A refusal reason in words, for people (the API keeps the code in ``reasons``)."""
    if reason == "out_of_distribution":
        measured = f" (distance {distance:.1f}, limit {limit:.1f})" if distance is not None and limit else ""
        return f"unusual for this model{measured}: it looks unlike the chest films it was trained on"
    return REASON_TEXT.get(reason, reason.replace("_", " "))


#: How each refusal reads on the page and in messages.
REASON_TEXT = {
    "too_small": f"too small to read (under {MIN_SIDE} pixels on its short side)",
    "extreme_aspect_ratio": f"too long and thin for a chest film (sides more than {MAX_ASPECT:g} to 1)",
    "colour_image": "a colour image; radiographs are greyscale",
    "blank_or_constant": "almost blank: too little contrast to read",
    "dicom_modality_not_radiograph": "its DICOM header says it is not a radiograph (CT, MR, ultrasound or similar)",
    "lateral_view": "a lateral view; the model was trained on frontal films only",
    "inverted_image": "looks inverted (a negative film); the model was trained on positives only",
}


@dataclass(frozen=True)
class Screening:
    """The gate's verdict on one image: refusal reasons (none: it passes) and its feature distance."""

    reasons: tuple[str, ...]
    distance: float | None = None  # Mahalanobis distance to the training features, if gated

    @property
    def passed(self) -> bool:
        return not self.reasons


def screen(image: Image.Image, features: np.ndarray | None, gate: "FeatureGate | None") -> Screening:
    """The input-gate decision for one image and its pooled backbone features (``C``).

    The image checks come first; the feature gate is consulted only when they pass (a colour
    photo's feature distance says nothing more): first the distance, then, for an image near the
    X-rays, the polarity detector (a negative film). Without a gate or features, the image checks
    decide alone.
    """
    distance = None
    if gate is not None and features is not None:
        distance = float(gate.distances(np.asarray(features)[None])[0])
    reasons = image_reasons(image)
    if not reasons and distance is not None and distance > gate.threshold:
        reasons = ["out_of_distribution"]
    elif not reasons and gate is not None and features is not None and gate.inverted(np.asarray(features)[None])[0]:
        reasons = ["inverted_image"]  # a negative film, near the X-rays in distance: the model saw positives only
    return Screening(tuple(reasons), distance)


# ---------------------------------------------------------------------------------------------
# Second layer: Mahalanobis distance of the backbone's pooled features to the training images

GATE_FILE = "gate.safetensors"


@dataclass(frozen=True)
class FeatureGate:
    """Mean and (shrunk) precision of training features; images farther than ``threshold`` are refused."""

    mean: np.ndarray  # (C,)
    precision: np.ndarray  # (C, C)
    threshold: float
    # A linear "is this film inverted?" detector on the same features (weights C, bias), fitted on
    # training X-rays and their negatives: a negative film lies close to the X-rays in distance,
    # but on the far side of this plane. None for gates fitted before it existed.
    polarity: np.ndarray | None = None
    polarity_bias: float = 0.0

    def inverted(self, features: np.ndarray) -> np.ndarray:
        """For each row of ``features``: does it look like an inverted (negative) X-ray?"""
        if self.polarity is None:
            return np.zeros(len(features), dtype=bool)
        return np.einsum("nc,c->n", np.asarray(features, dtype=np.float64), self.polarity) + self.polarity_bias > 0

    def distances(self, features: np.ndarray) -> np.ndarray:
        """Mahalanobis distance of each row of ``features`` (N x C)."""
        centred = np.asarray(features, dtype=np.float64) - self.mean
        # Two einsum steps: 0.75 instead of 2.8 ms per image with one three-operand einsum, and
        # no BLAS call, whose thread pool would compete with the network's on a small CPU.
        projected = np.einsum("nc,cd->nd", centred, self.precision)
        return np.sqrt(np.maximum(np.einsum("nc,nc->n", projected, centred), 0.0))

    @classmethod
    def fit(cls, train_features: np.ndarray, val_features: np.ndarray, *, quantile: float = 0.995,
            inverted_features: np.ndarray | None = None, cross_fit_folds: int = 0) -> "FeatureGate":
        """Ledoit-Wolf covariance of the training features; threshold at a validation quantile; with
        ``inverted_features`` (of inverted training X-rays) also the polarity detector.

        With ``cross_fit_folds`` (for a validation split too small to set a limit alone: a quantile
        of six distances is noise), the threshold is the quantile of out-of-fold distances over
        the training and validation films together: each film measured by statistics fitted
        without it, as a new film is.
        """
        from sklearn.covariance import LedoitWolf

        train = np.asarray(train_features, dtype=np.float64)
        estimate = LedoitWolf().fit(train)
        gate = cls(estimate.location_, estimate.precision_, threshold=math.inf)
        if cross_fit_folds:
            from sklearn.model_selection import KFold

            pool = np.concatenate([train, np.asarray(val_features, dtype=np.float64)])
            held_out = []
            for fitted, measured in KFold(n_splits=cross_fit_folds, shuffle=True, random_state=0).split(pool):
                fold = LedoitWolf().fit(pool[fitted])
                held_out.append(cls(fold.location_, fold.precision_, threshold=math.inf).distances(pool[measured]))
            threshold = float(np.quantile(np.concatenate(held_out), quantile))
        else:
            threshold = float(np.quantile(gate.distances(val_features), quantile))
        polarity, bias = (None, 0.0) if inverted_features is None else _fit_polarity(train, inverted_features)
        return cls(estimate.location_, estimate.precision_, threshold=threshold, polarity=polarity,
                   polarity_bias=bias)

    def save(self, path: Path) -> None:
        from safetensors.numpy import save_file

        tensors = {"mean": self.mean.astype(np.float32), "precision": self.precision.astype(np.float32),
                   "threshold": np.array([self.threshold], dtype=np.float64)}
        if self.polarity is not None:
            tensors["polarity"] = self.polarity.astype(np.float64)
            tensors["polarity_bias"] = np.array([self.polarity_bias], dtype=np.float64)
        save_file(tensors, str(path))

    @classmethod
    def load(cls, path: Path) -> "FeatureGate":
        """Read a gate file, every value checked: a NaN or inf threshold turned the gate off.

        Raises:
            BundleError: a missing key, a wrong shape, a non-finite value or a threshold <= 0,
                each named with the file.
        """
        from pneumoscan.errors import BundleError
        from pneumoscan.integrity import read_tensors

        tensors = read_tensors(Path(path))
        mean = tensors.get("mean")
        channels = mean.shape[0] if mean is not None and mean.ndim == 1 else -1
        shapes = {"mean": (channels,), "precision": (channels, channels), "threshold": (1,)}
        if "polarity" in tensors:
            shapes.update(polarity=(channels,), polarity_bias=(1,))
        for key, shape in shapes.items():
            value = tensors.get(key)
            if value is None:
                raise BundleError(f"{path} lacks the tensor {key!r}; refusing to load the bundle")
            if value.shape != shape or channels < 1:
                raise BundleError(f"{path}: {key} has shape {list(value.shape)}, expected {list(shape)}")
            if not np.all(np.isfinite(value)):
                raise BundleError(f"{path}: {key} holds values that are not finite (NaN or inf)")
        threshold = float(tensors["threshold"][0])
        if threshold <= 0:
            raise BundleError(f"{path}: the threshold must be above 0, got {threshold}")
        polarity = tensors.get("polarity")
        return cls(mean.astype(np.float64), tensors["precision"].astype(np.float64), threshold,
                   polarity=None if polarity is None else polarity.astype(np.float64),
                   polarity_bias=float(tensors["polarity_bias"][0]) if polarity is not None else 0.0)


def _fit_polarity(upright: np.ndarray, inverted: np.ndarray) -> tuple[np.ndarray, float]:
    """A standardised logistic regression, upright (0) against inverted (1), folded back into
    one weight vector and bias on the raw features."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    x = np.concatenate([upright, np.asarray(inverted, dtype=np.float64)])
    y = np.concatenate([np.zeros(len(upright)), np.ones(len(inverted))])
    scaler = StandardScaler().fit(x)
    model = LogisticRegression(C=0.1, class_weight="balanced", max_iter=5000).fit(scaler.transform(x), y)
    weights = model.coef_[0] / scaler.scale_
    return weights, float(model.intercept_[0] - np.dot(weights, scaler.mean_))
