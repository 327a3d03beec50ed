"""Latency and throughput on this CPU: the seed's ResNet50 design vs the bundled model, on PyTorch
eager and on ONNX Runtime, measured side by side in one run.

    python bench/latency.py [--data ../shared/data/chest_xray] [--model BUNDLE ...] [--repeats 200]

``--model`` may be given more than once (a folder or a bundled model's name: ``--model default
--model fast``): every model gets its rows in the same run, and the last line compares their
end-to-end p50 on ONNX Runtime. ``--unshared`` adds, for each model, its graph exported with
every network whole (the frozen ImageNet layers that its members and the gate's extractor hold
byte for byte computed once per network, as before issue 26), to show what sharing them saves.

- end to end, one image at a time: JPEG bytes -> decode -> square resize -> network -> calibrated
  probability (p50 / p95 ms), and the network alone;
- the network's GFLOP per image (PyTorch's FLOP counter) and the GFLOP/s it reaches, against the
  GFLOP/s of a large float32 matrix multiply on the same cores;
- with ``--data``: the 624 test images through ``Predictor.predict_paths`` (what ``pneumoscan
  predict`` runs), in images/s;
- ``--members 1,3,5``: single-image end-to-end latency on ONNX Runtime of ensembles of K members
  of the bundle's architecture plus the independent gate's frozen extractor, exported as one
  graph each (random weights: timing only).
ONNX Runtime's session settings and OpenVINO's runtime on the bundle's graph are compared side by
side in ``bench/ort_settings.py`` (no PyTorch needed).
The seed-equivalent is torchvision's ResNet50 with the seed's Flatten-512-128-2 head (random
weights: timing only). Without ``--data`` the image is a synthetic 1024x1024 JPEG.
"""

from __future__ import annotations

import argparse
import io
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image


def _percentiles(samples: list[float]) -> tuple[float, float]:
    ordered = sorted(samples)
    return statistics.median(ordered) * 1000, ordered[int(0.95 * (len(ordered) - 1))] * 1000


def _timed(function: Callable[[], object], repeats: int, warmup: int = 5) -> list[float]:
    for _ in range(warmup):
        function()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        function()
        times.append(time.perf_counter() - started)
    return times


def matmul_gflops(n: int = 2048, repeats: int = 10) -> float:
    """float32 GEMM throughput of this machine with PyTorch's threads (the practical peak)."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    best = min(_timed(lambda: torch.mm(a, b), repeats, warmup=2))
    return 2 * n**3 / best / 1e9


def network_gflop(model: torch.nn.Module, size: int) -> float:
    """GFLOP of one forward pass at batch 1 (multiply and add counted separately)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter, torch.inference_mode():
        model(torch.zeros(1, 3, size, size))
    return counter.get_total_flops() / 1e9


