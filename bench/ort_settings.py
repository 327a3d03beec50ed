"""ONNX Runtime session settings for the bundle's graph, side by side in one run (no PyTorch).

    python bench/ort_settings.py [--data ../shared/data/chest_xray] [--model BUNDLE] [--repeats 100]

For each variant (graph optimisation level, intra-op threads, memory arena) it times the network
alone on one real image (pixels -> log-odds and gate features, what ``OnnxRunner`` runs) and
prints p50/p95, the speed against the shipped setting, and the largest difference of the
log-odds from it. The shipped setting (``pneumoscan.runtime.OnnxRunner``) is ORT_ENABLE_ALL,
every usable core, arena on.

When the ``openvino`` package is importable (``pip install openvino``; not a dependency), OpenVINO's
CPU runtime runs the same ONNX file in the same table, at its default inference precision (which
is bfloat16 on CPUs that have it) and at float32, with one thread and with every core. Issue 17's
rule: OpenVINO is offered as a backend only if it is at least 1.3x faster than the shipped setting
with log-odds within 1e-5.
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
    runs = [(f"onnxruntime {level}", threads, "on" if arena else "off",
             _ort_run(_session(bundle / spec.onnx.file, level, threads, arena), pixels))
            for level, threads, arena in variants]
    runs += _openvino_runs(bundle / spec.onnx.file, pixels, sorted({1, cores}))
    # Rounds interleave the variants, so a slow minute on this shared machine hits them all alike.
    rounds, times = 5, {index: [] for index in range(len(runs))}
    outputs = [None] * len(runs)
    for index, (_, _, _, run) in enumerate(runs):
        for _ in range(5):
            outputs[index] = run()
    for _ in range(rounds):
        for index, (_, _, _, run) in enumerate(runs):
            for _ in range(max(1, args.repeats // rounds)):
                started = time.perf_counter()
                run()
                times[index].append(time.perf_counter() - started)
    rows = []
    for index, (name, threads, memory, _) in enumerate(runs):
        ordered = sorted(times[index])
        rows.append((name, threads, memory, statistics.median(ordered) * 1000, ordered[int(0.95 * (len(ordered) - 1))] * 1000,
                     float(np.abs(outputs[index] - outputs[0]).max())))
    base = rows[0][3]
    print(f"{spec.name}: {spec.members} member(s) + gate extractor, one image, {args.repeats} runs each, {cores} cores")
    header = f"{'runtime, setting':<36} {'threads':>7} {'arena':>6} {'p50 ms':>8} {'p95 ms':>8} {'speed-up':>9} {'max |dlog-odds|':>16}"
    print(header)
    print("-" * len(header))
    for name, threads, memory, p50, p95, diff in rows:
        print(f"{name:<36} {threads:>7} {memory:>6} {p50:>8.1f} {p95:>8.1f} {base / p50:>8.2f}x {diff:>16.1e}")
    if not any(name.startswith("openvino") for name, *_ in rows):
        print("OpenVINO not compared: the openvino package is not installed (pip install openvino)")
    return 0


def _ort_run(session, pixels: np.ndarray):
    return lambda: session.run(["log_odds", "features"], {"pixels": pixels})[0]


def _openvino_runs(path: Path, pixels: np.ndarray, thread_counts: list[int]) -> list:
    """OpenVINO's CPU plugin on the same file: default precision and float32, per thread count."""
    try:
        import openvino as ov
    except ImportError:
        return []
    core = ov.Core()
    model = core.read_model(str(path))
    runs = []
    for precision in ("default", "f32"):
        for threads in thread_counts:
            config = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_NUM_THREADS": threads}
            if precision == "f32":
                config["INFERENCE_PRECISION_HINT"] = "f32"
            compiled = core.compile_model(model, "CPU", config)
            request = compiled.create_infer_request()
            actual = compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name()
            output = compiled.output("log_odds")
            run = lambda request=request, output=output: request.infer({"pixels": pixels})[output].copy()  # noqa: E731
            runs.append((f"openvino {ov.__version__.split('-')[0]} {precision} ({actual})", threads, "-", run))
    return runs


if __name__ == "__main__":
    sys.exit(main())
