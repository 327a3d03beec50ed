"""Input gate, first layer: simple image checks that refuse what cannot be a chest radiograph.

Each check returns a machine-readable reason. They run on the decoded image before any
prediction. (A feature-space out-of-distribution score is the gate's second layer, still to come.)
"""

from __future__ import annotations

import numpy as np
from PIL import Image

#: ``Image.info`` key where :func:`pneumoscan.data.decode_image` records the source's colourfulness.
COLOURFULNESS_KEY = "pneumoscan_colourfulness"

MIN_SIDE = 64  # pixels: smaller images carry too little detail to read
MAX_ASPECT = 2.5  # long side / short side; chest films are close to square
MIN_CONTRAST = 8.0  # standard deviation of grey levels (0-255): below this the image is blank
MAX_COLOURFULNESS = 12.0  # mean chroma distance from grey (0-255 scale); radiographs are grey


def colourfulness(image: Image.Image) -> float:
    """Mean distance of each pixel's chroma (YCbCr Cb, Cr) from neutral grey, on a 0-255 scale."""
    if image.mode in ("L", "I", "I;16", "I;16B", "I;16L", "F", "1"):
        return 0.0
    ycbcr = np.asarray(image.convert("RGB").convert("YCbCr"), dtype=np.float32)
    return float(np.mean(np.abs(ycbcr[..., 1] - 128.0) + np.abs(ycbcr[..., 2] - 128.0)))


def image_reasons(image: Image.Image) -> list[str]:
    """Reasons to refuse a decoded greyscale image; empty when it passes every check."""
    reasons: list[str] = []
    width, height = image.size
    if min(width, height) < MIN_SIDE:
        reasons.append("too_small")
    if max(width, height) / max(min(width, height), 1) > MAX_ASPECT:
        reasons.append("extreme_aspect_ratio")
    if float(image.info.get(COLOURFULNESS_KEY, 0.0)) > MAX_COLOURFULNESS:
        reasons.append("colour_image")
    if float(np.asarray(image.convert("L"), dtype=np.float32).std()) < MIN_CONTRAST:
        reasons.append("blank_or_constant")
    return reasons
