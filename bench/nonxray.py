"""Images that are not chest X-rays, made offline and deterministically, for the input-gate benchmark.

- ``natural``: scikit-image's sample pictures, in colour and converted to grey, plus grey crops;
- ``document``: pages of text, tables and forms (black on white or grey);
- ``screenshot``: greyscale application windows with panels, buttons and text.
The grey ones are the hard cases: the colour check cannot catch them, only the feature gate can.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from pneumoscan.nonxray import documents, png_bytes, screenshots

# scikit-image samples that are volumes, stacks, helpers or downloads rather than one 2-D picture
SKIP = {"download_all", "lbp_frontal_face", "data_dir", "stereo_motorcycle", "lfw_subset", "kidney", "cells3d",
        "protein_transport", "brain", "nickel_solidification", "vortex", "human_mitosis", "skin", "eagle", "lily",
        "file_hash", "colorwheel"}


def natural_images() -> dict[str, bytes]:
    """Each scikit-image picture as it is, in grey, and as two grey crops."""
    import skimage.data as samples

    images = {}
    for name in sorted(set(samples.__all__) - SKIP):
        try:
            array = getattr(samples, name)()
        except Exception:  # a sample that needs a download: not available offline
            continue
        if not isinstance(array, np.ndarray) or array.dtype == bool or array.ndim not in (2, 3):
            continue
        if array.ndim == 3 and array.shape[2] not in (3, 4):
            continue
        picture = Image.fromarray(array.astype(np.uint8))
        images[f"natural/{name}"] = png_bytes(picture)
        grey = picture.convert("L")
        if picture.mode != "L":
            images[f"natural/{name}-grey"] = png_bytes(grey)
        w, h = grey.size
        if min(w, h) >= 256:
            images[f"natural/{name}-grey-crop-a"] = png_bytes(grey.crop((0, 0, w * 2 // 3, h * 2 // 3)))
            images[f"natural/{name}-grey-crop-b"] = png_bytes(grey.crop((w // 3, h // 3, w, h)))
    return images


def all_non_xrays() -> dict[str, bytes]:
    """Every kind above, keyed ``kind/name``."""
    return {**natural_images(), **documents(), **screenshots()}
