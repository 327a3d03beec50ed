"""A real Orthanc (Debian's ``orthanc``) on free loopback ports with its own storage and a
temporary configuration: no systemd, nothing left behind. Used by bench/dicom_node.py and by
tests/test_dicom_node.py, so the PACS the bench measures is the one the tests check against.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

DICOMWEB_PLUGIN = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class Orthanc:
    """Orthanc on free loopback ports with its own storage; knows the node as modality PNEUMOSCAN."""

    def __init__(self, root: Path, node_port: int, *, lua: Path | None = None,
                 ports: tuple[int, int] | None = None, dicomweb: bool = False) -> None:
        self.http, self.dicom = ports or (free_port(), free_port())
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        config = {
            "Name": "pneumoscan-test", "HttpPort": self.http, "DicomPort": self.dicom, "DicomAet": "ORTHANC",
            "StorageDirectory": str(root / "storage"), "IndexDirectory": str(root / "index"),
            "RemoteAccessAllowed": False, "AuthenticationEnabled": False, "HttpServerEnabled": True,
            "DicomModalities": {"pneumoscan": ["PNEUMOSCAN", "127.0.0.1", node_port]},
            "DicomCheckCalledAet": False, "Plugins": [], "StableAge": 1,
            "LuaScripts": [str(lua)] if lua else [],
        }
        if dicomweb:
            config["Plugins"] = [DICOMWEB_PLUGIN]
            config["DicomWeb"] = {"Enable": True, "Root": "/dicom-web/"}
        (root / "orthanc.json").write_text(json.dumps(config))
        # dcmtk, inside Orthanc, leaves Nagle's algorithm on unless TCP_NODELAY=1 is in its
        # environment: each C-STORE it answers or sends then waits ~40 ms for a delayed ACK.
        self.log = root / "orthanc.log"  # what Orthanc said, to read when something is missing
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(["Orthanc", str(root / "orthanc.json")], stdout=log,
                                            stderr=subprocess.STDOUT, start_new_session=True,
                                            env={**os.environ, "TCP_NODELAY": "1"})
        deadline = time.monotonic() + 30
        while True:
            try:
                self.get("/system")
                return
            except OSError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("Orthanc did not start") from None
                time.sleep(0.2)

    def get(self, path: str):
        with urllib.request.urlopen(f"http://127.0.0.1:{self.http}{path}", timeout=10) as r:
            return json.loads(r.read())

    def post(self, path: str, data: bytes):
        request = urllib.request.Request(f"http://127.0.0.1:{self.http}{path}", data=data, method="POST")
        with urllib.request.urlopen(request, timeout=30) as r:
            return json.loads(r.read())

    def get_bytes(self, path: str) -> bytes:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.http}{path}", timeout=10) as r:
            return r.read()

    def has_instance(self, sop_instance_uid: str) -> bool:
        """Whether an instance with this SOP Instance UID is stored (REST /tools/lookup)."""
        return any(match.get("Type") == "Instance" for match in self.post("/tools/lookup", sop_instance_uid.encode()))

    def stop(self) -> None:
        os.killpg(self.process.pid, signal.SIGTERM)
        self.process.wait(timeout=30)
