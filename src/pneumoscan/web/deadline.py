"""A deadline for receiving a request's body: slow uploads (slow-loris) end with a 408.

gunicorn's threads read the body only when the app asks for it, from a blocking socket with no
timeout, so one client trickling bytes could hold a thread for ever. Before each read of the
body, the socket's timeout is set to what is left of ``REQUEST_TIMEOUT`` seconds since the
request began; the total time to receive an upload is bounded, not just the gap between bytes.
"""

from __future__ import annotations

import socket
import time
from typing import Any

from flask import Flask, current_app, g, request

from pneumoscan.errors import PneumoscanError


class UploadTimeout(PneumoscanError):
    """The request body did not arrive within REQUEST_TIMEOUT seconds."""

    code = "request_timeout"
    http_status = 408


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

    def read(self, *args: Any) -> bytes:
        return self._guarded("read", *args)

    def readline(self, *args: Any) -> bytes:
        return self._guarded("readline", *args)

    def __iter__(self):
        return iter(self.readline, b"")


def install_upload_deadline(app: Flask) -> None:
    """Bound the time to receive each request body by ``REQUEST_TIMEOUT`` seconds."""

    @app.before_request
    def arm_deadline() -> None:
        seconds = float(current_app.config["REQUEST_TIMEOUT"])
        sock = request.environ.get("gunicorn.socket")
        g.upload_socket = sock
        request.environ["wsgi.input"] = _DeadlineStream(request.environ["wsgi.input"], sock,
                                                        time.monotonic() + seconds, seconds)

    @app.after_request
    def disarm_deadline(response):
        sock = g.get("upload_socket")
        if sock is not None:
            sock.settimeout(None)  # gunicorn owns the socket again (keep-alive)
        if response.status_code == 408:
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
