"""Issue 26, item 2: can the input gate measure a cheaper extractor and keep its contract?

    python bench/gate_extractors.py --data ../shared/data/chest_xray [--model BUNDLE] [--repeats 100]

The shipped gate measures the pooled last feature map of a frozen ImageNet EfficientNet-Lite0
(stem, 7 stages, head convolution: 9 blocks). Its first 4 blocks are byte-identical to the
classifier's frozen ones, so the graph computes them once; the rest is still a second pass of
blocks 5-9. This fits the same gate (Ledoit-Wolf Mahalanobis distance, threshold at the 99.5%
validation quantile, polarity detector on every fourth training film inverted) on the frozen
network's pooled features after fewer blocks, on the bundle's own split, and for each depth prints:

- the contract (``bench/gate.py``'s figures): validation X-rays refused (at most 1%), their
  inverted copies refused (all), the 147 non-X-ray images of ``bench/nonxray.py`` refused (all);
- the official test X-rays refused (reported only, as in the model card);
- single-film latency on ONNX Runtime of the bundle's classifier with that gate, the shared
  blocks computed once, against the classifier alone.

Every image passes the image checks first (colour, size, contrast), as in serving.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from nonxray import all_non_xrays

import onnxruntime as ort

DEPTHS = (6, 7, 8, 9)  # blocks of the frozen extractor run: up to stage 5, 6, 7, all (shipped)


class TruncatedGateNetwork(nn.Module):
    """uint8 pixels -> (log-odds, the extractor's pooled features after ``depth`` blocks), the
    blocks the classifier and the extractor share computed once."""

    def __init__(self, classifier: nn.Module, extractor: nn.Module, depth: int | None, shared: int, mean, std) -> None:
        super().__init__()
        self.classifier, self.extractor, self.depth, self.shared = classifier, extractor, depth, shared
        self.register_buffer("mean_t", torch.tensor(mean, dtype=torch.float32), persistent=False)
        self.register_buffer("std_t", torch.tensor(std, dtype=torch.float32), persistent=False)

    def forward(self, pixels: torch.Tensor):
        from pneumoscan.models.network import normalize, pooled

        x = normalize(pixels, self.mean_t, self.std_t)
        trunk = self.classifier.forward_blocks(x, 0, self.shared)
        logits = self.classifier.forward_head(self.classifier.forward_blocks(trunk, self.shared))
        if self.depth is None:
            return logits[:, 1] - logits[:, 0]
        return logits[:, 1] - logits[:, 0], pooled(self.extractor.forward_blocks(trunk, self.shared, self.depth))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--model", help="bundle folder or bundled model name (default: the bundled default); "
                                        "its split and its first member time the graph")
    parser.add_argument("--repeats", type=int, default=100, help="timed single-film runs per graph")
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args(argv)

    from pneumoscan.data import read_split, scan_split
    from pneumoscan.gate import FeatureGate, image_reasons
    from pneumoscan.integrity import default_bundle_path, resolve_model
    from pneumoscan.models import Ensemble, create_classifier, load_bundle
    from pneumoscan.models.network import normalize, pooled, shared_prefix
    from pneumoscan.runtime import default_threads, session_options

    torch.set_grad_enabled(False)
    bundle = resolve_model(args.model) if args.model else default_bundle_path()
    model, spec = load_bundle(bundle, check_onnx=False)
    classifier = (model.members[0] if isinstance(model, Ensemble) else model).eval()
    extractor = create_classifier("efficientnet_lite0", weights="imagenet", input_size=spec.input_size).eval()
    extractor.half().float()  # the precision a bundle stores it in
    shared = shared_prefix([classifier, extractor])
    preprocessing = spec.preprocessing
    mean, std = spec.mean, spec.std

    def features(pixels: np.ndarray) -> dict[int, np.ndarray]:
        x = normalize(torch.from_numpy(pixels), mean, std)
        found = {}
        for index, _ in enumerate(extractor.blocks):
            x = extractor.forward_blocks(x, index, index + 1)
            if index + 1 in DEPTHS:
                found[index + 1] = pooled(x).numpy()
        return found

    def collect(images: list[np.ndarray], *, invert_every: int = 0) -> tuple[dict, dict]:
        plain: dict[int, list] = {d: [] for d in DEPTHS}
        inverted: dict[int, list] = {d: [] for d in DEPTHS}
        for start in range(0, len(images), args.batch_size):
            batch = np.stack(images[start:start + args.batch_size])
            for depth, value in features(batch).items():
                plain[depth].append(value)
            if invert_every:
                picked = batch[[i for i in range(len(batch)) if (start + i) % invert_every == 0]]
                if len(picked):
                    for depth, value in features(255 - picked).items():
                        inverted[depth].append(value)
        stack = lambda parts: {d: np.concatenate(v) for d, v in parts.items() if v}  # noqa: E731
        return stack(plain), stack(inverted)

    started = time.perf_counter()
    train = [preprocessing.read(s.path) for s in read_split(bundle, args.data, role="train")]
    train_features, train_inverted = collect(train, invert_every=4)
    del train
    val_images = [preprocessing.load(s.path) for s in read_split(bundle, args.data, role="val")]
    val_checks = [bool(image_reasons(image)) for image in val_images]
    val_features, val_inverted = collect([preprocessing.pixels(image) for image in val_images], invert_every=1)
    test_images = [preprocessing.load(s.path) for s in scan_split(args.data, "test")]
    test_checks = [bool(image_reasons(image)) for image in test_images]
    test_features, _ = collect([preprocessing.pixels(image) for image in test_images])
    others = [preprocessing.decode(data, name=name) for name, data in all_non_xrays().items()]
    other_checks = [bool(image_reasons(image)) for image in others]
    other_features, _ = collect([preprocessing.pixels(image) for image in others])
    print(f"features of {len(train_features[9])} training, {len(val_checks)} validation, {len(test_checks)} test "
          f"and {len(others)} non-X-ray images in {time.perf_counter() - started:.0f} s; the classifier and the "
          f"extractor share their first {shared} blocks\n")

    jpeg = next((args.data / "test" / "PNEUMONIA").glob("*.jpeg")).read_bytes()
    pixels = preprocessing.pixels(preprocessing.decode(jpeg))[None]
    with tempfile.TemporaryDirectory() as tmp:
        runners = {}
        for depth in (None, *DEPTHS):
            path = Path(tmp) / f"{depth}.onnx"
            network = TruncatedGateNetwork(classifier, extractor, depth, shared, mean, std).eval()
            outputs = ["log_odds"] if depth is None else ["log_odds", "features"]
            torch.onnx.export(network, (torch.from_numpy(pixels),), str(path), input_names=["pixels"],
                              output_names=outputs, opset_version=17, dynamo=False)
            runners[depth] = ort.InferenceSession(str(path), sess_options=session_options(default_threads()),
                                                  providers=["CPUExecutionProvider"])
        timings = {depth: [] for depth in runners}
        for _ in range(args.repeats + 5):
            for depth, session in runners.items():  # interleaved: a slow minute hits every graph
                start = time.perf_counter()
                session.run(None, {"pixels": pixels})
                timings[depth].append(time.perf_counter() - start)
    alone = statistics.median(timings[None][5:]) * 1000

    header = (f"{'extractor blocks':<18} {'features':>8} {'val refused':>12} {'inverted':>9} {'non-X-rays':>11} "
              f"{'test refused':>13} {'net p50 ms':>10} {'vs alone':>8}")
    print(f"classifier alone: {alone:.2f} ms (network p50, one film)")
    print(header)
    print("-" * len(header))
    for depth in DEPTHS:
        gate = FeatureGate.fit(train_features[depth], val_features[depth], quantile=0.995,
                               inverted_features=train_inverted[depth])

        def refused(feats: np.ndarray, checks: list[bool] | None = None) -> np.ndarray:
            by_features = (gate.distances(feats) > gate.threshold) | gate.inverted(feats)
            return by_features if checks is None else by_features | np.asarray(checks)

        val = refused(val_features[depth], val_checks)
        inverted = refused(val_inverted[depth])
        other = refused(other_features[depth], other_checks)
        test = refused(test_features[depth], test_checks)
        p50 = statistics.median(timings[depth][5:]) * 1000
        name = f"{depth} of 9" + (" (shipped)" if depth == 9 else "")
        print(f"{name:<18} {train_features[depth].shape[1]:>8} {val.sum():>4} ({val.mean():>5.1%}) "
              f"{inverted.mean():>9.1%} {other.sum():>4} of {len(other):<4} {test.sum():>4} ({test.mean():>5.1%}) "
              f"{p50:>10.2f} {p50 / alone:>7.2f}x")
    print("\ncontract: validation X-rays refused <= 1%, inverted copies 100%, non-X-rays 100% (>= 99% in the "
          "model card's rule); test refusals are reported, not chosen on")
    return 0


if __name__ == "__main__":
    sys.exit(main())
