"""Run the app under gunicorn, one model load per worker process."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from gunicorn.app.base import BaseApplication

from pneumoscan.models import default_bundle_path, verify_bundle


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


def run_gunicorn(*, model_dir: Path | None, host: str, port: int, workers: int, threads: int) -> None:
    """Check the bundle, then serve ``create_app()`` with gunicorn on ``host:port``.

    Raises:
        BundleError: the bundle cannot be loaded (checked before any worker starts).
    """
    bundle = model_dir or default_bundle_path()
    # Fail here, with a clear message, rather than inside every worker. No torch computation in
    # the master: OpenMP threads started before gunicorn forks would deadlock the workers.
    verify_bundle(bundle)
    os.environ["PNEUMOSCAN_MODEL_DIR"] = str(bundle)
    _Gunicorn({
        "bind": f"{host}:{port}", "workers": workers, "threads": threads,
        "worker_class": "gthread", "timeout": 120, "accesslog": "-",
        "preload_app": False,
    }).run()
