"""Does a snapshot ensemble (mean log-odds of several epochs of one run) beat the run's best epoch?

    python bench/snapshot.py --data ../shared/data/chest_xray --run runs/e7-lite0-snap --epochs 2,3,4
    python bench/snapshot.py --data ../shared/data/chest_xray --run runs/e7-lite0-snap --epochs 2,3,4 --test

The run must have been trained with ``pneumoscan train --keep-epoch-checkpoints``, which keeps
``checkpoints/epoch=N.ckpt``. Every member, the ensemble and the run's own bundle are scored on
the bundle's validation split; each gets its own temperature and balanced (Youden) threshold
there, exactly as ``pneumoscan train`` fits a single model. Weights are rounded to fp16 first,
as a bundle stores them. The test split is scored only with ``--test``, with everything already
fixed on validation, so a decision can be written down before any test figure exists.

Log-odds are cached beside the checkpoints (``snapshot-<split>-<name>.npy``), so ``--test``
after a validation pass recomputes only the test images.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np


def log_odds(predictor, samples: list, *, batch_size: int = 32) -> np.ndarray:
    """Uncalibrated log-odds of pneumonia for every sample, in order (the predictor's own forward)."""
    chunks = []
    for start in range(0, len(samples), batch_size):
        pixels = np.stack([predictor.preprocessing.read(s.path) for s in samples[start:start + batch_size]])
        chunks.append(predictor.forward(pixels)[0])
    return np.concatenate(chunks).astype(np.float64)


def epoch_list(text: str) -> list[int]:
    """``"2,3,4"`` -> ``[2, 3, 4]`` (an argparse type: bad input is a usage error, not a traceback)."""
    try:
        epochs = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated epoch numbers, got {text!r}") from None
    if not epochs:
        raise argparse.ArgumentTypeError("no epochs given")
    return epochs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True, help="Kaggle-layout chest_xray root")
    parser.add_argument("--run", type=Path, required=True, help="run directory (bundle/ and checkpoints/)")
    parser.add_argument("--epochs", type=epoch_list, default=[2, 3, 4], help="comma-separated epochs to average")
    parser.add_argument("--test", action="store_true", help="also score the test split (after deciding)")
    args = parser.parse_args(argv)

    import copy

    import torch

    from pneumoscan.calibration import calibrate_on_validation
    from pneumoscan.data import read_split, scan_split
    from pneumoscan.errors import PneumoscanError
    from pneumoscan.inference import Predictor
    from pneumoscan.models import load_bundle
    from pneumoscan.runtime import TorchRunner
    from pneumoscan.stats import expected_calibration_error, point_metrics

    bundle_dir = args.run / "bundle"
    try:
        net, spec = load_bundle(bundle_dir, check_onnx=False)
        parts = {"val": read_split(bundle_dir, args.data)}
        if args.test:
            parts["test"] = scan_split(args.data, "test")
    except PneumoscanError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    checkpoints = {f"epoch {e}": args.run / "checkpoints" / f"epoch={e}.ckpt" for e in args.epochs}
    missing = [str(p) for p in checkpoints.values() if not p.is_file()]
    if missing:
        print(f"error: missing checkpoints (train with --keep-epoch-checkpoints): {', '.join(missing)}",
              file=sys.stderr)
        return 2
    labels = {name: np.array([s.label for s in samples]) for name, samples in parts.items()}

    def cached_log_odds(name: str, member, split: str) -> np.ndarray:
        path = args.run / "checkpoints" / f"snapshot-{split}-{name.replace(' ', '')}.npy"
        if path.is_file():
            return np.load(path)
        values = log_odds(Predictor(member, spec, TorchRunner.for_bundle(member, spec)), parts[split])
        np.save(path, values)
        return values

    scores: dict[str, dict[str, np.ndarray]] = {}
    for name in ["bundle", *checkpoints]:
        member = net
        if name != "bundle":
            state = torch.load(checkpoints[name], map_location="cpu", weights_only=True)["state_dict"]
            member = copy.deepcopy(net)  # the bundle's architecture, without reading it again
            member.load_state_dict({k[len("net."):]: v for k, v in state.items() if k.startswith("net.")})
            member.half().float().eval()  # the precision a bundle would store
        scores[name] = {split: cached_log_odds(name, member, split) for split in parts}
    scores["ensemble"] = {split: np.mean([scores[n][split] for n in checkpoints], axis=0) for split in parts}

    header = ["model", "T", "threshold", "val loss", "val AUC", "val acc", "val sens", "val spec"]
    if args.test:
        header += ["| test acc", "test AUC", "test sens", "test spec", "test loss", "test ECE"]
    print(" ".join(f"{h:>10}" if i else f"{h:<12}" for i, h in enumerate(header)))
    for name, by_split in scores.items():
        calibration = calibrate_on_validation(labels["val"], by_split["val"])
        decision = calibration.decision
        t, threshold = decision.temperature, decision.threshold
        val = point_metrics(labels["val"], decision.probability(by_split["val"]), threshold=threshold)
        cells = [t, threshold, val["loss"], val["roc_auc"], val["accuracy"], val["sensitivity"],
                 val["specificity"]]
        if args.test:
            prob = decision.probability(by_split["test"])
            test = point_metrics(labels["test"], prob, threshold=threshold)
            cells += [test["accuracy"], test["roc_auc"], test["sensitivity"], test["specificity"],
                      test["loss"], expected_calibration_error(labels["test"], prob)]
        print(f"{name:<12} " + " ".join(f"{c:>10.4f}" for c in cells))
    print(f"\nvalidation {len(labels['val'])} images" +
          (f", test {len(labels['test'])} images" if args.test else "") +
          "; temperature and threshold fitted on validation for each row")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
