"""Grad-CAM explanations (the ``grad-cam`` package) and their overlay on the X-ray.

The layer comes from the bundle's ``cam_layer``; hooks are released when the call returns.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image
from torch import nn

if TYPE_CHECKING:
    from pneumoscan.spec import BundleSpec

#: The central box (fractions of width and height) where the lungs and heart lie on a chest film.
CHEST_BOX: tuple[float, float, float, float] = (0.15, 0.10, 0.85, 0.90)  # left, top, right, bottom
#: Below this share of the heatmap inside CHEST_BOX the model is looking elsewhere (labels,
#: borders, devices): a possible shortcut.
SHORTCUT_SHARE: float = 0.5


def explain(model: nn.Module, spec: "BundleSpec", pixels: np.ndarray, *, target: int = 1) -> "Explanation":
    """Grad-CAM of class ``target`` for one preprocessed image (uint8 ``1 x S x S``).

    Raises:
        ConfigError: the bundle names no Grad-CAM layer, or its layer gives no spatial map.
    """
    from pneumoscan.errors import ConfigError
    from pneumoscan.models import normalize

    # An ensemble's map is the mean of its members' maps, each at its own last feature map.
    layers = getattr(model, "cam_layers", None) or [spec.cam_layer or getattr(model, "cam_layer", "")]
    x = normalize(torch.from_numpy(np.ascontiguousarray(pixels))[None], spec.mean, spec.std)
    try:
        cam = grad_cam(model, x, layers=layers, target=target)[0]
    except (KeyError, ValueError, RuntimeError) as exc:
        raise ConfigError(f"Grad-CAM is not available for {spec.backbone}: {exc}") from None
    return Explanation(cam=cam, central_share=central_share(cam))


@dataclass(frozen=True)
class Explanation:
    """A Grad-CAM map in [0, 1] at input resolution, and how much of it lies on the chest."""

    cam: np.ndarray
    central_share: float

    @property
    def shortcut_warning(self) -> bool:
        return self.central_share < SHORTCUT_SHARE


def grad_cam(model: nn.Module, x: torch.Tensor, *, layers: list[str], target: int = 1) -> np.ndarray:
    """Grad-CAM maps (``B x H x W`` in [0, 1]) for class ``target`` of a normalised batch; with
    several ``layers`` (an ensemble's members), the mean of their maps."""
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    modules = dict(model.named_modules())
    missing = [layer for layer in layers if layer not in modules]
    if missing or not layers:
        raise KeyError(f"layer '{(missing or [''])[0]}' is not in the model")
    with torch.enable_grad(), GradCAM(model=model, target_layers=[modules[layer] for layer in layers]) as cam:
        maps = cam(input_tensor=x, targets=[ClassifierOutputTarget(target)] * x.shape[0])
    return np.nan_to_num(np.asarray(maps, dtype=np.float32))


def central_share(cam: np.ndarray, box: tuple[float, float, float, float] = CHEST_BOX) -> float:
    """Share of the heatmap's total mass inside ``box`` (1.0 for an all-zero map)."""
    total = float(cam.sum())
    if total <= 0:
        return 1.0
    h, w = cam.shape
    left, top, right, bottom = box
    inner = cam[int(top * h):int(np.ceil(bottom * h)), int(left * w):int(np.ceil(right * w))]
    return float(inner.sum()) / total


def overlay(image: Image.Image, cam: np.ndarray, *, opacity: float = 0.4) -> Image.Image:
    """The greyscale X-ray with the heatmap (jet colours) blended over it, at the image's size."""
    from pytorch_grad_cam.utils.image import show_cam_on_image

    grey = np.asarray(image.convert("L"), dtype=np.float32) / 255.0
    rgb = np.repeat(grey[..., None], 3, axis=2)
    resized = np.asarray(Image.fromarray((cam * 255).astype(np.uint8)).resize(image.size, Image.Resampling.BILINEAR),
                         dtype=np.float32) / 255.0
    return Image.fromarray(show_cam_on_image(rgb, resized, use_rgb=True, image_weight=1.0 - opacity))


def heatmap(cam: np.ndarray, size: tuple[int, int]) -> Image.Image:
    """The heatmap alone in jet colours (the same colours as :func:`overlay`), for layering in a page."""
    import cv2

    resized = Image.fromarray((np.clip(cam, 0, 1) * 255).astype(np.uint8)).resize(size, Image.Resampling.BILINEAR)
    bgr = cv2.applyColorMap(np.asarray(resized), cv2.COLORMAP_JET)
    return Image.fromarray(bgr[..., ::-1].copy())


def png_bytes(image: Image.Image) -> bytes:
    """Encode a PIL image as PNG."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()
