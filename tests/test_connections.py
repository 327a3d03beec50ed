"""The real server under connections that send nothing, or half a request: they cannot starve it.

Runs ``pneumoscan serve`` (gunicorn with :class:`pneumoscan.web.worker.IdleSafeThreadWorker`) and
opens 300 idle connections and a few that stop half-way through their headers; ``/healthz``
must keep answering within a second, and the server closes the idle ones on its own.
"""

from __future__ import annotations

import http.client
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import pytest

from pneumoscan.web.worker import IDLE_TIMEOUT, MAX_HEAD_BYTES, DeadlineSocket


@contextmanager
def serving(bundle: Path, *args: str, env: dict[str, str] | None = None) -> Iterator[tuple[int, list[str]]]:
    """``pneumoscan serve`` on a free port; yields the port and, after the block, its output."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen(
        [sys.executable, "-m", "pneumoscan", "serve", "--model", str(bundle), "--port", str(port), *args],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
        env={**{k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"},
             "PNEUMOSCAN_INFERENCE_THREADS": "1", **(env or {})})
    output: list[str] = []
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5):
                    break
            except OSError:
                assert server.poll() is None and time.monotonic() < deadline, "server did not start"
                time.sleep(0.3)
        yield port, output
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        output.append(server.communicate(timeout=30)[0])


def _closed_by_server(sock: socket.socket) -> bool:
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True
    except (TimeoutError, BlockingIOError):
        return False


def test_300_idle_connections_and_stalled_headers_cannot_starve_the_server(tiny_bundle: Path) -> None:
    with serving(tiny_bundle, "--workers", "2", "--threads", "2") as (port, output):
        idle = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(300)]
        stalled = []
        for _ in range(8):  # twice the threads: half a header each, then silence
            sock = socket.create_connection(("127.0.0.1", port), timeout=5)
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: ")
            stalled.append(sock)
        opened = time.monotonic()
        slowest = 0.0
        while time.monotonic() - opened < IDLE_TIMEOUT + 1:
            started = time.monotonic()
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=10) as r:
                assert r.status == 200
            slowest = max(slowest, time.monotonic() - started)
            time.sleep(0.25)
        assert slowest < 1.0, f"/healthz took {slowest:.2f} s with 300 idle connections open"
        # the server closed them itself, IDLE_TIMEOUT after they opened without a whole request head
        for sock in idle + stalled:
            sock.settimeout(3)
        assert sum(_closed_by_server(sock) for sock in idle) == 300
        assert sum(_closed_by_server(sock) for sock in stalled) == 8
        for sock in idle + stalled:
            sock.close()
        with socket.create_connection(("127.0.0.1", port), timeout=10) as huge:
            huge.sendall(b"GET /healthz HTTP/1.1\r\nX-Big: " + b"a" * MAX_HEAD_BYTES)
            assert huge.recv(4096).startswith(b"HTTP/1.1 431 ")
        kept = http.client.HTTPConnection("127.0.0.1", port, timeout=10)  # keep-alive still works
        for _ in range(3):
            kept.request("GET", "/healthz")
            assert kept.getresponse().read() == b'{"status":"ok"}\n'
        kept.close()
    assert "Traceback" not in output[0], output[0][-3000:]


def test_a_trickled_header_is_cut_off_at_the_deadline_not_per_byte() -> None:
    """One byte every 0.3 s never trips a per-call timeout; the deadline ends it anyway."""
    left, right = socket.socketpair()
    sock = DeadlineSocket(left.family, left.type, left.proto, fileno=left.detach())
    sock.setblocking(True)
    sock.settimeout(1.0)  # the deadline, one second from now
    started = time.monotonic()
    with pytest.raises(TimeoutError):
        while True:
            right.send(b"x")
            sock.recv(1)
            time.sleep(0.3)
    assert 0.9 < time.monotonic() - started < 2.0
    sock.close()
    right.close()
