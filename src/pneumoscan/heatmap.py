"""Class-activation heatmaps without PyTorch: from raw maps to a [0, 1] map, and drawing it.

For a ``pool`` head (global average pool, then linear), Grad-CAM of the log-odds at the last
feature map *is* the class activation map: the gradient of ``logit(PNEUMONIA) - logit(NORMAL)``
with respect to channel ``k`` is ``(W[1, k] - W[0, k]) / (h * w)`` everywhere, so the weighted
sum of the channels by those weights, through a ReLU, is Grad-CAM up to a constant that the
normalisation removes. The exported ONNX graph computes the raw maps ``sum_k (W[1,k] - W[0,k])
F_k`` of every member as its ``cam`` output; :func:`cam_image` turns them into the same map the
``grad-cam`` package makes (per member: ReLU, min-max, resize; then their mean, min-max again).

numpy, Pillow and matplotlib only.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
from PIL import Image

#: The central box (fractions of width and height) where the lungs and heart lie on a chest film.
CHEST_BOX: tuple[float, float, float, float] = (0.15, 0.10, 0.85, 0.90)  # left, top, right, bottom
#: Width of the film as drawn under its heatmap (page, API overlay, ``explain``'s PNGs); the
#: height follows the film's own aspect ratio, at most MAX_DISPLAY_ASPECT times the width.
DISPLAY_WIDTH = 512
MAX_DISPLAY_ASPECT = 3.0


@dataclass(frozen=True)
class Explanation:
    """A heatmap in [0, 1] at input resolution, and how much of it lies in CHEST_BOX.

    The share is descriptive only. A warning that fired below half ("the model may be using
    something other than the lungs") was removed: it was never measured against right and wrong
    answers, and a near-flat map on a NORMAL film always scored it ~100%.
    """

    cam: np.ndarray
    central_share: float


def _min_max(values: np.ndarray) -> np.ndarray:
    values = values - values.min()
    return values / (1e-7 + values.max())  # grad-cam's own epsilon: an all-zero map stays zero


def _resized(values: np.ndarray, size: int) -> np.ndarray:
    return np.asarray(Image.fromarray(values.astype(np.float32), mode="F").resize((size, size), Image.Resampling.BILINEAR))


def cam_image(raw: np.ndarray, size: int) -> np.ndarray:
    """Raw class-difference maps of K members (``K x h x w``) -> one ``size x size`` map in [0, 1]."""
    maps = [_resized(_min_max(np.maximum(member, 0)), size) for member in np.asarray(raw, dtype=np.float32)]
    return _min_max(np.maximum(np.mean(maps, axis=0), 0)).astype(np.float32)


def explanation(cam: np.ndarray) -> Explanation:
    return Explanation(cam=cam, central_share=central_share(cam))


def central_share(cam: np.ndarray, box: tuple[float, float, float, float] = CHEST_BOX) -> float:
    """Share of the heatmap's total mass inside ``box`` (1.0 for an all-zero map)."""
    total = float(cam.sum())
    if total <= 0:
        return 1.0
    h, w = cam.shape
    left, top, right, bottom = box
    inner = cam[int(top * h):int(np.ceil(bottom * h)), int(left * w):int(np.ceil(right * w))]
    return float(inner.sum()) / total


def _jet(values: np.ndarray) -> np.ndarray:
    """[0, 1] -> uint8 RGB in the jet colour map."""
    from matplotlib import colormaps

    return (colormaps["jet"](np.clip(values, 0, 1))[..., :3] * 255).round().astype(np.uint8)


def heatmap(cam: np.ndarray, size: tuple[int, int]) -> Image.Image:
    """The heatmap alone in jet colours (as :func:`overlay` draws it), for layering in a page."""
    resized = Image.fromarray((np.clip(cam, 0, 1) * 255).astype(np.uint8)).resize(size, Image.Resampling.BILINEAR)
    return Image.fromarray(_jet(np.asarray(resized, dtype=np.float32) / 255.0))


def display_image(image: Image.Image, width: int = DISPLAY_WIDTH) -> Image.Image:
    """The film in grey at its own aspect ratio, ``width`` pixels wide (up- or down-sampled).

    The network saw it squashed into a square, so its heatmap maps back onto this by a plain
    resize: :func:`heatmap` and :func:`overlay` at this image's size.
    """
    grey = image if image.mode == "L" else image.convert("L")
    height = int(round(width * min(grey.height / max(grey.width, 1), MAX_DISPLAY_ASPECT)))
    return grey.resize((width, max(1, height)), Image.Resampling.LANCZOS, reducing_gap=3.0)


def overlay(image: Image.Image, cam: np.ndarray, *, opacity: float = 0.4) -> Image.Image:
    """The greyscale X-ray with the heatmap (jet colours) blended over it, at the image's size."""
    grey = np.asarray(image.convert("L"), dtype=np.float32)[..., None]
    colours = np.asarray(heatmap(cam, image.size), dtype=np.float32)
    return Image.fromarray(((1.0 - opacity) * grey + opacity * colours).round().clip(0, 255).astype(np.uint8))


def captioned(image: Image.Image, caption: str) -> Image.Image:
    """``image`` with a strip below it: ``caption`` and the colour scale (low to high evidence)."""
    from PIL import ImageDraw, ImageFont

    width = max(image.width, 320)
    font = ImageFont.load_default(size=max(12, width // 40))
    line = font.getbbox("Ag")[3] + 6
    strip = Image.new("RGB", (width, 2 * line + 16), (20, 20, 20))
    draw = ImageDraw.Draw(strip)
    draw.text((8, 4), caption, fill=(255, 255, 255), font=font)
    x = 8 + int(draw.textlength("heatmap: low ", font=font))
    room = width - x - int(draw.textlength("high evidence for pneumonia", font=font)) - 24
    scale = _jet(np.linspace(0, 1, max(24, min(room, width // 3)))[None, :].repeat(line - 6, axis=0))
    draw.text((8, line + 6), "heatmap: low", fill=(200, 200, 200), font=font)
    strip.paste(Image.fromarray(scale), (x + 4, line + 8))
    draw.text((x + 12 + scale.shape[1], line + 6), "high evidence for pneumonia", fill=(200, 200, 200), font=font)
    out = Image.new("RGB", (width, image.height + strip.height), (20, 20, 20))
    out.paste(image.convert("RGB"), (0, 0))
    out.paste(strip, (0, image.height))
    return out


def png_bytes(image: Image.Image) -> bytes:
    """Encode a PIL image as PNG."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()
