"""Quality benchmark: the default recipe (or a given bundle) on the official test split vs published anchors.

    python bench/quality.py --data ../shared/data/chest_xray                # train, then evaluate
    python bench/quality.py --data ../shared/data/chest_xray --model BUNDLE # evaluate only

Everything the model uses (epochs, threshold, temperature) is chosen on the patient-grouped
validation split carved from train; the test split is only evaluated. Prints one table.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

# (name, accuracy, sensitivity, specificity, ROC-AUC, source) on the same 624 test images.
ANCHORS: list[tuple[str, float | None, float | None, float | None, float | None, str]] = [
    ("Seed design (ResNet50 fine-tuned)", 0.89, None, None, 0.97, "pneumoscan seed report (weighted F1 0.89)"),
    ("Kermany et al. 2018 (InceptionV3)", 0.928, 0.932, 0.901, 0.968, "Cell 172(5), 2018"),
    ("MedMNIST v2 ResNet-50 (224)", 0.884, None, None, 0.962, "Yang et al., Sci Data 2023"),
    ("Google AutoML Vision", 0.946, None, None, 0.991, "Yang et al., Sci Data 2023 (MedMNIST v2)"),
    ("MedMNIST+ best single model", 0.916, None, None, 0.989, "Doerrich et al., MedMNIST+ 2024"),
]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True, help="Kaggle-layout chest_xray root")
    parser.add_argument("--model", type=Path, help="evaluate this bundle instead of training one")
    parser.add_argument("--out", type=Path, help="run directory (default: a temporary one)")
    parser.add_argument("--bootstrap", type=int, default=2000)
    parser.add_argument("--tta", action="store_true", help="flip test-time augmentation")
    args = parser.parse_args(argv)

    from pneumoscan.errors import PneumoscanError
    from pneumoscan.evaluation import evaluate_folder

    out = args.out or Path(tempfile.mkdtemp(prefix="pneumoscan-quality-"))
    train_seconds = None
    try:
        bundle = args.model
        if bundle is None:
            from pneumoscan.training import TrainConfig, train

            started = time.perf_counter()
            bundle = train(TrainConfig(data=args.data, out=out / "run"))
            train_seconds = time.perf_counter() - started
        metrics = evaluate_folder(bundle, args.data, "test", out / "test", n_boot=args.bootstrap, tta=args.tta)
    except PneumoscanError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    def cell(value: float | None) -> str:
        return "-" if value is None else f"{value:.3f}"

    def ci(name: str) -> str:
        m = metrics[name]
        return f"{m['value']:.3f} ({m['ci_low']:.3f}-{m['ci_high']:.3f})"

    rows = [(f"pneumoscan: {metrics['model']['name']}", ci("accuracy"), ci("sensitivity"),
             ci("specificity"), ci("roc_auc"), f"this run, n={metrics['n']}")]
    rows += [(name, cell(a), cell(se), cell(sp), cell(auc), src) for name, a, se, sp, auc, src in ANCHORS]
    header = ("model", "accuracy (95% CI)", "sensitivity", "specificity", "ROC-AUC", "source")
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, tuple("-" * w for w in widths), *rows]:
        print("  ".join(str(c).ljust(w) for c, w in zip(row, widths)))
    print()
    print(f"operating point: {metrics['operating_point']} (threshold {metrics['threshold']:.4f}, chosen on validation); "
          f"tta: {metrics['tta']}")
    cal = metrics["calibration"]
    print(f"calibration on test: ECE {cal['ece_15_before']:.3f} -> {cal['ece_15_after']:.3f}, "
          f"Brier {cal['brier_before']:.3f} -> {cal['brier_after']:.3f} (temperature {cal['temperature']:.3f})")
    print(f"training wall time: {'not trained here' if train_seconds is None else f'{train_seconds / 60:.1f} min'}")
    print(f"report: {out / 'test' / 'report.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
