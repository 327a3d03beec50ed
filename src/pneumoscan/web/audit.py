"""The audit log: one JSON line per uploaded image, appended, off unless a path is configured.

A line holds what is needed to trace a decision (request id, image sha256, model, operating
point, output, gate reasons) and nothing that identifies a patient: no pixels, no file names
(they often carry names), no DICOM tags.
"""

from __future__ import annotations

import json
import os
import threading
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from pneumoscan.errors import ConfigError

_FIELDS = ("image_sha256", "status", "label", "probability_pneumonia", "threshold", "operating_point",
           "reasons", "review_recommended", "review_reasons", "outside_gate", "gate_reasons")


class AuditLog:
    """Appends records to a JSON-lines file; safe across threads and gunicorn workers."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # O_APPEND: each record is one write() at the end, so workers never interleave lines.
            os.close(os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600))
        except OSError as exc:
            raise ConfigError(f"cannot open the audit log {self.path}: {exc.strerror}") from None

    def record(self, *, request_id: str, model: dict[str, str], results: list[dict[str, Any]]) -> None:
        """One line per image result."""
        now = datetime.now(timezone.utc).isoformat(timespec="milliseconds")
        lines = []
        for result in results:
            entry = {"time": now, "request_id": request_id, "model": model,
                     **{key: result[key] for key in _FIELDS if key in result}}
            if result["status"] == "error":
                entry["error_code"] = result["error"]["code"]
            lines.append(json.dumps(entry, sort_keys=True) + "\n")
        data = "".join(lines).encode()
        with self._lock:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
            try:
                os.write(fd, data)
            finally:
                os.close(fd)
