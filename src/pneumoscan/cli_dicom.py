"""``pneumoscan dicom-node``: the DICOM node on the hospital network (registers on
:data:`pneumoscan.cli.app`; pynetdicom and highdicom are imported when it runs)."""

from __future__ import annotations

import logging
import signal
import threading
from pathlib import Path
from typing import Annotated, Optional

import typer

from pneumoscan.cli import BackendOption, ModelOption, _echo, _fail, app


@app.command("dicom-node")
def dicom_node(
    allow: Annotated[list[str], typer.Option(
        "--allow", help="A calling peer allowed to send films, AET@HOST (HOST '*' for any); repeat for more.")],
    spool: Annotated[Path, typer.Option(help="Folder for the spool and the outbox (created with mode 0700).")],
    send: Annotated[Optional[str], typer.Option(help="C-STORE results to AET@HOST:PORT (e.g. the PACS).")] = None,
    stow: Annotated[Optional[str], typer.Option(help="STOW-RS results to this DICOMweb URL.")] = None,
    model: ModelOption = None,
    port: Annotated[int, typer.Option(min=1, max=65535, help="Port to listen on.")] = 11112,
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "0.0.0.0",
    ae_title: Annotated[str, typer.Option("--ae-title", help="This node's AE title.")] = "PNEUMOSCAN",
    spool_max_mb: Annotated[int, typer.Option(min=16, help="Largest spool; beyond it C-STORE answers out-of-resources.")] = 2048,
    max_associations: Annotated[int, typer.Option(min=1, help="Associations served at once.")] = 8,
    metrics_port: Annotated[Optional[int], typer.Option(
        min=1, max=65535, help="Serve Prometheus counters on 127.0.0.1:PORT/metrics (off by default).")] = None,
    audit_log: Annotated[Optional[Path], typer.Option(
        "--audit-log", help="Append one JSON line per film (UIDs and the outcome, no patient identifiers).")] = None,
    backend: BackendOption = "auto",
) -> None:
    """Receive CR/DX films (C-STORE), analyse each as the API does, and store a Structured Report
    and a heatmap Secondary Capture into the same study at --send and/or --stow."""
    from pneumoscan.dicom.delivery import StoreTarget
    from pneumoscan.dicom.node import Node
    from pneumoscan.dicom.receiver import Peer
    from pneumoscan.inference import Predictor

    if len(ae_title) > 16 or not ae_title.strip():
        _fail(f"--ae-title must be 1-16 characters, got {ae_title!r}")
    peers = [Peer.parse(text) for text in allow]
    target = StoreTarget.parse(send) if send else None
    for noisy in ("pynetdicom",):  # its per-PDU lines would drown the one line per film
        logging.getLogger(noisy).setLevel(logging.WARNING)
    node = Node(Predictor.from_bundle(model, backend=backend), ae_title=ae_title, port=port, host=host,
                peers=peers, spool_dir=spool, store=target, stow_url=stow,
                spool_max_bytes=spool_max_mb << 20, max_associations=max_associations,
                audit_log=audit_log)
    node.start()
    if metrics_port is not None:
        node.serve_metrics(metrics_port)
    _echo(f"DICOM node {ae_title} listening on {host}:{node.port}; results to "
          f"{' and '.join(filter(None, [send, stow]))}; Ctrl+C stops it (the spool and outbox are kept)")
    stopped = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stopped.set())
    stopped.wait()
    node.close()
    _echo(f"stopped; {node.pending()['spool']} film(s) in the spool and {node.pending()['outbox']} result(s) "
          "in the outbox will be finished at the next start")
