"""Input-gate benchmark: false rejections on real X-rays, rejections of non-X-ray images.

    python bench/gate.py --data ../shared/data/chest_xray [--model BUNDLE]

Runs the gate (image checks, then the bundle's feature gate if it has one) on every image of the test and train splits (they should pass)
and on scikit-image's sample pictures (they should not). Prints one table.
"""

from __future__ import annotations

import argparse
import io
import sys
from collections import Counter
from pathlib import Path

import numpy as np
from PIL import Image

# scikit-image samples that are volumes, stacks, helpers or downloads rather than one 2-D picture
SKIP = {"download_all", "lbp_frontal_face", "data_dir", "stereo_motorcycle", "lfw_subset", "kidney", "cells3d",
        "protein_transport", "brain", "nickel_solidification", "vortex", "human_mitosis", "skin", "eagle", "lily",
        "file_hash", "colorwheel"}


def _natural_images() -> dict[str, bytes]:
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
        buffer = io.BytesIO()
        Image.fromarray(array.astype(np.uint8)).save(buffer, format="PNG")
        images[name] = buffer.getvalue()
    return images


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--model", type=Path, help="bundle (default: the bundled model); its feature gate is used if it has one")
    args = parser.parse_args(argv)

    from pneumoscan.data import decode_image, load_image, scan_split
    from pneumoscan.gate import image_reasons as image_checks
    from pneumoscan.inference import Predictor

    predictor = Predictor.from_bundle(args.model)
    print(f"feature gate: {'threshold %.3f' % predictor.gate.threshold if predictor.gate else 'none in this bundle'}")

    def image_reasons(image):
        found = image_checks(image)
        if not found and predictor.gate is not None:
            if predictor.is_out_of_distribution(predictor.predict_images([image])[0]):
                found = ["out_of_distribution"]
        return found

    rows = []
    for split in ("test", "train"):
        samples = scan_split(args.data, split)
        reasons = Counter()
        rejected = 0
        for sample in samples:
            found = image_reasons(load_image(sample.path, draft_size=224))
            rejected += bool(found)
            reasons.update(found)
        rows.append((f"chest X-rays, {split} split (should pass)", len(samples), rejected, dict(reasons), ""))
    naturals = _natural_images()
    reasons, passed = Counter(), []
    for name, data in naturals.items():
        found = image_reasons(decode_image(data, draft_size=224))
        reasons.update(found)
        if not found:
            passed.append(name)
    rows.append(("scikit-image pictures (should be rejected)", len(naturals), len(naturals) - len(passed),
                 dict(reasons), "passed: " + ", ".join(passed)))
    print(f"{'set':<45} {'n':>5} {'rejected':>9} {'rate':>7}  reasons")
    for name, n, rejected, why, extra in rows:
        print(f"{name:<45} {n:>5} {rejected:>9} {rejected / n:>7.2%}  {why} {extra}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
