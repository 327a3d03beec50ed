"""The node's Storage SCP (pynetdicom): which peers and films it accepts, and the spool that
holds every acknowledged film on disk before the success status goes back.

Accepted: CR Image Storage and Digital X-Ray Image Storage (For Presentation, For Processing), in
the transfer syntaxes the decoder handles, and Verification (C-ECHO). Any other SOP class a PACS
forwards with a study (CT, MR, SR, presentation states) is refused at association negotiation
(its presentation context is not accepted), so the sender never records it as analysed.
Calling peers must be on the allow-list (``AET@HOST``); others get an A-ASSOCIATE-RJ.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import socket
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from pydicom.uid import (DeflatedExplicitVRLittleEndian, ExplicitVRBigEndian, ExplicitVRLittleEndian,
                         ImplicitVRLittleEndian, JPEG2000, JPEG2000Lossless, JPEGBaseline8Bit,
                         JPEGExtended12Bit, JPEGLosslessSV1, JPEGLossless, JPEGLSLossless, JPEGLSNearLossless,
                         RLELossless)
from pynetdicom import AE, _config, evt
from pynetdicom.pdu import P_DATA_TF
from pynetdicom.sop_class import (ComputedRadiographyImageStorage, DigitalXRayImageStorageForPresentation,
                                  DigitalXRayImageStorageForProcessing, Verification)

from pneumoscan.imaging import MAX_FILE_BYTES

log = logging.getLogger(__name__)

FILM_CLASSES = (ComputedRadiographyImageStorage, DigitalXRayImageStorageForPresentation,
                DigitalXRayImageStorageForProcessing)
TRANSFER_SYNTAXES = [ExplicitVRLittleEndian, ImplicitVRLittleEndian, ExplicitVRBigEndian,
                     DeflatedExplicitVRLittleEndian, JPEGBaseline8Bit, JPEGExtended12Bit, JPEGLossless,
                     JPEGLosslessSV1, JPEGLSLossless, JPEGLSNearLossless, JPEG2000Lossless, JPEG2000, RLELossless]
#: DIMSE statuses (PS3.4 C.4.2.3 / Annex B).
SUCCESS, OUT_OF_RESOURCES, CANNOT_UNDERSTAND = 0x0000, 0xA700, 0xC000


@dataclass(frozen=True)
class Peer:
    """An allowed calling AE: title and host (``*`` for any host)."""

    ae_title: str
    host: str

    @classmethod
    def parse(cls, text: str) -> "Peer":
        title, _, host = text.partition("@")
        if not title or not host or len(title) > 16:
            from pneumoscan.errors import ConfigError

            raise ConfigError(f"--allow takes AET@HOST (an AE title of at most 16 characters), got {text!r}")
        return cls(title, host)

    def admits(self, title: str, host: str) -> bool:
        return self.ae_title == title and self.host in ("*", host)


class Spool:
    """Acknowledged films on disk (mode 0700), each written whole and synced before the success."""

    def __init__(self, directory: Path, *, max_bytes: int) -> None:
        self.directory = directory
        self.incoming = directory / "incoming"
        self.max_bytes = max_bytes
        for folder in (directory, self.incoming):
            folder.mkdir(parents=True, exist_ok=True)
            folder.chmod(0o700)

    def discard_partial(self) -> int:
        """Remove what ``incoming/`` holds: data sets that were never acknowledged (a crash or an
        abort in the middle of one). Called at start, before any association."""
        removed = 0
        for leftover in self.incoming.iterdir():
            leftover.unlink(missing_ok=True)
            removed += 1
        return removed

    def films(self) -> list[Path]:
        """Spooled films not yet analysed, oldest first."""
        return sorted(self.directory.glob("*.dcm"), key=lambda p: p.stat().st_mtime)

    def used_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.directory.rglob("*") if p.is_file())

    def has_room(self, size: int) -> bool:
        return (self.used_bytes() + size <= self.max_bytes
                and shutil.disk_usage(self.directory).free > size + 64 * 1024 * 1024)

    def store(self, received: Path) -> Path:
        """Move a received Part 10 file (pynetdicom wrote it into ``incoming/``) into the spool,
        synced, under its content's sha256."""
        digest = hashlib.sha256()
        with open(received, "rb+") as handle:
            while chunk := handle.read(1 << 20):
                digest.update(chunk)
            os.fsync(handle.fileno())
        target = self.directory / f"{digest.hexdigest()}.dcm"
        os.replace(received, target)
        directory = os.open(self.directory, os.O_RDONLY)
        try:
            os.fsync(directory)  # the rename survives a power cut before the status goes back
        finally:
            os.close(directory)
        return target


