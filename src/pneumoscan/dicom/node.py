"""``pneumoscan dicom-node``: receive films from a PACS, analyse each with the API's Predictor,
answer in DICOM (SR + heatmap SC) into the same study, and deliver the answers.

Nothing acknowledged is lost: a film is on disk in the spool before its C-STORE succeeds; its
results are in the outbox (synced) before it leaves the spool; a result leaves the outbox only
when the destination confirmed it. A restart finishes both. The log has one line per film with
UIDs and the outcome; no patient identifier reaches a log or a metric.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections import Counter
from pathlib import Path

from pneumoscan.audit import AuditLog, AuditUnavailable
from pneumoscan.dicom.analysis import Analysis, analyse
from pneumoscan.dicom.delivery import Deliverer, Outbox, StoreTarget
from pneumoscan.dicom.receiver import Peer, Spool, handlers, make_ae
from pneumoscan.dicom.results import heatmap_capture, structured_report
from pneumoscan.errors import ConfigError
from pneumoscan.inference import Predictor

log = logging.getLogger(__name__)

#: A film whose audit record could not be written is analysed again after this long.
AUDIT_RETRY_SECONDS = 30.0


def _audit_entry(film: Path, source, analysis: Analysis, results: list) -> dict:
    """The audit record of one film, in the API's field names; UIDs, never patient identifiers."""
    entry = {"image_sha256": film.stem, "status": analysis.status, "reasons": list(analysis.reasons),
             "sop_instance_uid": str(source.SOPInstanceUID),
             "result_sop_instance_uids": [str(d.SOPInstanceUID) for d in results]}
    if analysis.status == "error":
        entry["error"] = {"code": analysis.error or "unreadable"}
    if analysis.result is not None:
        result = analysis.result
        entry.update(label=result.label, probability_pneumonia=round(result.probability, 6),
                     threshold=round(result.threshold, 6), operating_point=result.operating_point,
                     review_recommended=result.review_recommended, review_reasons=list(result.review_reasons))
    return entry


class Node:
    """The receiver, the analyser thread and the deliverer, sharing one spool and outbox."""

    def __init__(self, predictor: Predictor, *, ae_title: str, port: int, peers: list[Peer], spool_dir: Path,
                 store: StoreTarget | None = None, stow_url: str | None = None, host: str = "0.0.0.0",
                 spool_max_bytes: int = 2 << 30, max_associations: int = 8,
                 audit_log: Path | None = None) -> None:
        self.predictor = predictor
        self.audit = AuditLog(audit_log) if audit_log is not None else None
        self.counts: Counter[str] = Counter()
        self._lock = threading.Lock()
        self.spool = Spool(spool_dir / "spool", max_bytes=spool_max_bytes)
        self.outbox = Outbox(spool_dir / "outbox")
        self.deliverer = Deliverer(self.outbox, calling_ae=ae_title, store=store, stow_url=stow_url, count=self.count)
        self.ae = make_ae(ae_title, peers, max_associations=max_associations)
        self.address = (host, port)
        self.peers = peers
        self._films: queue.Queue[Path | None] = queue.Queue()
        self._analyser = threading.Thread(target=self._analyse_forever, name="pneumoscan-analyser", daemon=True)
        self._server = None
        self._metrics = None

    def count(self, name: str, n: int = 1) -> None:
        with self._lock:
            self.counts[name] += n
        if self._metrics is not None:
            self._metrics.labels(name).inc(n)

    def serve_metrics(self, port: int, host: str = "127.0.0.1") -> None:
        """Prometheus counters on ``host:port``/metrics: films received, analysed, refused,
        unreadable, results delivered and retried, associations refused; and what is pending."""
        from prometheus_client import CollectorRegistry, Counter as Counted, Gauge, start_http_server

        registry = CollectorRegistry()
        self._metrics = Counted("pneumoscan_dicom_events", "DICOM node events, by kind.", ["event"], registry=registry)
        pending = Gauge("pneumoscan_dicom_pending", "Films in the spool and results in the outbox.", ["where"],
                        registry=registry)
        pending.labels("spool").set_function(lambda: len(self.spool.films()))
        pending.labels("outbox").set_function(lambda: len(self.outbox.pending()))
        for name, value in self.counts.items():
            self._metrics.labels(name).inc(value)
        start_http_server(port, addr=host, registry=registry)

    def start(self) -> None:
        if discarded := self.spool.discard_partial():
            log.info("%d partly received data set(s) discarded (never acknowledged)", discarded)
        for film in self.spool.films():  # left by a crash: acknowledged, so they must be finished
            self._films.put(film)
        self._analyser.start()
        self.deliverer.start()
        try:
            self._server = self.ae.start_server(self.address, block=False, evt_handlers=handlers(
                self.spool, self.peers, lambda path, title: self._films.put(path), self.count))
        except OSError as exc:
            self.close()
            raise ConfigError(f"cannot listen on {self.address[0]}:{self.address[1]}: {exc.strerror}") from None
        log.info("DICOM node %s listening on %s:%d; %d film(s) in the spool, %d result(s) in the outbox",
                 self.ae.ae_title, *self._server.server_address[:2], len(self.spool.films()), len(self.outbox.pending()))

    @property
    def port(self) -> int:
        return self._server.server_address[1]

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
        self._films.put(None)
        self._analyser.join(timeout=60)
        self.deliverer.close()

    def pending(self) -> dict[str, int]:
        return {"spool": len(self.spool.films()), "outbox": len(self.outbox.pending())}

    def _model_block(self) -> dict[str, str]:
        spec = self.predictor.spec
        return {"name": spec.name, "weights_sha256": spec.weights_sha256}

    def _analyse_forever(self) -> None:
        while (film := self._films.get()) is not None:
            try:
                self._analyse(film)
            except Exception:  # one film must never stop the node; it stays in the spool for a restart
                log.exception("film %s could not be analysed; it stays in the spool", film.name)
                self.count("failed")

    def _analyse(self, film: Path) -> None:
        source, analysis = analyse(self.predictor, film.read_bytes())  # its header, read once
        if source is None or "SOPInstanceUID" not in source:
            log.warning("film %s is not a readable DICOM data set; dropped", film.name)
            self.count("unreadable")
            film.unlink(missing_ok=True)
            return
        spec = self.predictor.spec
        results = [structured_report(source, analysis, model_name=spec.name, digest=self.predictor.digest)]
        capture = heatmap_capture(source, analysis, digest=self.predictor.digest)
        if capture is not None:
            results.append(capture)
        if self.audit is not None:
            try:
                self.audit.record(request_id=f"dicom-{source.SOPInstanceUID}", model=self._model_block(),
                                  results=[_audit_entry(film, source, analysis, results)])
            except AuditUnavailable:
                # As in the API: no answer leaves without its record. The film stays in the spool
                # (acknowledged, so it must be finished) and is tried again later.
                self.count("audit_failures")
                threading.Timer(AUDIT_RETRY_SECONDS, self._films.put, args=(film,)).start()
                return
        for dataset in results:
            self.outbox.put(dataset)
        film.unlink(missing_ok=True)  # its results are on disk: the film has done its job
        self.count({"ok": "analysed", "rejected": "refused"}.get(analysis.status, "unreadable"))
        log.info("film %s: %s -> %s", source.SOPInstanceUID, analysis.describe(),
                 ", ".join(f"{d.Modality} {d.SOPInstanceUID}" for d in results))
        self.deliverer.wake.set()
