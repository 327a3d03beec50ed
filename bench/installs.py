"""The light install against the full one, side by side, in one run.

    python bench/installs.py --full .venv --light .venv-light [--data ../shared/data/chest_xray]
                             [--duration 30] [--clients 8,32]

For each environment (its own Python): the size of its site-packages; the start-up time of
``pneumoscan --help``, of ``pneumoscan predict`` on one image (to its CSV) and of ``pneumoscan
serve`` until ``/readyz`` answers; the server's PSS at idle; requests/s and p50/p99 at each
client count (``bench/load.py``'s clients, real test X-rays with ``--data``); the server's peak
PSS; and whether the server process loaded torch. Both run on the same machine minutes apart;
read the ratios, this 2-core machine is noisy.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from load import ServedApp, _images, _multipart, _tree_rss_mb, run_level


def _site_packages_mb(venv: Path) -> float:
    paths = list(venv.glob("lib/python*/site-packages"))
    total = sum(f.stat().st_size for p in paths for f in p.rglob("*") if f.is_file() and not f.is_symlink())
    return total / 1e6


def _timed(command: list[str]) -> float:
    started = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - started


def _torch_in_server(pid: int) -> bool:
    """Whether any process of the server has a torch library mapped."""
    import re

    children = subprocess.run(["pgrep", "-g", str(os.getpgid(pid))], capture_output=True, text=True).stdout.split()
    for child in children:
        try:
            if re.search(r"libtorch|torch/_C", Path(f"/proc/{child}/maps").read_text()):
                return True
        except OSError:
            continue
    return False


def measure(venv: Path, data: Path | None, clients: list[int], duration: float) -> dict:
    python = str(venv / "bin" / "python")
    image = _images(data, count=1)[0]
    row: dict = {"env": venv.name, "site-packages MB": _site_packages_mb(venv)}
    row["--help s"] = _timed([python, "-m", "pneumoscan", "--help"])
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / image[0]
        path.write_bytes(image[1])
        row["predict 1 image s"] = _timed([python, "-m", "pneumoscan", "predict", str(path), "--csv", str(Path(tmp) / "out.csv")])
    started = time.perf_counter()
    server = ServedApp(python=python)
    with server:
        row["serve to /readyz s"] = time.perf_counter() - started
        time.sleep(2)
        row["idle PSS MB"] = server.rss_mb()
        row["torch loaded"] = _torch_in_server(server.process.pid)
        peak = [row["idle PSS MB"]]
        stop = threading.Event()

        def watch() -> None:
            while not stop.wait(0.5):
                peak[0] = max(peak[0], _tree_rss_mb(server.process.pid))

        threading.Thread(target=watch, daemon=True).start()
        payloads = [_multipart(name, body) for name, body in _images(data)]
        for count in clients:
            result = run_level(server.port, payloads, count, duration, 20000, expect_ok=data is not None)
            row[f"{count} clients req/s"] = result["rps"]
            row[f"{count} clients p99 ms"] = result["p99"]
            row[f"{count} clients errors"] = result["errors"]
        stop.set()
        row["peak PSS MB"] = peak[0]
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--full", type=Path, default=Path(".venv"))
    parser.add_argument("--light", type=Path, default=Path(".venv-light"))
    parser.add_argument("--data", type=Path)
    parser.add_argument("--duration", type=float, default=30.0)
    parser.add_argument("--clients", default="8,32")
    args = parser.parse_args(argv)
    clients = [int(c) for c in args.clients.split(",")]
    rows = [measure(venv.resolve(), args.data, clients, args.duration) for venv in (args.full, args.light)]
    width = max(len(key) for key in rows[0])
    print(f"{'':<{width}} " + " ".join(f"{row['env']:>14}" for row in rows) + f" {'light/full':>11}")
    for key in rows[0]:
        if key == "env":
            continue
        values = [row[key] for row in rows]
        cells = " ".join(f"{v!s:>14}" if isinstance(v, bool) else f"{v:>14.1f}" for v in values)
        ratio = (f"{values[1] / values[0]:>11.2f}" if not isinstance(values[0], bool) and values[0] else f"{'':>11}")
        print(f"{key:<{width}} {cells} {ratio}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
