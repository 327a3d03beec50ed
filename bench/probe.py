"""Which backbone's ImageNet features separate the classes best? A cheap, cached comparison.

    python bench/probe.py --data ../shared/data/chest_xray
    python bench/probe.py --data ../shared/data/chest_xray --backbones efficientnet_lite0,mobilenet_v2

For each backbone, the frozen ImageNet network's pooled features of every image (squashed to the
backbone's square input size, like training does) are computed once and cached under
``--cache`` (keyed by backbone, size and the file list). A logistic regression is then fitted on
the training part of the same patient-grouped split that ``pneumoscan train`` carves (seed 0,
10%); its regularisation C and its threshold (Youden's J) are chosen on validation. The test
split is scored last, with everything already fixed. Prints one table; the validation columns
are the ones to choose by.

Backbones whose ImageNet weights are not installed are reported and skipped.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
import time
from pathlib import Path

import numpy as np

C_GRID = (0.01, 0.03, 0.1, 0.3, 1.0, 3.0)
DEFAULT_BACKBONES = "efficientnet_lite0,efficientnet_lite1,efficientnet_lite2,mobilenet_v2"


def pooled_features(backbone: str, samples: list, *, cache: Path, batch_size: int = 32) -> tuple[np.ndarray, float]:
    """``(N x F float32 features, seconds per image)``; cached by backbone, size and file list."""
    import torch

    from pneumoscan.dataset import XrayDataset
    from pneumoscan.imaging import Preprocessing
    from pneumoscan.models import PixelNetwork, backbone_info, create_classifier

    info = backbone_info(backbone)
    size = info.default_input_size
    key = hashlib.sha256("\n".join(str(s.path) for s in samples).encode()).hexdigest()[:16]
    path = cache / f"{backbone}-{size}-{key}.npy"
    if path.is_file():
        return np.load(path), float("nan")
    net = create_classifier(backbone, weights="imagenet", input_size=size).eval()
    network = PixelNetwork(net, info.mean, info.std).eval()  # its head is untrained; only features are used
    dataset = XrayDataset(samples, Preprocessing(size=size), cache=False)
    started = time.perf_counter()
    chunks = []
    with torch.inference_mode():
        for start in range(0, len(dataset), batch_size):
            pixels = torch.stack([dataset[i][0] for i in range(start, min(start + batch_size, len(dataset)))])
            chunks.append(network(pixels)[1].numpy())
    seconds = (time.perf_counter() - started) / len(dataset)
    features = np.concatenate(chunks).astype(np.float32)
    cache.mkdir(parents=True, exist_ok=True)
    np.save(path, features)
    return features, seconds


def probe(train_x: np.ndarray, train_y: np.ndarray, val_x: np.ndarray, val_y: np.ndarray):
    """The validation-best (by log loss) standardised logistic regression and its C."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import log_loss
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    best = None
    for c in C_GRID:
        model = make_pipeline(StandardScaler(), LogisticRegression(C=c, class_weight="balanced", max_iter=2000))
        model.fit(train_x, train_y)
        loss = log_loss(val_y, model.predict_proba(val_x)[:, 1])
        if best is None or loss < best[0]:
            best = (loss, c, model)
    assert best is not None
    return best


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True, help="Kaggle-layout chest_xray root")
    parser.add_argument("--backbones", default=DEFAULT_BACKBONES, help="comma-separated registry names")
    parser.add_argument("--cache", type=Path, default=Path("runs/features"), help="feature cache folder")
    parser.add_argument("--val-fraction", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    from pneumoscan.data import carve_validation, scan_split
    from pneumoscan.errors import PneumoscanError, WeightsUnavailableError
    from pneumoscan.calibration import youden_threshold
    from pneumoscan.stats import point_metrics

    try:
        pool = scan_split(args.data, "train")
        try:
            pool += scan_split(args.data, "val")
        except PneumoscanError:
            pass
        split = carve_validation(pool, fraction=args.val_fraction, seed=args.seed)
        test = scan_split(args.data, "test")
    except PneumoscanError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    parts = {"train": list(split.train), "val": list(split.val), "test": test}
    labels = {name: np.array([s.label for s in samples]) for name, samples in parts.items()}

    rows = []
    for backbone in [b.strip() for b in args.backbones.split(",") if b.strip()]:
        try:
            features = {}
            ms = []
            for name, samples in parts.items():
                features[name], seconds = pooled_features(backbone, samples, cache=args.cache)
                ms.append(seconds * 1000)
        except WeightsUnavailableError as exc:
            print(f"skipped {backbone}: {exc}", file=sys.stderr)
            continue
        val_loss, c, model = probe(features["train"], labels["train"], features["val"], labels["val"])
        val_score = model.predict_proba(features["val"])[:, 1]
        threshold = youden_threshold(labels["val"], val_score)
        val = point_metrics(labels["val"], val_score, threshold=threshold)
        test_m = point_metrics(labels["test"], model.predict_proba(features["test"])[:, 1], threshold=threshold)
        fresh = [m for m in ms if m == m]  # NaN: read from the cache, not timed
        rows.append((backbone, features["train"].shape[1], c, val_loss, val, test_m,
                     sum(fresh) / len(fresh) if fresh else float("nan")))

    header = ("backbone", "dim", "C", "val loss", "val AUC", "val acc", "| test AUC", "test acc",
              "test sens", "test spec", "ms/img")
    print(" ".join(f"{h:>10}" if i else f"{h:<20}" for i, h in enumerate(header)))
    for backbone, dim, c, val_loss, val, test_m, ms in rows:
        cells = [f"{dim:>10}", f"{c:>10g}", f"{val_loss:>10.4f}", f"{val['roc_auc']:>10.4f}",
                 f"{val['accuracy']:>10.4f}", f"{test_m['roc_auc']:>10.4f}", f"{test_m['accuracy']:>10.4f}",
                 f"{test_m['sensitivity']:>10.4f}", f"{test_m['specificity']:>10.4f}",
                 f"{ms:>10.1f}" if ms == ms else f"{'cached':>10}"]
        print(f"{backbone:<20} " + " ".join(cells))
    print(f"\ntrain {len(parts['train'])}, validation {len(parts['val'])}, test {len(parts['test'])} images; "
          "C and threshold chosen on validation")
    return 0 if rows else 2


if __name__ == "__main__":
    raise SystemExit(main())