def _sample_jpeg(data: Path | None) -> bytes:
    if data is not None:
        return next((data / "test" / "PNEUMONIA").glob("*.jpeg")).read_bytes()
    rng = np.random.default_rng(0)
    pixels = np.clip(rng.normal(110, 40, (1024, 1024)), 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", action="append", help="bundle folder or bundled model name (repeatable; "
                                                         "default: the bundled default model)")
    parser.add_argument("--data", type=Path, help="Kaggle-layout root: real test images for latency and throughput")
    parser.add_argument("--repeats", type=int, default=200, help="timed single-image runs per engine")
    parser.add_argument("--seed-repeats", type=int, default=30, help="timed runs of the (slow) seed-equivalent")
    parser.add_argument("--members", default="", help="comma-separated ensemble sizes to time, e.g. 1,3,5")
    parser.add_argument("--unshared", action="store_true",
                        help="also time each model's graph with every network computed whole")
    args = parser.parse_args(argv)

    import tempfile

    from pneumoscan.imaging import Preprocessing
    from pneumoscan.inference import Predictor
    from pneumoscan.models import PixelNetwork, backbone_info, create_classifier, load_gate_extractor
    from pneumoscan.runtime import OnnxRunner

    torch.set_grad_enabled(False)
    jpeg = _sample_jpeg(args.data)
    seed_net = create_classifier("resnet50", weights="none", head="seed", input_size=224).eval()
    resnet = backbone_info("resnet50")
    seed_network = PixelNetwork(seed_net, resnet.mean, resnet.std).eval()
    seed_preprocessing = Preprocessing(size=224)

    def seed_end_to_end() -> float:
        pixels = torch.from_numpy(seed_preprocessing.pixels(seed_preprocessing.decode(jpeg))[None])
        return float(torch.sigmoid(seed_network(pixels)[0])[0])

    def bundle_end_to_end(predictor: Predictor) -> Callable[[], float]:
        return lambda: predictor.predict([predictor.preprocessing.decode(jpeg)])[0].probability

    seed_pixels = torch.from_numpy(seed_preprocessing.pixels(seed_preprocessing.decode(jpeg))[None])
    peak = matmul_gflops()
    engines = [("seed-equivalent ResNet50 + seed head, PyTorch", seed_end_to_end, lambda: seed_network(seed_pixels),
                network_gflop(seed_net, 224), args.seed_repeats, None)]
    loaded = []
    scratch = tempfile.TemporaryDirectory()
    for model in args.model or [None]:
        onnx = Predictor.from_bundle(model, backend="onnxruntime")
        eager = Predictor.from_bundle(model, backend="torch")
        loaded.append((model, onnx, eager))
        spec = eager.spec
        label = f"{model or 'default'}: {spec.backbone}{f' x{spec.members}' if spec.members > 1 else ''}"
        pixels = eager.preprocessing.pixels(eager.preprocessing.decode(jpeg))[None]
        extractor = load_gate_extractor(eager.directory, spec)
        gflop = network_gflop(eager.model, spec.input_size) + (
            0.0 if extractor is None else network_gflop(extractor, spec.input_size))
        engines.append((f"{label}, PyTorch eager", bundle_end_to_end(eager),
                        lambda e=eager, p=pixels: e.forward(p), gflop, args.repeats, None))
        engines.append((f"{label}, ONNX Runtime", bundle_end_to_end(onnx),
                        lambda o=onnx, p=pixels: o.forward(p), gflop, args.repeats, model or "default"))
        if args.unshared:
            from pneumoscan.export import export_onnx

            path = Path(scratch.name) / f"{len(loaded)}-unshared.onnx"
            export_onnx(eager.model, spec, path, extractor=extractor, share_frozen_layers=False)
            whole = Predictor(eager.model, spec, OnnxRunner(path), gate=onnx.gate)
            engines.append((f"{label}, ONNX Runtime, unshared", bundle_end_to_end(whole),
                            lambda w=whole, p=pixels: w.forward(p), gflop, args.repeats, None))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; float32 matmul (2048^2): {peak:.1f} GFLOP/s")
    print(f"image: {'a real test JPEG' if args.data else 'synthetic 1024x1024 JPEG'} ({len(jpeg)} bytes)\n")
    header = (f"{'engine':<52} {'e2e p50 ms':>10} {'e2e p95 ms':>10} {'net p50 ms':>10} {'GFLOP':>7} "
              f"{'GFLOP/s':>8} {'% matmul':>8} {'speed-up':>8}")
    print(header)
    print("-" * len(header))
    seed_p50 = None
    onnx_p50: dict[str, float] = {}
    for name, end_to_end, network, gflop, repeats, key in engines:
        e2e_p50, e2e_p95 = _percentiles(_timed(end_to_end, repeats))
        net_p50, _ = _percentiles(_timed(network, repeats))
        seed_p50 = seed_p50 or e2e_p50
        if key is not None:
            onnx_p50[key] = e2e_p50
        achieved = gflop / (net_p50 / 1000)
        print(f"{name:<52} {e2e_p50:>10.2f} {e2e_p95:>10.2f} {net_p50:>10.2f} {gflop:>7.2f} "
              f"{achieved:>8.1f} {achieved / peak:>8.0%} {seed_p50 / e2e_p50:>7.1f}x")
    print("(GFLOP: the networks as if computed whole, the gate's extractor included)")
    if len(onnx_p50) > 1:
        first, *others = onnx_p50
        for other in others:
            print(f"\nend-to-end p50 on ONNX Runtime, {other} / {first}: {onnx_p50[other] / onnx_p50[first]:.2f}")

    if args.data is not None:
        paths = sorted((args.data / "test").rglob("*.jpeg"))
        print(f"\nbatch throughput, {len(paths)} test images through Predictor.predict_paths (batch 32):")
        for model, onnx, eager in loaded:
            for name, predictor in (("PyTorch eager", eager), ("ONNX Runtime", onnx)):
                predictor.predict_paths(paths[:32])  # warm-up
                started = time.perf_counter()
                outcomes = predictor.predict_paths(paths, batch_size=32)
                seconds = time.perf_counter() - started
                assert all(o.status != "error" for o in outcomes)
                print(f"  {model or 'default'}, {name:<14} {len(paths) / seconds:>7.1f} images/s  ({seconds:.2f} s)")
    if args.members:
        ensemble_latency(loaded[0][2], jpeg, [int(k) for k in args.members.split(",") if k.strip()], args.repeats)
    scratch.cleanup()
    return 0


def ensemble_latency(eager, jpeg: bytes, sizes: list[int], repeats: int) -> None:
    """Single-image e2e p50/p95 on ONNX Runtime for K-member ensembles with the gate's extractor."""
    import tempfile

    from pneumoscan.bundle_tools import GATE_EXTRACTOR
    from pneumoscan.export import export_onnx
    from pneumoscan.gate import FeatureGate
    from pneumoscan.inference import Predictor
    from pneumoscan.models import Ensemble, create_classifier
    from pneumoscan.runtime import OnnxRunner
    from pneumoscan.spec import GateInfo

    spec = eager.spec.replace(gate=GateInfo("gate", "", 1e9, extractor=GATE_EXTRACTOR))
    make = lambda: create_classifier(spec.backbone, head=spec.head, input_size=spec.input_size).eval()  # noqa: E731
    extractor = create_classifier(GATE_EXTRACTOR, input_size=spec.input_size).eval()
    print(f"\nensembles on ONNX Runtime, one image end to end, with the gate's {GATE_EXTRACTOR} extractor:")
    print(f"  {'members':>7} {'e2e p50 ms':>10} {'e2e p95 ms':>10}")
    with tempfile.TemporaryDirectory() as tmp:
        for k in sizes:
            model = make() if k == 1 else Ensemble([make() for _ in range(k)])
            path = Path(tmp) / f"k{k}.onnx"
            export_onnx(model, spec, path, extractor=extractor)
            features = OnnxRunner(path)(np.zeros((1, 1, spec.input_size, spec.input_size), np.uint8))[1]
            gate = FeatureGate(np.zeros(features.shape[1]), np.eye(features.shape[1]), threshold=1e9)
            predictor = Predictor(model, spec, OnnxRunner(path), gate=gate)
            p50, p95 = _percentiles(_timed(
                lambda: predictor.predict([predictor.preprocessing.decode(jpeg)])[0].probability, repeats))
            print(f"  {k:>7} {p50:>10.2f} {p95:>10.2f}")


if __name__ == "__main__":
    sys.exit(main())
