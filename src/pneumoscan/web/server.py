"""Run the app under gunicorn: the model is loaded once, in the master, when workers can share it."""

from __future__ import annotations

import atexit
import logging
import os
import secrets
import shutil
import tempfile
from pathlib import Path
from typing import Any

from gunicorn.app.base import BaseApplication

from pneumoscan.integrity import default_bundle_path, verify_bundle

log = logging.getLogger(__name__)


#: gunicorn's default access line without the query string (``%(U)s`` instead of the request line
#: ``%(r)s``) and the referrer: a key or an identifier put in a URL never reaches the log.
ACCESS_LOG_FORMAT = '%(h)s %(l)s %(u)s %(t)s "%(m)s %(U)s %(H)s" %(s)s %(b)s "%(a)s"'


class _Gunicorn(BaseApplication):
    def __init__(self, options: dict[str, Any]) -> None:
        self.options = options
        super().__init__()

    def load_config(self) -> None:
        for key, value in self.options.items():
            self.cfg.set(key, value)

    def load(self):
        from pneumoscan.web import create_app

        return create_app()


def _worker_started(server, worker) -> None:
    """Large decode buffers go straight back to the system when freed.

    glibc raises its mmap threshold after each large free (up to 32 MB), so the next image's
    buffers come from the heap, and the worker keeps the peak of every burst of large uploads
    (+100-270 MB of idle PSS per burst of decoding bombs, bench/soak.py). A fixed 1 MB threshold
    turns that off; two arenas keep 8 threads from each growing its own heap.
    """
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD
        libc.mallopt(-8, 2)  # M_ARENA_MAX
    except (OSError, AttributeError):  # not glibc: nothing to tune
        pass


def _worker_exit(server, worker) -> None:
    """A dead worker's gauges leave the multi-process metrics."""
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid)


def shares_model(spec, inference_threads: int, backend: str, allow_torch_fallback: bool = False) -> bool:
    """Whether the master loads the app (and its ONNX Runtime session) before forking the workers.

    The workers then share the session's weights copy-on-write: 327 MB of PSS for master + 2
    workers instead of 446 MB with one load per worker (the bundled ensemble, 2 cores). Only safe
    when the session has started no threads (one intra-op thread runs on the calling thread) and
    ONNX Runtime is sure to be the runner (PyTorch's OpenMP threads and OpenVINO's TBB threads do
    not survive a fork; with the PyTorch fallback allowed, a tampered graph would load PyTorch).
    """
    return (inference_threads == 1 and spec.onnx is not None and backend in ("auto", "onnxruntime")
            and not allow_torch_fallback)


def run_gunicorn(*, model_dir: Path | None, host: str, port: int, workers: int | None, threads: int,
                 timeout: int = 120, settings: dict[str, Any] | None = None) -> None:
    """Check the bundle and settings, then serve ``create_app()`` with gunicorn on ``host:port``.

    ``settings`` (app config keys such as MAX_FILES) are passed to the workers as
    ``PNEUMOSCAN_*`` environment variables.

    Raises:
        BundleError: the bundle cannot be loaded (checked before any worker starts).
        ConfigError: a setting is invalid.
    """
    from pneumoscan.errors import ConfigError
    from pneumoscan.runtime import check_has_graph, default_threads, usable_cores
    from pneumoscan.audit import AuditLog
    from pneumoscan.web.config import load_config

    cores = usable_cores()
    workers = workers if workers is not None else min(cores, 4)
    for name, value in (("--workers", workers), ("--threads", threads), ("--timeout", timeout)):
        if value < 1:
            raise ConfigError(f"{name} must be at least 1, got {value}")
    bundle = model_dir or default_bundle_path()
    os.environ["PNEUMOSCAN_MODEL_DIR"] = str(bundle)
    # Workers share the cores: each one's ONNX Runtime gets its part (2 workers x 1 thread served
    # 81 requests/s on 2 cores where 1 worker x 2 threads served 47, bench/load.py).
    os.environ.setdefault("PNEUMOSCAN_INFERENCE_THREADS", str(max(1, cores // workers)))
    for key, value in (settings or {}).items():
        os.environ[f"PNEUMOSCAN_{key}"] = str(value)
    inference_threads = default_threads()  # after the settings: one of them may set it
    if not os.environ.get("PNEUMOSCAN_SECRET_KEY"):
        # One random key for all workers: a form served by one worker must validate on another.
        os.environ["PNEUMOSCAN_SECRET_KEY"] = secrets.token_hex(32)
    config = load_config()
    # Fail here, with a clear message, rather than inside every worker. No torch computation in
    # the master: OpenMP threads started before gunicorn forks would deadlock the workers.
    spec = verify_bundle(bundle, check_onnx=not config["ALLOW_TORCH_FALLBACK"], expected_digest=config["MODEL_SHA256"])
    check_has_graph(bundle, spec, config["BACKEND"])
    if config["AUDIT_LOG"]:
        AuditLog(config["AUDIT_LOG"])  # an unwritable path fails now, not in every worker
    shared = shares_model(spec, inference_threads, config["BACKEND"], config["ALLOW_TORCH_FALLBACK"])
    log.info("the model is %s", f"loaded once, before the {workers} worker(s) fork, and shared by them" if shared
             else f"loaded by each of the {workers} worker(s) ({inference_threads} inference thread(s) each)")
    from pneumoscan.web.worker import IDLE_TIMEOUT, connection_limit

    options: dict[str, Any] = {
        "bind": f"{host}:{port}", "workers": workers, "threads": threads,
        # gthread with new connections parked in the event loop and deadlines on every read and
        # write: connections that send nothing, or trickle their headers, cannot take the threads
        "worker_class": "pneumoscan.web.worker.IdleSafeThreadWorker",
        "keepalive": IDLE_TIMEOUT, "worker_connections": connection_limit(),
        "timeout": timeout, "graceful_timeout": 20, "accesslog": "-", "access_log_format": ACCESS_LOG_FORMAT,
        "preload_app": shared, "post_fork": _worker_started,
    }
    if workers > 1 and not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        # /metrics must add up every worker, whichever one answers the scrape.
        metrics_dir = tempfile.mkdtemp(prefix="pneumoscan-metrics-")
        atexit.register(shutil.rmtree, metrics_dir, True)
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
        options["child_exit"] = _worker_exit
    _Gunicorn(options).run()
