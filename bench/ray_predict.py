"""``pneumoscan predict`` on the local engine beside ``--engine ray``, the same films, one run.

    python bench/ray_predict.py --data ../shared/data/chest_xray [--model BUNDLE] [--repeat 1]

Runs each command as a user would (a new process: the bundle loads, and Ray starts a local
cluster on this machine), on the 624 official test films, writing a CSV, and prints films/s for
each and the Ray / local ratio of the wall times (the target on 2 cores: Ray within 30%, i.e.
a ratio of at most 1.30). The two CSVs must be identical, or it says so.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def run(command: list[str]) -> float:
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if done.returncode not in (0, 1):  # 1: some file unreadable, still an answer
        raise RuntimeError(f"{' '.join(command[2:])} failed:\n{done.stderr[-3000:]}")
    return seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True, help="Kaggle-layout root: its test/ split is predicted")
    parser.add_argument("--model", type=Path)
    parser.add_argument("--repeat", type=int, default=1, help="runs of each engine, alternating (best is kept)")
    parser.add_argument("--copies", type=int, default=1,
                        help="name the test folder this many times (an archive N x 624 films: Ray's start-up, "
                             "a fixed cost, then weighs less)")
    args = parser.parse_args(argv)
    films = sorted((args.data / "test").rglob("*.jpeg")) * args.copies
    base = [sys.executable, "-m", "pneumoscan", "predict", *[str(args.data / "test")] * args.copies, "--quiet",
            *(["--model", str(args.model)] if args.model else [])]
    with tempfile.TemporaryDirectory(prefix="pneumoscan-ray-bench-") as scratch:
        out = Path(scratch)
        times: dict[str, list[float]] = {"local": [], "ray": []}
        for _ in range(args.repeat):
            times["local"].append(run([*base, "--csv", str(out / "local.csv")]))
            times["ray"].append(run([*base, "--engine", "ray", "--csv", str(out / "ray.csv")]))
        same = (out / "local.csv").read_text() == (out / "ray.csv").read_text()
    local, ray = min(times["local"]), min(times["ray"])
    header = f"{'engine':<26} {'films':>6} {'seconds':>8} {'films/s':>8}"
    print(header)
    print("-" * len(header))
    print(f"{'local (one process)':<26} {len(films):>6} {local:>8.1f} {len(films) / local:>8.1f}")
    print(f"{'ray (local cluster)':<26} {len(films):>6} {ray:>8.1f} {len(films) / ray:>8.1f}")
    print(f"ray / local, wall time: {ray / local:.2f} (target <= 1.30); the CSVs are "
          f"{'identical' if same else 'DIFFERENT'}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
