"""ONNX Runtime session settings for the bundle's graph, side by side in one run (no PyTorch).

    python bench/ort_settings.py [--data ../shared/data/chest_xray] [--model BUNDLE] [--repeats 100]

For each variant (graph optimisation level, intra-op threads, memory arena) it times the network
alone on one real image (pixels -> log-odds and gate features, what ``OnnxRunner`` runs) and
prints p50/p95, the speed against the shipped setting, and the largest difference of the
log-odds from it. The shipped setting (``pneumoscan.runtime.OnnxRunner``) is ORT_ENABLE_ALL,
every usable core, arena on. OpenVINO is not compared: its wheel was not tried here.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np


def _session(path: Path, level: str, threads: int, arena: bool):
    import onnxruntime as ort

    from pneumoscan.runtime import session_options

    return ort.InferenceSession(str(path), sess_options=session_options(threads, optimization=level, arena=arena),
                                providers=["CPUExecutionProvider"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path)
    parser.add_argument("--data", type=Path)
    parser.add_argument("--repeats", type=int, default=100)
    args = parser.parse_args(argv)

    from pneumoscan.integrity import default_bundle_path, verify_bundle
    from pneumoscan.runtime import usable_cores

    bundle = args.model or default_bundle_path()
    spec = verify_bundle(bundle)
    if spec.onnx is None:
        print(f"{bundle} has no ONNX graph; run 'pneumoscan export' first")
        return 2
    if args.data is not None:
        image = spec.preprocessing.read(next((args.data / "test" / "PNEUMONIA").glob("*.jpeg")))
    else:
        image = np.random.default_rng(0).integers(0, 256, (1, spec.input_size, spec.input_size), dtype=np.uint8)
    pixels = image[None]
    cores = usable_cores()
    variants = [("ORT_ENABLE_ALL", cores, True)]  # the shipped setting first: the reference
    variants += [(level, threads, arena) for level in ("ORT_ENABLE_BASIC", "ORT_ENABLE_EXTENDED", "ORT_ENABLE_ALL")
                 for threads in sorted({1, cores}) for arena in (True, False)
                 if (level, threads, arena) != variants[0]]
    rows, reference = [], None
    for level, threads, arena in variants:
        session = _session(bundle / spec.onnx.file, level, threads, arena)
        run = lambda: session.run(["log_odds", "features"], {"pixels": pixels})  # noqa: E731
        for _ in range(5):
            log_odds = run()[0]
        times = []
        for _ in range(args.repeats):
            started = time.perf_counter()
            run()
            times.append(time.perf_counter() - started)
        reference = log_odds if reference is None else reference
        ordered = sorted(times)
        rows.append((level, threads, arena, statistics.median(ordered) * 1000, ordered[int(0.95 * (len(ordered) - 1))] * 1000,
                     float(np.abs(log_odds - reference).max())))
    base = rows[0][3]
    print(f"{spec.name}: {spec.members} member(s) + gate extractor, one image, {args.repeats} runs each, {cores} cores")
    header = f"{'optimisation':<20} {'threads':>7} {'arena':>6} {'p50 ms':>8} {'p95 ms':>8} {'speed-up':>9} {'max |dlog-odds|':>16}"
    print(header)
    print("-" * len(header))
    for level, threads, arena, p50, p95, diff in rows:
        print(f"{level:<20} {threads:>7} {str(arena):>6} {p50:>8.1f} {p95:>8.1f} {base / p50:>8.2f}x {diff:>16.1e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
