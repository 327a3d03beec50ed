"""Grad-CAM on the PyTorch network (the ``grad-cam`` package), for heads whose heatmap the ONNX
graph cannot compute in its forward pass (the seed head) and for bundles exported before it did.

The target is the log-odds, logit(PNEUMONIA) - logit(NORMAL), as in the ONNX graph's ``cam``
output, so both paths draw the same map for a pool head (:mod:`pneumoscan.heatmap`). The layer
comes from the bundle's ``cam_layer``; hooks are released when the call returns.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from pneumoscan.heatmap import Explanation, explanation

if TYPE_CHECKING:
    from pneumoscan.spec import BundleSpec


def explain(model: nn.Module, spec: "BundleSpec", pixels: np.ndarray) -> Explanation:
    """Grad-CAM of the log-odds for one preprocessed image (uint8 ``1 x S x S``).

    Raises:
        ConfigError: the bundle names no Grad-CAM layer, or its layer gives no spatial map.
    """
    from pneumoscan.errors import ConfigError
    from pneumoscan.models import normalize

    # An ensemble's map is the mean of its members' maps, each at its own last feature map.
    layers = getattr(model, "cam_layers", None) or [spec.cam_layer or getattr(model, "cam_layer", "")]
    x = normalize(torch.from_numpy(np.ascontiguousarray(pixels))[None], spec.mean, spec.std)
    try:
        cam = grad_cam(model, x, layers=layers)[0]
    except (KeyError, ValueError, RuntimeError) as exc:
        raise ConfigError(f"Grad-CAM is not available for {spec.backbone}: {exc}") from None
    return explanation(cam)


def _log_odds(output: torch.Tensor) -> torch.Tensor:
    """grad-cam target: one image's logits -> logit(PNEUMONIA) - logit(NORMAL)."""
    return output[..., 1] - output[..., 0]


def grad_cam(model: nn.Module, x: torch.Tensor, *, layers: list[str]) -> np.ndarray:
    """Grad-CAM maps of the log-odds (``B x H x W`` in [0, 1]) for a normalised batch; with
    several ``layers`` (an ensemble's members), the mean of their maps."""
    from pytorch_grad_cam import GradCAM

    modules = dict(model.named_modules())
    missing = [layer for layer in layers if layer not in modules]
    if missing or not layers:
        raise KeyError(f"layer '{(missing or [''])[0]}' is not in the model")
    with torch.enable_grad(), GradCAM(model=model, target_layers=[modules[layer] for layer in layers]) as cam:
        maps = cam(input_tensor=x, targets=[_log_odds] * x.shape[0])
    return np.nan_to_num(np.asarray(maps, dtype=np.float32))
