"""Soak test: ``pneumoscan serve`` under mixed good and hostile requests for a bounded time.

    python bench/soak.py [--data ../shared/data/chest_xray] [--minutes 10] [--clients 6]

Starts its own server on 127.0.0.1 (as bench/load.py does). Each client sends, in a fixed
rotation, good X-rays (4 in 5 requests) and hostile ones: an empty file, random bytes, a
truncated JPEG, a PNG declaring 50,000x50,000 pixels, an HTML page named .jpg, too many files,
and a request without a file. Prints, per minute: requests, p99 of the good requests, 5xx count,
wrong answers (a good X-ray with an error, a hostile request without its 4xx), and server
memory (proportional set size of master and workers); then its growth from the first minute to
the last. Goal: zero 5xx, memory growth under 10%.
"""

from __future__ import annotations

import argparse
import struct
import sys
import threading
import time
import uuid
import zlib
from pathlib import Path

from load import PredictClient, ServedApp, _images, _multipart


def _png_bomb() -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 50_000, 50_000, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b""))


def _many_files(data: bytes, count: int) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    part = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"x.jpg\"\r\n"
            "Content-Type: image/jpeg\r\n\r\n").encode() + data + b"\r\n"
    return part * count + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def hostile_requests(good: bytes) -> list[tuple[str, bytes, str, int]]:
    """(label, body, content type, expected HTTP status)."""
    requests = [
        ("empty", *_multipart("empty.jpg", b""), 422),
        ("random", *_multipart("random.jpg", bytes(range(256)) * 64), 415),
        ("truncated", *_multipart("cut.jpg", good[: len(good) // 3]), 422),
        ("png-bomb", *_multipart("bomb.png", _png_bomb()), 413),
        ("html", *_multipart("page.jpg", b"<html><script>alert(1)</script></html>"), 415),
        ("too-many-files", *_many_files(good[:64], 40), 413),
    ]
    no_file = uuid.uuid4().hex
    requests.append(("no-file", f"--{no_file}\r\nContent-Disposition: form-data; name=\"x\"\r\n\r\n1\r\n--{no_file}--\r\n".encode(),
                     f"multipart/form-data; boundary={no_file}", 400))
    return requests


class Tally:
    """Per-minute counts, shared by the client threads."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.minutes: dict[int, dict] = {}
        self.wrong_kinds: dict[str, int] = {}

    def add(self, minute: int, *, label: str, seconds: float, status: int, correct: bool) -> None:
        good = label == "good"
        with self.lock:
            if not correct:
                self.wrong_kinds[f"{label}->{status}"] = self.wrong_kinds.get(f"{label}->{status}", 0) + 1
            row = self.minutes.setdefault(minute, {"requests": 0, "good_latencies": [], "5xx": 0, "wrong": 0})
            row["requests"] += 1
            if good:
                row["good_latencies"].append(seconds)
            row["5xx"] += status >= 500 or status == 0
            row["wrong"] += not correct


def client(port: int, good: list[tuple[bytes, str]], hostile, started: float, deadline: float, tally: Tally,
           offset: int) -> None:
    connection = PredictClient(port)
    i = offset
    while time.monotonic() < deadline:
        if i % 5 == 4:
            label, body, content_type, expected = hostile[(i // 5) % len(hostile)]
        else:
            label, (body, content_type), expected = "good", good[i % len(good)], 200
        i += 1
        t0 = time.perf_counter()
        status, text, _ = connection.post(body, content_type)
        # a good X-ray gets a prediction, or (rarely: 0.6% of test X-rays) a gate rejection; never an error
        correct = status == expected and (label != "good" or b'"status":"error"' not in text)
        tally.add(int((time.monotonic() - started) // 60), label=label,
                  seconds=time.perf_counter() - t0, status=status, correct=correct)
    connection.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, help="Kaggle-layout root: real test X-rays as the good requests")
    parser.add_argument("--model", type=Path)
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--clients", type=int, default=6)
    parser.add_argument("--workers", type=int, help="gunicorn workers (default: serve's, one per core)")
    parser.add_argument("--threads", type=int, default=8)
    args = parser.parse_args(argv)

    images = _images(args.data)
    good = [_multipart(name, data) for name, data in images]
    hostile = hostile_requests(images[0][1])
    with ServedApp(model=args.model, workers=args.workers, threads=args.threads) as server:
        print(f"server: {server.describe()}; {args.clients} clients for {args.minutes:g} min; 1 in 5 requests hostile "
              f"({len(hostile)} kinds); good images: {'real test X-rays' if args.data else 'synthetic'}")
        tally, rss = Tally(), {}
        started = time.monotonic()
        deadline = started + args.minutes * 60
        threads = [threading.Thread(target=client, args=(server.port, good, hostile, started, deadline, tally, k),
                                    daemon=True) for k in range(args.clients)]
        for t in threads:
            t.start()
        while any(t.is_alive() for t in threads):
            time.sleep(5)
            rss[int((time.monotonic() - started) // 60)] = server.rss_mb()
        for t in threads:
            t.join()
        alive = server.process.poll() is None

    header = f"{'minute':>6} {'requests':>9} {'good p99 ms':>12} {'5xx':>5} {'wrong':>6} {'PSS MB':>8}"
    print(header)
    print("-" * len(header))
    for minute, row in sorted(tally.minutes.items()):
        latencies = sorted(row["good_latencies"])
        p99 = latencies[int(0.99 * (len(latencies) - 1))] * 1000 if latencies else float("nan")
        print(f"{minute + 1:>6} {row['requests']:>9} {p99:>12.1f} {row['5xx']:>5} {row['wrong']:>6} "
              f"{rss.get(minute, float('nan')):>8.0f}")
    total = {key: sum(row[key] for row in tally.minutes.values()) for key in ("requests", "5xx", "wrong")}
    first, last = rss[min(rss)], rss[max(rss)]
    print(f"total: {total['requests']} requests, {total['5xx']} 5xx, {total['wrong']} wrong answers; "
          f"server alive at the end: {alive}; memory (PSS) {first:.0f} -> {last:.0f} MB ({(last - first) / first:+.1%})")
    if tally.wrong_kinds:
        print("wrong answers (request -> HTTP status):", tally.wrong_kinds)
    return 0 if total["5xx"] == 0 and alive else 1


if __name__ == "__main__":
    sys.exit(main())
