"""Results wait in an outbox on disk until their destination confirms them: C-STORE to an AE
(pynetdicom's SCU) and/or STOW-RS to a DICOMweb server (dicomweb-client).

Files are named by their SOP Instance UID, which :mod:`pneumoscan.dicom.results` derives from the
source film and the bundle: after a crash, a restart or a retry the same object is sent again
with the same UID, and the destination keeps one copy. A file leaves the outbox only when every
destination has confirmed it; while one is down, sending is retried with doubling waits (up to a
minute).
"""

from __future__ import annotations

import logging
import os
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from pydicom import Dataset, dcmread

from pneumoscan.dicom.receiver import send_without_delay
from pneumoscan.errors import ConfigError

log = logging.getLogger(__name__)
MAX_BACKOFF = 60.0


@dataclass(frozen=True)
class StoreTarget:
    """A C-STORE destination, ``AET@HOST:PORT``."""

    ae_title: str
    host: str
    port: int

    @classmethod
    def parse(cls, text: str) -> "StoreTarget":
        title, _, address = text.partition("@")
        host, _, port = address.rpartition(":")
        if not title or not host or not port.isdigit() or not 0 < int(port) < 65536 or len(title) > 16:
            raise ConfigError(f"--send takes AET@HOST:PORT, got {text!r}")
        return cls(title, host, int(port))


class Outbox:
    """Result objects on disk (mode 0700), written whole before the film leaves the spool."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        directory.chmod(0o700)

    def put(self, dataset: Dataset) -> Path:
        target = self.directory / f"{dataset.SOPInstanceUID}.dcm"
        fd, partial = tempfile.mkstemp(dir=self.directory, suffix=".partial")
        try:
            with os.fdopen(fd, "wb") as out:
                dataset.save_as(out, enforce_file_format=True)
                out.flush()
                os.fsync(out.fileno())
            os.replace(partial, target)
        finally:
            Path(partial).unlink(missing_ok=True)
        return target

    def pending(self) -> list[Path]:
        return sorted(self.directory.glob("*.dcm"), key=lambda p: p.stat().st_mtime)


class Deliverer:
    """Sends the outbox to every destination in a thread, retrying with backoff."""

    def __init__(self, outbox: Outbox, *, calling_ae: str, store: StoreTarget | None = None,
                 stow_url: str | None = None, count: Callable[[str, int], None] = lambda name, n=1: None) -> None:
        if store is None and stow_url is None:
            raise ConfigError("the node needs a destination for its results: --send AET@HOST:PORT and/or --stow URL")
        if stow_url is not None:
            parts = urlsplit(stow_url)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise ConfigError(f"--stow takes the http(s) URL of a DICOMweb service, got {stow_url!r}")
        self.outbox, self.calling_ae, self.store, self.stow_url, self.count = outbox, calling_ae, store, stow_url, count
        self.wake = threading.Event()
        self.stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="pneumoscan-delivery", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        self.stop.set()
        self.wake.set()
        self._thread.join(timeout=30)

    def _run(self) -> None:
        backoff = 1.0
        while not self.stop.is_set():
            pending = self.outbox.pending()
            if not pending:
                self.wake.wait(timeout=5)
                self.wake.clear()
                continue
            try:
                self._send(pending)
                backoff = 1.0
            except Exception as exc:  # a destination down, refusing, timing out: keep the files, retry
                log.warning("delivery of %d result(s) failed (%s); retrying in %.0f s", len(pending), exc, backoff)
                self.count("retried", len(pending))
                self.wake.wait(timeout=backoff)
                self.wake.clear()
                backoff = min(MAX_BACKOFF, backoff * 2)

    def _send(self, files: list[Path]) -> None:
        datasets = [dcmread(path) for path in files]
        if self.store is not None:
            self._c_store(datasets)
        if self.stow_url is not None:
            from dicomweb_client.api import DICOMwebClient

            DICOMwebClient(url=self.stow_url).store_instances(datasets=datasets)
        for path, dataset in zip(files, datasets):
            path.unlink(missing_ok=True)
            log.info("delivered %s %s", dataset.Modality, dataset.SOPInstanceUID)
        self.count("delivered", len(files))

    def _c_store(self, datasets: list[Dataset]) -> None:
        from pynetdicom import AE

        ae = AE(ae_title=self.calling_ae)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
        for dataset in datasets:
            ae.add_requested_context(dataset.SOPClassUID, dataset.file_meta.TransferSyntaxUID)
        assoc = ae.associate(self.store.host, self.store.port, ae_title=self.store.ae_title)
        if not assoc.is_established:
            raise ConnectionError(f"{self.store.ae_title}@{self.store.host}:{self.store.port} did not accept an association")
        send_without_delay(assoc)
        try:
            for dataset in datasets:
                status = assoc.send_c_store(dataset)
                code = getattr(status, "Status", None)
                if code is None or code not in (0x0000, 0xB000, 0xB007, 0xB006):
                    raise ConnectionError(f"C-STORE of {dataset.SOPInstanceUID} answered "
                                          f"{'no status' if code is None else hex(code)}")
        finally:
            assoc.release()
