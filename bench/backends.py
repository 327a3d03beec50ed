"""The bundle on each installed runtime, each in its own process, side by side (no PyTorch needed).

    python bench/backends.py --data ../shared/data/chest_xray [--model BUNDLE] [--films 160] [--rounds 2]

What a command-line user gets from ``--backend``: films per second through
``Predictor.predict_paths`` (what ``pneumoscan predict`` and ``evaluate`` run: decode, network,
gate, decision) over the first ``--films`` test films, and the single-film end-to-end p50 (decode
and predict one film, 60 times). Each backend runs in a fresh process, alternating, ``--rounds``
times, so one runtime's idle threads never compete with another's and a slow minute is visible as
spread. Serving under concurrent load is ``bench/load.py``'s job (``--backend``).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

_CHILD = """
import json, statistics, sys, time
from pathlib import Path
from pneumoscan.inference import Predictor
backend, model, data, films = sys.argv[1], sys.argv[2] or None, Path(sys.argv[3]), int(sys.argv[4])
paths = sorted((data / "test").rglob("*.jpeg"))[:films]
predictor = Predictor.from_bundle(model, backend=backend)
predictor.predict_paths(paths[:32])  # warm-up
started = time.perf_counter()
predictor.predict_paths(paths)
rate = len(paths) / (time.perf_counter() - started)
one, times = paths[0].read_bytes(), []
for _ in range(60):
    started = time.perf_counter()
    predictor.predict([predictor.preprocessing.decode(one)])
    times.append(time.perf_counter() - started)
print(json.dumps({"rate": rate, "p50_ms": statistics.median(times) * 1000}))
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True, help="Kaggle-layout root (its test/ films are used)")
    parser.add_argument("--model", type=Path)
    parser.add_argument("--films", type=int, default=160)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args(argv)
    backends = ["onnxruntime"] + (["openvino"] if importlib.util.find_spec("openvino") else [])
    rows: dict[str, list[dict]] = {b: [] for b in backends}
    for _ in range(args.rounds):
        for backend in backends:
            out = subprocess.run([sys.executable, "-c", _CHILD, backend, str(args.model or ""), str(args.data),
                                  str(args.films)], capture_output=True, text=True, check=True)
            rows[backend].append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(f"{args.films} test films, {args.rounds} round(s), each backend in its own process")
    print(f"{'backend':<12} {'films/s (predict_paths)':>24} {'single film p50 ms':>20}")
    for backend, runs in rows.items():
        rates = ", ".join(f"{r['rate']:.1f}" for r in runs)
        p50s = ", ".join(f"{r['p50_ms']:.1f}" for r in runs)
        print(f"{backend:<12} {rates:>24} {p50s:>20}")
    if len(backends) == 1:
        print("openvino not compared: pip install 'pneumoscan[openvino]'")
    return 0


if __name__ == "__main__":
    sys.exit(main())
