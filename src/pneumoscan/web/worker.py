"""The gunicorn worker ``pneumoscan serve`` runs: gthread, with connections that cannot starve it.

gunicorn's gthread worker hands every new connection to a thread at once, and the thread waits up
to 5 s for a first byte before parking it; after that, reading the request line and headers
blocks with no timeout at all. 300 connections that send nothing kept 2 workers x 4 threads busy
for over 55 s (``/healthz`` included), and one that sends half a header line held a thread for
ever. This worker keeps everything else gunicorn does and changes who waits:

- **A request's line and headers are collected by the event loop, not by a thread.** A new or
  kept-alive connection gets a thread only once its headers are complete (or it has sent
  :data:`MAX_HEAD_BYTES`, which is refused with 431). Silence or a trickle costs a file
  descriptor and a small buffer, never a thread; the connection is closed once
  :data:`IDLE_TIMEOUT` seconds have passed since it opened (or since its last response) without a
  complete request head: gunicorn's own keep-alive and pending-connection timers.
- **Every blocking socket operation in a thread runs against a deadline** (:class:`DeadlineSocket`):
  the app sets the body's deadline (``REQUEST_TIMEOUT``, see :mod:`pneumoscan.web.deadline`), and
  once it answers, the client has :data:`SEND_TIMEOUT` seconds to take the response.

The number of open connections is bounded per worker by gunicorn's ``worker_connections`` (set by
``serve`` from the file-descriptor limit, :func:`connection_limit`); past it a worker stops
accepting and the kernel's listen backlog holds the rest. Why not an async worker (gevent,
uvicorn)? The work per request is CPU-bound inference in ONNX Runtime; threads suit it, and only
the waiting needed to move. TLS and cleartext HTTP/2 are left to a reverse proxy, as before.
"""

from __future__ import annotations

import logging
import resource
import selectors
import socket
import time
from functools import partial

from gunicorn.workers.gthread import TConn, ThreadWorker

_HEAD_ENDS = (b"\r\n\r\n", b"\n\n")
_TOO_LARGE = (b"HTTP/1.1 431 Request Header Fields Too Large\r\nConnection: close\r\nContent-Length: 0\r\n\r\n")

#: Seconds a thread may spend on the rest of a request head (past MAX_HEAD_BYTES, which is refused,
#: it never needs to).
HEADER_TIMEOUT = 10.0
#: The most of a request head the event loop collects (nginx's default allows 4 x 8 kB).
MAX_HEAD_BYTES = 64 * 1024
#: Seconds a client has to take a response (a client that never reads cannot hold a thread).
SEND_TIMEOUT = 30.0
#: Seconds from a connection's opening (or its last response) to the end of its next request head.
IDLE_TIMEOUT = 10
#: At most this many open connections per worker process.
MAX_CONNECTIONS = 1000


def connection_limit() -> int:
    """Connections per worker: :data:`MAX_CONNECTIONS`, or fewer where the process's file
    descriptor limit would run out first (an ``accept`` failing with EMFILE would stop the worker)."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return MAX_CONNECTIONS
    return max(16, min(MAX_CONNECTIONS, soft - 128))  # 128: the model, logs, metrics files


class DeadlineSocket(socket.socket):
    """A socket whose blocking operations end at a deadline rather than after a per-call timeout.

    ``setblocking(True)`` (gunicorn, as a thread takes the connection) starts the header deadline;
    ``settimeout(t)`` sets the deadline ``t`` seconds from now; ``settimeout(None)`` (the app,
    handing the socket back after its response) gives :data:`SEND_TIMEOUT`. Past the deadline an
    operation raises TimeoutError, as a socket timeout does.
    """

    _deadline: float | None = None

    def setblocking(self, flag: bool) -> None:
        if flag:
            self._deadline = time.monotonic() + HEADER_TIMEOUT
            super().settimeout(HEADER_TIMEOUT)
        else:
            self._deadline = None
            super().setblocking(False)

    def settimeout(self, value: float | None) -> None:
        if value == 0:
            self.setblocking(False)
            return
        seconds = SEND_TIMEOUT if value is None else float(value)
        self._deadline = time.monotonic() + seconds
        super().settimeout(seconds)

    def _arm(self) -> None:
        if self._deadline is None:
            return
        remaining = self._deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("timed out")
        super().settimeout(remaining)

    def recv(self, *args):
        self._arm()
        return super().recv(*args)

    def recv_into(self, *args):
        self._arm()
        return super().recv_into(*args)

    def send(self, *args):
        self._arm()
        return super().send(*args)

    def sendall(self, *args):
        self._arm()  # since Python 3.5 the timeout bounds the whole sendall
        return super().sendall(*args)


class _QuietTimeouts(logging.Filter):
    """A client that ran out of time is the client's problem: one line, not a traceback."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], TimeoutError):
            record.msg, record.args, record.exc_info, record.exc_text = (
                "closed a connection that did not send its request or take its response in time", (), None, None)
            record.levelno, record.levelname = logging.INFO, "INFO"
        return True


class IdleSafeThreadWorker(ThreadWorker):
    """gthread, with request heads collected in the event loop and deadlines on every socket."""

    def init_process(self) -> None:
        self.log.error_log.addFilter(_QuietTimeouts())
        super().init_process()

    def accept(self, listener: socket.socket) -> None:
        try:
            plain, client = listener.accept()
        except (BlockingIOError, ConnectionAbortedError, InterruptedError):
            return  # another worker took it, or the client gave up
        sock = DeadlineSocket(plain.family, plain.type, plain.proto, fileno=plain.detach())
        self.nr_conns += 1
        conn = TConn(self.cfg, sock, client, listener.getsockname())  # leaves it non-blocking
        # Same timer and same list as gunicorn's deferred connections, so the list stays in order.
        conn.timeout = time.monotonic() + self.cfg.keepalive
        self.pending_conns.append(conn)
        self.poller.register(sock, selectors.EVENT_READ, partial(self._read_head, conn, self.pending_conns))

    def _cap_keepalive(self, deadline: float) -> None:
        # Stopping: connections still waiting for a request head go as soon as kept-alive ones
        # do, rather than holding the worker (and the master's shutdown) for IDLE_TIMEOUT.
        super()._cap_keepalive(deadline)
        for conn in self.pending_conns:
            conn.timeout = min(conn.timeout, deadline)

    def on_client_socket_readable(self, conn: TConn, client: socket.socket) -> None:
        self._read_head(conn, self.keepalived_conns, client)  # a kept-alive connection's next request

    def _read_head(self, conn: TConn, waiting, client: socket.socket) -> None:
        """Take what has arrived; hand the connection to a thread once its request head is whole."""
        try:
            chunk = conn.sock.recv(MAX_HEAD_BYTES)
        except BlockingIOError:
            return
        except OSError:
            chunk = b""
        head = getattr(conn, "head", b"") + chunk
        complete = any(end in head for end in _HEAD_ENDS)
        if chunk and not complete and len(head) < MAX_HEAD_BYTES:
            conn.head = head
            return
        self.poller.unregister(client)
        waiting.remove(conn)
        if not chunk or not complete:  # the client left, or the head is too large
            if chunk:
                try:
                    conn.sock.send(_TOO_LARGE)
                except OSError:
                    pass
            self.nr_conns -= 1
            conn.close()
            return
        conn.head = head
        conn.data_ready = True
        self.enqueue_req(conn)

    def handle(self, conn: TConn):
        head = conn.__dict__.pop("head", None)
        if head:
            conn.sock.setblocking(True)
            conn.init()
            conn.parser.unreader.unread(head)  # the parser reads the head from here, then the socket
        return super().handle(conn)
