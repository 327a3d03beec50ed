"""Load test: ``pneumoscan serve`` on 127.0.0.1, concurrent clients posting X-rays, bounded in time.

    python bench/load.py [--data ../shared/data/chest_xray] [--duration 60] [--clients 8,32]
                         [--workers N] [--threads 8] [--model BUNDLE ...]

``--model`` may be repeated (a folder or a bundled model's name: ``--model default --model
fast``): each model is served in turn, one server at a time, and the last lines compare their
requests/s at each concurrency level.

Starts its own server (gunicorn, the same command a user runs), waits for /readyz, then for each
concurrency level runs that many clients for ``--duration`` seconds (at most ``--max-requests``
requests), each posting one image per request to /api/v1/predict over a kept-alive connection.
Prints requests/s, latency p50/p95/p99, errors (anything but a 200 without a per-file error), and the
server's peak memory (proportional set size of master and workers together), then stops the server.
"""

from __future__ import annotations

import argparse
import http.client
import io
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import numpy as np


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _images(data: Path | None, count: int = 64) -> list[tuple[str, bytes]]:
    if data is not None:
        paths = sorted((data / "test").rglob("*.jpeg"))[::max(1, 624 // count)][:count]
        return [(p.name, p.read_bytes()) for p in paths]
    from PIL import Image, ImageDraw

    images = []
    rng = np.random.default_rng(0)
    for i in range(8):  # grey, chest-shaped: they pass the image checks (the feature gate may refuse them)
        image = Image.new("L", (512, 480), 30)
        draw = ImageDraw.Draw(image)
        draw.ellipse((60, 60, 230, 420), fill=120)
        draw.ellipse((280, 60, 450, 420), fill=120)
        pixels = np.clip(np.asarray(image, dtype=float) + rng.normal(0, 15, (480, 512)), 0, 255).astype(np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
        images.append((f"synthetic{i}.jpeg", buffer.getvalue()))
    return images


def _multipart(name: str, data: bytes) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"{name}\"\r\n"
            "Content-Type: image/jpeg\r\n\r\n").encode() + data + f"\r\n--{boundary}--\r\n".encode()
    return body, f"multipart/form-data; boundary={boundary}"


def _tree_rss_mb(pid: int) -> float:
    """Memory of a process and its children (gunicorn master + workers), in MB.

    Proportional set size: pages the forked workers share with the master (torch's libraries)
    count once, split between them, instead of once per process as plain RSS would.
    """
    total, pending = 0, [pid]
    while pending:
        current = pending.pop()
        try:
            rollup = Path(f"/proc/{current}/smaps_rollup").read_text().splitlines()
            total += next(int(line.split()[1]) for line in rollup if line.startswith("Pss:"))
            children = Path(f"/proc/{current}/task/{current}/children").read_text().split()
            pending.extend(int(c) for c in children)
        except (OSError, StopIteration):
            continue
    return total / 1024


class PredictClient:
    """A kept-alive connection posting to /api/v1/predict; it reconnects after a failure."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)

    def post(self, body: bytes, content_type: str) -> tuple[int, bytes, str]:
        """``(HTTP status, response body, "")``, or ``(0, b"", exception name)`` when the request failed."""
        try:
            self.connection.request("POST", "/api/v1/predict", body=body, headers={"Content-Type": content_type})
            response = self.connection.getresponse()
            return response.status, response.read(), ""
        except (OSError, http.client.HTTPException) as exc:
            self.close()
            self.connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
            return 0, b"", type(exc).__name__

    def close(self) -> None:
        self.connection.close()


class _Client(threading.Thread):
    def __init__(self, port: int, payloads: list[tuple[bytes, str]], deadline: float, budget: list[int],
                 lock: threading.Lock, expect_ok: bool) -> None:
        super().__init__(daemon=True)
        self.port, self.payloads, self.deadline, self.budget, self.lock = port, payloads, deadline, budget, lock
        self.expect_ok = expect_ok
        self.latencies: list[float] = []
        self.errors: list[str] = []

    def run(self) -> None:
        client = PredictClient(self.port)
        i = self.ident or 0
        while time.monotonic() < self.deadline:
            with self.lock:
                if self.budget[0] <= 0:
                    break
                self.budget[0] -= 1
            body, content_type = self.payloads[i % len(self.payloads)]
            i += 1
            started = time.perf_counter()
            status, text, failure = client.post(body, content_type)
            if failure:
                self.errors.append(failure)
                continue
            self.latencies.append(time.perf_counter() - started)
            # a prediction or a gate rejection is an answer; an error status is not
            if status != 200 or (self.expect_ok and b'"status":"error"' in text):
                self.errors.append(f"HTTP {status}")
        client.close()


def run_level(port: int, payloads, clients: int, duration: float, max_requests: int, expect_ok: bool) -> dict:
    lock, budget = threading.Lock(), [max_requests]
    started = time.monotonic()
    workers = [_Client(port, payloads, started + duration, budget, lock, expect_ok) for _ in range(clients)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    elapsed = time.monotonic() - started
    latencies = sorted(x for w in workers for x in w.latencies)
    errors = [e for w in workers for e in w.errors]
    pick = lambda q: latencies[min(len(latencies) - 1, int(q * len(latencies)))] * 1000 if latencies else float("nan")  # noqa: E731
    return {"clients": clients, "requests": len(latencies), "rps": len(latencies) / elapsed,
            "p50": pick(0.50), "p95": pick(0.95), "p99": pick(0.99), "errors": len(errors),
            "error_kinds": sorted(set(errors))}


class ServedApp:
    """``pneumoscan serve`` on a free loopback port, from /readyz to SIGTERM (a context manager)."""

    def __init__(self, *, model: Path | None = None, workers: int | None = None, threads: int = 8,
                 backend: str = "auto", extra: list[str] | None = None, python: str = sys.executable) -> None:
        self.port = _free_port()
        self.command = [python, "-m", "pneumoscan", "serve", "--port", str(self.port),
                        "--threads", str(threads), "--backend", backend, *(extra or [])]
        if workers is not None:
            self.command += ["--workers", str(workers)]
        if model:
            self.command += ["--model", str(model)]
        self.process: subprocess.Popen | None = None

    def __enter__(self) -> "ServedApp":
        self.process = subprocess.Popen(self.command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                        start_new_session=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        deadline = time.monotonic() + 180
        while True:
            try:
                connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
                connection.request("GET", "/readyz")
                if connection.getresponse().status == 200:
                    return self
            except OSError:
                pass
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.__exit__(None, None, None)
                raise RuntimeError("the server did not start:\n" + (self.process.stderr.read() or "")[-3000:])
            time.sleep(0.5)

    def __exit__(self, *exc) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)

    def rss_mb(self) -> float:
        return _tree_rss_mb(self.process.pid)

    def describe(self) -> str:
        return " ".join(self.command[2:])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, help="Kaggle-layout root: post real test X-rays (default: synthetic)")
    parser.add_argument("--model", action="append", help="bundle folder or bundled model name (repeatable)")
    parser.add_argument("--duration", type=float, default=60.0, help="seconds per concurrency level")
    parser.add_argument("--clients", default="8,32", help="concurrency levels, comma-separated")
    parser.add_argument("--max-requests", type=int, default=20000, help="cap per level")
    parser.add_argument("--workers", type=int, help="gunicorn workers (default: serve's, one per core)")
    parser.add_argument("--threads", type=int, default=8)
    parser.add_argument("--backend", default="auto")
    args = parser.parse_args(argv)

    levels = [int(c) for c in args.clients.split(",")]
    payloads = [_multipart(name, data) for name, data in _images(args.data)]
    rates: dict[str, dict[int, float]] = {}
    for model in args.model or [None]:
        name = model or "default"
        with ServedApp(model=model, workers=args.workers, threads=args.threads, backend=args.backend) as server:
            peak = [server.rss_mb()]
            stop = threading.Event()

            def watch_memory() -> None:
                while not stop.wait(0.5):
                    peak[0] = max(peak[0], server.rss_mb())

            threading.Thread(target=watch_memory, daemon=True).start()
            print(f"model {name}; server: {server.describe()}; {len(payloads)} distinct images "
                  f"({'real test X-rays' if args.data else 'synthetic'}); idle memory (PSS) {peak[0]:.0f} MB")
            header = f"{'clients':>7} {'requests':>9} {'req/s':>7} {'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8} {'errors':>7}"
            print(header)
            print("-" * len(header))
            for clients in levels:
                r = run_level(server.port, payloads, clients, args.duration, args.max_requests,
                              expect_ok=args.data is not None)
                rates.setdefault(name, {})[clients] = r["rps"]
                print(f"{r['clients']:>7} {r['requests']:>9} {r['rps']:>7.1f} {r['p50']:>8.1f} {r['p95']:>8.1f} "
                      f"{r['p99']:>8.1f} {r['errors']:>7} {' '.join(r['error_kinds'])}")
            stop.set()
            print(f"peak server memory (PSS, master + workers): {peak[0]:.0f} MB\n")
    if len(rates) > 1:
        first, *others = rates
        for other in others:
            ratios = ", ".join(f"{rates[other][c] / rates[first][c]:.2f}x at {c} clients" for c in levels)
            print(f"req/s, {other} / {first}: {ratios}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
