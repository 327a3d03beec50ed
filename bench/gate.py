"""Input-gate benchmark: false rejections on real X-rays, rejections of non-X-ray images.

    python bench/gate.py --data ../shared/data/chest_xray [--model BUNDLE]

Runs the gate (image checks, then the bundle's feature gate if it has one) on every image of the
test and train splits (they should pass) and on the non-X-ray images of ``bench/nonxray.py``:
natural pictures in colour and grey, documents and greyscale screenshots (they should not).
Prints one table.
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter, defaultdict
from pathlib import Path

from nonxray import all_non_xrays


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--model", type=Path, help="bundle (default: the bundled model); its feature gate is used if it has one")
    parser.add_argument("--splits", default="test,train", help="X-ray splits to run (comma-separated; '' for none)")
    args = parser.parse_args(argv)

    from pneumoscan.data import scan_split
    from pneumoscan.inference import Predictor

    predictor = Predictor.from_bundle(args.model)
    print(f"feature gate: {'threshold %.3f' % predictor.gate.threshold if predictor.gate else 'none in this bundle'}")

    def image_reasons(image) -> list[str]:
        """The gate's reasons through the same decision as the API and ``pneumoscan predict``."""
        return list(predictor.predict([image])[0].reasons)

    rows = []
    for split in [name for name in args.splits.split(",") if name]:
        samples = scan_split(args.data, split)
        reasons = Counter()
        rejected = 0
        for sample in samples:
            found = image_reasons(predictor.preprocessing.load(sample.path))
            rejected += bool(found)
            reasons.update(found)
        rows.append((f"chest X-rays, {split} split (should pass)", len(samples), rejected, dict(reasons), ""))
    by_kind: dict[str, dict[str, bytes]] = defaultdict(dict)
    for key, data in all_non_xrays().items():
        kind, name = key.split("/", 1)
        by_kind[kind][name] = data
    total, total_rejected = 0, 0
    for kind, images in by_kind.items():
        reasons, passed = Counter(), []
        for name, data in images.items():
            found = image_reasons(predictor.preprocessing.decode(data, name=name))
            reasons.update(found)
            if not found:
                passed.append(name)
        total += len(images)
        total_rejected += len(images) - len(passed)
        rows.append((f"{kind} images (should be rejected)", len(images), len(images) - len(passed),
                     dict(reasons), "passed: " + ", ".join(passed) if passed else ""))
    rows.append(("all non-X-ray images (should be rejected)", total, total_rejected, {}, ""))
    print(f"{'set':<45} {'n':>5} {'rejected':>9} {'rate':>7}  reasons")
    for name, n, rejected, why, extra in rows:
        print(f"{name:<45} {n:>5} {rejected:>9} {rejected / n:>7.2%}  {why} {extra}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
