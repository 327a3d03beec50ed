"""Predictions from a model bundle: bytes, images or files in, calibrated-threshold labels out.

This is what the CLI's ``predict`` and the web app call; it never imports Lightning.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from PIL import Image

from pneumoscan.data import decode_image, load_image, normalize, square_resize
from pneumoscan.errors import PneumoscanError
from pneumoscan.models import BundleSpec, Classifier, default_bundle_path, load_bundle


@dataclass(frozen=True)
class Prediction:
    """One image's result."""

    label: str
    probability_pneumonia: float
    threshold: float


@dataclass(frozen=True)
class PathOutcome:
    """One file's result in a batch: a prediction, or the reason it has none."""

    path: str
    label: str | None = None
    probability: float | None = None
    error: str | None = None


class Predictor:
    """A loaded bundle plus the exact preprocessing it was trained with."""

    def __init__(self, model: Classifier, spec: BundleSpec) -> None:
        self.model = model.eval()
        self.spec = spec
        # One forward at a time per process: concurrent requests would oversubscribe the cores.
        self._lock = threading.Lock()

    @classmethod
    def from_bundle(cls, path: str | Path | None = None) -> "Predictor":
        """Load a bundle (the packaged default model when ``path`` is None).

        Raises:
            BundleError: missing, corrupt or tampered bundle.
        """
        model, spec = load_bundle(default_bundle_path() if path is None else Path(path))
        return cls(model, spec)

    def label_for(self, probability: float, threshold: float | None = None) -> str:
        """Class name for a probability at ``threshold`` (the bundle's by default)."""
        cut = self.spec.threshold if threshold is None else threshold
        return self.spec.class_names[1] if probability >= cut else self.spec.class_names[0]

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        """Greyscale image -> uint8 ``1 x S x S`` (the same square resize as training)."""
        return square_resize(image, self.spec.input_size)

    @torch.inference_mode()
    def probabilities(self, pixels: torch.Tensor) -> list[float]:
        """uint8 ``B x 1 x S x S`` -> P(pneumonia) per image."""
        x = normalize(pixels, self.spec.mean, self.spec.std)
        with self._lock:
            return self.model(x).softmax(dim=1)[:, 1].tolist()

    def predict_images(self, images: Sequence[Image.Image]) -> list[Prediction]:
        """Predict decoded greyscale images in one batch."""
        if not images:
            return []
        batch = torch.stack([self.preprocess(im) for im in images])
        return [Prediction(self.label_for(p), p, self.spec.threshold) for p in self.probabilities(batch)]

    def predict_bytes(self, data: bytes, *, name: str = "image") -> Prediction:
        """Decode an uploaded file in memory and predict it.

        Raises:
            InvalidImageError: the bytes are not a readable image.
        """
        image = decode_image(data, name=name, draft_size=self.spec.input_size)
        return self.predict_images([image])[0]

    def predict_paths(self, paths: Sequence[str | Path], *, batch_size: int = 32) -> list[PathOutcome]:
        """Predict files in batches; unreadable files get an error instead of a prediction."""
        outcomes: list[PathOutcome | None] = [None] * len(paths)
        pending: list[tuple[int, torch.Tensor]] = []

        def flush() -> None:
            probs = self.probabilities(torch.stack([px for _, px in pending]))
            for (i, _), p in zip(pending, probs):
                outcomes[i] = PathOutcome(str(paths[i]), self.label_for(p), p)
            pending.clear()

        for i, path in enumerate(paths):
            try:
                pending.append((i, self.preprocess(load_image(path, draft_size=self.spec.input_size))))
            except PneumoscanError as exc:
                outcomes[i] = PathOutcome(str(path), error=str(exc))
            if len(pending) >= batch_size:
                flush()
        if pending:
            flush()
        return [o for o in outcomes if o is not None]
