"""Prometheus metrics: request counts and latency, predictions by label, rejections by reason.

Each app owns its registry (several apps can live in one test process). Under gunicorn with
several workers, ``pneumoscan serve`` sets ``PROMETHEUS_MULTIPROC_DIR`` so that ``/metrics``
adds up every worker's counts, whichever worker answers.
"""

from __future__ import annotations

import os
import time
from typing import Any

from flask import Flask, Response, g, request

# prometheus_client is imported only when an app is built: the client picks its value store
# (in memory, or files shared by workers) once, at import, and under gunicorn that must happen
# in the worker, after ``serve`` has set PROMETHEUS_MULTIPROC_DIR.

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class Metrics:
    """The app's counters and histogram."""

    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Histogram

        self.registry = CollectorRegistry()
        self.requests = Counter("pneumoscan_http_requests", "HTTP requests answered.",
                                ["method", "endpoint", "status"], registry=self.registry)
        self.latency = Histogram("pneumoscan_http_request_duration_seconds", "Time to answer a request.",
                                 ["endpoint"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.predictions = Counter("pneumoscan_predictions", "Images classified, by predicted label.",
                                   ["label", "operating_point"], registry=self.registry)
        self.rejections = Counter("pneumoscan_rejections", "Images refused by the input gate, by reason.",
                                  ["reason"], registry=self.registry)
        self.image_errors = Counter("pneumoscan_image_errors", "Uploaded files that could not be read, by code.",
                                    ["code"], registry=self.registry)
        self.audit_failures = Counter("pneumoscan_audit_write_failures",
                                      "Requests answered 503 because their audit records could not be written.",
                                      registry=self.registry)

    def count_results(self, results: list[dict[str, Any]]) -> None:
        """Count one request's per-image outcomes."""
        for result in results:
            if result["status"] == "ok":
                self.predictions.labels(result["label"], result["operating_point"]).inc()
            elif result["status"] == "rejected":
                for reason in result["reasons"]:
                    self.rejections.labels(reason).inc()
            else:
                self.image_errors.labels(result["error"]["code"]).inc()

    def exposition(self) -> bytes:
        """The text format, over every worker when running multi-process."""
        from prometheus_client import CollectorRegistry, generate_latest

        if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            from prometheus_client import multiprocess

            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry)
            return generate_latest(registry)
        return generate_latest(self.registry)


def install_metrics(app: Flask) -> Metrics:
    """Time and count every request; serve ``GET /metrics``."""
    metrics = Metrics()

    @app.before_request
    def start_timer() -> None:
        g.started = time.perf_counter()

    @app.after_request
    def observe(response):
        # The route pattern, not the raw path: unknown URLs must not create new series.
        endpoint = request.url_rule.rule if request.url_rule is not None else "unmatched"
        metrics.requests.labels(request.method, endpoint, str(response.status_code)).inc()
        if "started" in g:
            metrics.latency.labels(endpoint).observe(time.perf_counter() - g.started)
        return response

    @app.get("/metrics")
    def prometheus_metrics() -> Response:
        from prometheus_client import CONTENT_TYPE_LATEST

        return Response(metrics.exposition(), mimetype=CONTENT_TYPE_LATEST)

    return metrics
