"""The worst case per request, measured with the files that produce it (README, "Worst case").

    python bench/worst_case.py [--repeats 3] [--workers 1]

Starts ``pneumoscan serve`` on loopback (one worker by default, so the figures are one
request's), then sends every file of ``bombs.catalogue()`` alone, ``--repeats`` times each,
nothing else running: the bombs refused from a header and the most expensive files that still
fit the decoding budget. For each file: its size, the answer (and whether it is the expected one),
the slowest answer, the server's peak PSS above idle (sampled every 20 ms), and its PSS 2 s after
the answer, above the idle PSS measured before the file. Goal (issue 23): every answer within
10 s and 1 GB over idle, memory back within 100 MB.
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from pathlib import Path

import bombs
from load import PredictClient, ServedApp, _multipart


def measure(server: ServedApp, name: str, data: bytes) -> tuple[int, float, float]:
    """(status, seconds, peak PSS MB above the PSS just before)."""
    before = server.rss_mb()
    peak, done = [before], threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak.append(server.rss_mb())
            time.sleep(0.02)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    started = time.perf_counter()
    status, _, _ = PredictClient(server.port).post(*_multipart(name, data))
    seconds = time.perf_counter() - started
    done.set()
    sampler.join()
    return status, seconds, max(peak) - before


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)

    files = bombs.catalogue()
    passed = True
    with ServedApp(model=args.model, workers=args.workers, threads=4) as server:
        time.sleep(2)
        idle = server.rss_mb()
        print(f"server: {server.describe()}; idle PSS {idle:.0f} MB; each file alone, {args.repeats} times")
        header = f"{'file':<28} {'size kB':>8} {'answer':>7} {'slowest s':>10} {'peak +MB':>9} {'after +MB':>10}"
        print(header)
        print("-" * len(header))
        for label, name, data, expected in files:
            runs = [measure(server, name, data) for _ in range(args.repeats)]
            time.sleep(2)
            after = server.rss_mb() - idle
            statuses = {status for status, _, _ in runs}
            slowest, rise = max(s for _, s, _ in runs), max(r for _, _, r in runs)
            ok = statuses == {expected}
            answer = "/".join(map(str, sorted(statuses))) + ("" if ok else "!")
            print(f"{label:<28} {len(data) / 1000:>8.0f} {answer:>7} {slowest:>10.2f} {rise:>9.0f} {after:>10.0f}")
            passed &= ok and slowest <= 10 and rise <= 1024 and after <= 100
    print(f"goal (every answer as expected, within 10 s and 1 GB, memory back within 100 MB): "
          f"{'met' if passed else 'NOT met'}")
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
