"""The audit log: one JSON line per analysed image (an upload to the web app or API, a film the
DICOM node received), appended, off unless a path is configured.

A line holds what is needed to trace a decision (request id, image sha256, model, operating
point, output, gate reasons; for the DICOM node the film's and the results' SOP Instance UIDs)
and nothing that identifies a patient: no pixels, no file names (they often carry names), no
other DICOM tags.

Durable or the request fails. A request's records are one ``write`` at the end of the file under
an exclusive ``flock`` (threads and gunicorn workers), then ``fdatasync``: the answer leaves only
after its records are on disk (the fsync policy is "every request", a few ms on a local disk;
an audit log that may lose the last second of decisions is not an audit log). A write that fails
or comes up short (disk full, quota, file size limit) is cut back to where the file ended, so a
record is in the log whole or not at all, and the request answers 503 ``audit_unavailable``
instead of a result nobody can trace. Should a line still be torn (the process was killed
mid-write, or the cut-back failed too), the next writer sees that the file does not end with a
line break and starts on a new line, so one torn record never corrupts the next.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import threading
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from pneumoscan.errors import ConfigError, PneumoscanError

log = logging.getLogger(__name__)

_FIELDS = ("image_sha256", "status", "label", "probability_pneumonia", "threshold", "operating_point",
           "reasons", "review_recommended", "review_reasons", "outside_gate", "gate_reasons",
           "sop_instance_uid", "result_sop_instance_uids")


class AuditUnavailable(PneumoscanError):
    """The request's audit records could not be written: no result is given without them."""

    code = "audit_unavailable"
    http_status = 503
    retry_after = 30


def _open(path: Path) -> int:
    # O_APPEND: every write lands at the end, whatever another worker wrote since; read too, to
    # see whether the last line is whole.
    return os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)


def _ends_mid_line(fd: int, size: int) -> bool:
    return size > 0 and os.pread(fd, 1, size - 1) != b"\n"


class AuditLog:
    """Appends records to a JSON-lines file; safe across threads and gunicorn workers."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            os.close(_open(self.path))
        except OSError as exc:
            raise ConfigError(f"cannot open the audit log {self.path}: {exc.strerror}") from None

    @staticmethod
    def lines(*, request_id: str, model: dict[str, str], results: list[dict[str, Any]]) -> bytes:
        """One request's records: one JSON line per image result."""
        now = datetime.now(timezone.utc).isoformat(timespec="milliseconds")
        lines = []
        for result in results:
            entry = {"time": now, "request_id": request_id, "model": model,
                     **{key: result[key] for key in _FIELDS if key in result}}
            if result["status"] == "error":
                entry["error_code"] = result["error"]["code"]
            # json.dumps escapes line breaks inside strings: a record is exactly one line
            lines.append(json.dumps(entry, sort_keys=True) + "\n")
        return "".join(lines).encode()

    def record(self, *, request_id: str, model: dict[str, str], results: list[dict[str, Any]]) -> None:
        """Append one request's records, whole, and on disk before this returns.

        Raises:
            AuditUnavailable: they could not be written (and nothing of them was kept).
        """
        data = self.lines(request_id=request_id, model=model, results=results)
        with self._lock:
            try:
                fd = _open(self.path)
            except OSError as exc:
                self._failed(request_id, exc)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)  # released by close
                self._append(fd, data, request_id)
            finally:
                os.close(fd)

    def _append(self, fd: int, data: bytes, request_id: str) -> None:
        size = os.fstat(fd).st_size
        if _ends_mid_line(fd, size):
            data = b"\n" + data  # a torn line stays alone: the next record starts clean
        try:
            written = os.write(fd, data)
            if written != len(data):
                raise OSError(0, f"only {written} of {len(data)} bytes were written (disk full or file size limit)")
            os.fdatasync(fd)
        except OSError as exc:
            try:
                os.ftruncate(fd, size)  # the request fails, so none of its records may stay
            except OSError:
                pass  # the next writer's line break keeps the torn line apart
            self._failed(request_id, exc)

    @staticmethod
    def _failed(request_id: str, exc: OSError):
        # the request id traces it; errno text only (no path components that could carry names)
        log.error("audit log write failed for request %s: %s", request_id, exc.strerror or exc)
        raise AuditUnavailable("the audit log cannot be written (the server's disk may be full): "
                               "no result is given without its audit record; retry later or tell the administrator") from None
