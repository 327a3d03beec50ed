"""Each request's time and decoding budget.

A deadline for receiving a request's body: slow uploads (slow-loris) end with a 408.

gunicorn's threads read the body only when the app asks for it, from a blocking socket with no
timeout, so one client trickling bytes could hold a thread for ever. Before each read of the
body, the socket's timeout is set to what is left of ``REQUEST_TIMEOUT`` seconds since the
request began; the total time to receive an upload is bounded, not just the gap between bytes.

The same deadline covers decoding. Each image's decoding is already bounded by
``imaging.MAX_DECODE_BYTES`` (refused from its header when larger), and a worker process decodes
at most ``DECODE_CONCURRENCY`` images at once, so the memory decoding can take is bounded per
process, not per request. A request that cannot get a decoding slot before its deadline, or whose
deadline passes between files, gets a 503 with Retry-After instead of queueing for ever.
"""

from __future__ import annotations

import functools
import socket
import threading
import time
from contextlib import contextmanager
from typing import Any, Iterator

from flask import Flask, current_app, g, request

from pneumoscan.errors import PneumoscanError


class UploadTimeout(PneumoscanError):
    """The request body did not arrive within REQUEST_TIMEOUT seconds."""

    code = "request_timeout"
    http_status = 408


class MalformedBody(PneumoscanError):
    """The server could not read the request body as HTTP framed it (broken chunked encoding)."""

    code = "malformed_body"
    http_status = 400


class ServerBusy(PneumoscanError):
    """The request's deadline passed while it waited to decode (other uploads held the slots)."""

    code = "server_busy"
    http_status = 503
    retry_after = 5


class _DeadlineStream:
    """Wraps ``wsgi.input``: every read first checks and arms the deadline."""

    def __init__(self, stream: Any, sock: Any, deadline: float, seconds: float) -> None:
        self._stream, self._sock, self._deadline, self._seconds = stream, sock, deadline, seconds

    def _arm(self) -> None:
        remaining = self._deadline - time.monotonic()
        if remaining <= 0:
            raise UploadTimeout(f"the upload did not arrive within {self._seconds:g} seconds")
        if self._sock is not None:
            self._sock.settimeout(remaining)

    def _guarded(self, method: str, *args: Any) -> bytes:
        self._arm()
        try:
            return getattr(self._stream, method)(*args)
        except TimeoutError:
            raise UploadTimeout(f"the upload did not arrive within {self._seconds:g} seconds") from None
        except (PneumoscanError, MemoryError):
            raise
        except Exception as exc:  # gunicorn's parser: a bad chunk size, a missing chunk terminator...
            g.malformed_body = True  # the connection's framing is lost: it must not be reused
            raise MalformedBody(f"the request body is malformed ({type(exc).__name__}); "
                                "send it again with a valid Content-Length or chunked encoding") from None

    def read(self, *args: Any) -> bytes:
        return self._guarded("read", *args)

    def readline(self, *args: Any) -> bytes:
        return self._guarded("readline", *args)

    def __iter__(self):
        return iter(self.readline, b"")


def install_upload_deadline(app: Flask) -> None:
    """Bound the time to receive each request body by ``REQUEST_TIMEOUT`` seconds."""

    app.extensions["pneumoscan_decode_slots"] = threading.BoundedSemaphore(int(app.config["DECODE_CONCURRENCY"]))

    @app.before_request
    def arm_deadline() -> None:
        seconds = float(current_app.config["REQUEST_TIMEOUT"])
        sock = request.environ.get("gunicorn.socket")
        g.upload_socket = sock
        g.deadline = time.monotonic() + seconds
        request.environ["wsgi.input"] = _DeadlineStream(request.environ["wsgi.input"], sock, g.deadline, seconds)

    @app.after_request
    def disarm_deadline(response):
        sock = g.get("upload_socket")
        if sock is not None:
            sock.settimeout(None)  # gunicorn owns the socket again (keep-alive)
        if response.status_code == 408 or getattr(g, "malformed_body", False):
            # The rest of the body may still be in flight: the connection must not be reused.
            # gunicorn drops a Connection header set by the app, so stop reading from the socket
            # instead; gunicorn sends this response, sees the end of input, and closes.
            response.headers["Connection"] = "close"
            if sock is not None:
                try:
                    sock.shutdown(socket.SHUT_RD)
                except OSError:
                    pass
        return response


@contextmanager
def decode_slot() -> Iterator[None]:
    """Hold one of this process's decoding slots, waiting no longer than the request's deadline.

    Raises:
        ServerBusy: the deadline passed first.
    """
    slots = current_app.extensions["pneumoscan_decode_slots"]
    remaining = g.deadline - time.monotonic()
    if remaining <= 0 or not slots.acquire(timeout=remaining):
        seconds = float(current_app.config["REQUEST_TIMEOUT"])
        raise ServerBusy(f"the server could not process this request within {seconds:g} seconds "
                         "(it is busy decoding other uploads); retry in a few seconds")
    started = time.monotonic()
    try:
        yield
    finally:
        slots.release()
        if time.monotonic() - started > LARGE_DECODE_SECONDS:
            release_free_memory()


#: A decode that held its slot this long was a large file (films of a few megapixels take
#: 10-50 ms; the largest files inside the budget 0.2-1 s).
LARGE_DECODE_SECONDS = 0.15


def release_free_memory() -> None:
    """Give the heap's free pages back to the system (glibc ``malloc_trim``; elsewhere nothing).

    Large buffers are mmapped and go back when freed (``serve`` fixes glibc's mmap threshold),
    but a large decode also leaves the thread arenas fragmented: after 12 decodes of a 5600^2
    16-bit JPEG-LS DICOM on 4 threads a worker kept +273 MB, +130 MB after gc, and was back at
    its idle size after one ``malloc_trim`` (30 ms, bench/worst_case.py). Only large decodes
    pay for it.
    """
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)


@functools.lru_cache(maxsize=1)
def _libc():
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.malloc_trim  # noqa: B018 - glibc only
    except (OSError, AttributeError):
        return None
    return libc