def make_ae(ae_title: str, peers: list[Peer], *, max_associations: int = 8, timeout: float = 30.0) -> AE:
    """The acceptor with its contexts, allow-list and bounds (associations, timeouts, PDU size)."""
    ae = AE(ae_title=ae_title)
    for sop_class in FILM_CLASSES:
        ae.add_supported_context(sop_class, TRANSFER_SYNTAXES)
    ae.add_supported_context(Verification)
    ae.require_calling_aet = sorted({peer.ae_title for peer in peers})
    ae.maximum_associations = max_associations
    ae.acse_timeout = ae.dimse_timeout = timeout
    ae.network_timeout = 2 * timeout
    ae.maximum_pdu_size = 64 * 1024
    return ae


def send_without_delay(assoc) -> None:
    """Turn Nagle's algorithm off on an association's socket. A DIMSE message goes out as a small
    command PDU followed by data PDUs; with Nagle on, the data waits for the peer's delayed ACK of
    the command (40 ms on Linux) on every C-STORE. pynetdicom leaves the option unset."""
    raw = getattr(getattr(getattr(assoc, "dul", None), "socket", None), "socket", None)
    if raw is not None:
        try:
            raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:  # the peer is already gone; the association will say so
            pass


def handlers(spool: Spool, peers: list[Peer], on_film: Callable[[Path, str], None],
             count: Callable[[str], None]) -> list:
    """pynetdicom event handlers: the host check, the size of each data set while it arrives,
    C-ECHO, C-STORE into the spool, and what an aborted association leaves behind."""
    # Received data sets are written to a file as they arrive (memory stays bounded), in the
    # spool's own folder so that moving them in is a rename and nothing leaves the 0700 tree.
    _config.STORE_RECV_CHUNKED_DATASET = True
    tempfile.tempdir = str(spool.incoming)

    def on_requested(event) -> None:
        title = str(event.assoc.requestor.primitive.calling_ae_title).strip()  # not yet copied to ae_title
        host = event.assoc.requestor.address
        if not any(peer.admits(title, host) for peer in peers):
            log.warning("association from %s@%s refused: not on the allow-list", title, host)
            count("refused_associations")
            event.assoc.acse.send_reject(0x01, 0x01, 0x03)  # permanent, service user, calling AE not recognised
            event.assoc.is_rejected = True
            event.assoc.kill()

    arriving: dict[int, int] = {}  # bytes of the data set now arriving, per association

    def on_pdu(event) -> None:
        # pynetdicom writes a data set to disk as it arrives and calls on_store only at its end:
        # without this, one association could fill the disk with a single endless data set.
        if not isinstance(event.pdu, P_DATA_TF):
            return
        key = id(event.assoc)
        for item in event.pdu.presentation_data_value_items:
            value = item.presentation_data_value or b"\x00"
            if value[0] & 0x01:  # bit 0 set: a command fragment (PS3.8 E.2), not the data set
                continue
            size = arriving.get(key, 0) + len(value) - 1
            arriving[key] = 0 if value[0] & 0x02 else size  # 0x02: the data set's last fragment
            if size > MAX_FILE_BYTES:
                title = event.assoc.requestor.ae_title.strip()
                log.warning("association from %s aborted: a data set past %d MB, the limit", title,
                            MAX_FILE_BYTES // 1_000_000)
                count("refused_too_large")
                arriving.pop(key, None)
                event.assoc.abort()  # non-blocking inside a handler; nothing of it is acknowledged
                return

    def on_closed(event) -> None:
        arriving.pop(id(event.assoc), None)
        partial = getattr(getattr(event.assoc.dimse, "message", None), "_data_set_path", None)
        if partial is not None:  # a data set cut off by an abort or a dropped connection
            Path(partial).unlink(missing_ok=True)

    def on_open(event) -> None:
        send_without_delay(event.assoc)

    def on_echo(event) -> int:
        return SUCCESS

    def on_store(event) -> int | tuple:
        path = Path(event.dataset_path)
        title = event.assoc.requestor.ae_title.strip()
        count("received")
        try:
            size = path.stat().st_size
            if size > MAX_FILE_BYTES:
                log.warning("film from %s refused: %d MB, the limit is %d MB", title, size // 1_000_000,
                            MAX_FILE_BYTES // 1_000_000)
                count("refused_too_large")
                return CANNOT_UNDERSTAND
            if not spool.has_room(size):
                log.warning("film from %s not accepted: the spool is full (out of resources; the sender keeps it)", title)
                count("refused_spool_full")
                return OUT_OF_RESOURCES
            stored = spool.store(path)
        except OSError as exc:
            log.error("film from %s not accepted: the spool could not be written (%s)", title, exc.strerror)
            count("refused_spool_full")
            return OUT_OF_RESOURCES
        finally:
            path.unlink(missing_ok=True)
        on_film(stored, title)
        return SUCCESS

    return [(evt.EVT_CONN_OPEN, on_open), (evt.EVT_REQUESTED, on_requested), (evt.EVT_PDU_RECV, on_pdu), (evt.EVT_C_ECHO, on_echo),
            (evt.EVT_C_STORE, on_store), (evt.EVT_ABORTED, on_closed), (evt.EVT_CONN_CLOSE, on_closed)]
