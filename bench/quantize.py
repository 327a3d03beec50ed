"""Would INT8 pay? Static INT8 quantisation (ONNX Runtime, QDQ, per-channel) of a bundle's
model.onnx, measured against the float32 model: latency at batch 1 and AUC / accuracy on the
bundle's validation split and on the test split.

    python bench/quantize.py --data ../shared/data/chest_xray [--model BUNDLE]

Calibration uses 120 of the bundle's own training images. The issue's rule: ship INT8 only if
AUC moves by at most 0.005 and accuracy by at most 0.5 points. Writes nothing into the bundle.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def _p50_ms(runner, repeats: int = 100) -> float:
    x = np.random.default_rng(0).integers(0, 256, (1, 1, 224, 224), dtype=np.uint8)
    for _ in range(10):
        runner(x)
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        runner(x)
        times.append(time.perf_counter() - started)
    return sorted(times)[repeats // 2] * 1000


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--model", type=Path)
    args = parser.parse_args(argv)

    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process
    from sklearn.metrics import roc_auc_score

    from pneumoscan.data import read_split, scan_split
    from pneumoscan.models import default_bundle_path, verify_bundle
    from pneumoscan.runtime import OnnxRunner

    bundle = args.model or default_bundle_path()
    spec = verify_bundle(bundle)
    if spec.onnx is None:
        print(f"{bundle} has no model.onnx; run 'pneumoscan export' first")
        return 2
    pixels = spec.preprocessing.read
    onnx_path = bundle / spec.onnx.file

    class TrainingImages(CalibrationDataReader):
        def __init__(self) -> None:
            chosen = read_split(bundle, args.data, role="train")[::40][:120]
            self.batches = iter([{"pixels": pixels(s.path)[None]} for s in chosen])

        def get_next(self):
            return next(self.batches, None)

    with tempfile.TemporaryDirectory() as tmp:
        prepared, int8 = Path(tmp) / "prepared.onnx", Path(tmp) / "int8.onnx"
        quant_pre_process(str(onnx_path), str(prepared))
        quantize_static(str(prepared), str(int8), TrainingImages(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
        runners = {"float32": OnnxRunner(onnx_path), "int8": OnnxRunner(int8)}
        sizes = {"float32": onnx_path.stat().st_size, "int8": int8.stat().st_size}
        latency = {name: _p50_ms(runner) for name, runner in runners.items()}
        splits = {
            "validation": [(s.path, s.label == 1) for s in read_split(bundle, args.data)],
            "test": [(s.path, s.label == 1) for s in scan_split(args.data, "test")],
        }
        print(f"{'model':<8} {'MB':>6} {'p50 ms':>7}  " + "  ".join(f"{s + ' AUC':>15} {s + ' acc':>15}" for s in splits))
        scores: dict[str, dict[str, tuple[float, float]]] = {}
        for name, runner in runners.items():
            scores[name] = {}
            for split, items in splits.items():
                x = np.stack([pixels(path) for path, _ in items])
                y = np.array([label for _, label in items])
                z = np.concatenate([runner(x[i:i + 32])[0] for i in range(0, len(x), 32)])
                p = spec.decision.probability(z)
                scores[name][split] = (roc_auc_score(y, p), float(((p >= spec.decision.threshold) == y).mean()))
            print(f"{name:<8} {sizes[name] / 1e6:>6.1f} {latency[name]:>7.2f}  " + "  ".join(
                f"{auc:>15.4f} {acc:>15.4f}" for auc, acc in scores[name].values()))
    for split in splits:
        d_auc = scores["int8"][split][0] - scores["float32"][split][0]
        d_acc = scores["int8"][split][1] - scores["float32"][split][1]
        verdict = "within" if abs(d_auc) <= 0.005 and abs(d_acc) <= 0.005 else "outside"
        print(f"{split}: int8 - float32 = AUC {d_auc:+.4f}, accuracy {d_acc * 100:+.2f} points ({verdict} the rule)")
    print(f"latency: float32 / int8 = {latency['float32'] / latency['int8']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
