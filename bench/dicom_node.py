"""The DICOM node beside the HTTP API, on the same films in the same run.

    python bench/dicom_node.py [--data ../shared/data/chest_xray] [--films 100] [--model BUNDLE]

Needs Debian's ``orthanc`` (the PACS) and ``dcmtk`` (storescu). Makes ``--films`` DX films (the
real test X-rays with ``--data``, else synthetic chest-shaped films), then one film at a time:

- **node**: from the start of ``storescu`` (a new process and association per film, as a
  modality sends) to the film's Structured Report being stored in Orthanc (polled through
  Orthanc's REST API by its SOP Instance UID, which the node derives from the film's);
- **API**: the same DICOM file posted to ``pneumoscan serve``'s /api/v1/predict with
  ``explain=1`` (the node makes a heatmap too), from the request to the response.

storescu and Orthanc run with TCP_NODELAY=1 (dcmtk leaves Nagle's algorithm on without it, and
each C-STORE then waits ~40 ms for a delayed ACK); a second node row shows storescu without it.

Then the same films in one association (``storescu`` with all of them) until the last SR is in
Orthanc: films per second for a modality that sends a batch. Prints a table and the node / API
ratio of the medians (the target: at most 1.20).
"""

from __future__ import annotations

import argparse
import http.client
import io
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from load import ServedApp, _images  # noqa: E402
from orthanc import Orthanc, free_port  # noqa: E402

POLL_SECONDS = 0.005


def dx_films(images: list[tuple[str, bytes]], count: int, folder: Path) -> list[Path]:
    """``count`` uncompressed DX films (8-bit, AP chest, a 3-year-old) made from ``images``."""
    from PIL import Image
    from pydicom import Dataset
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import DigitalXRayImageStorageForPresentation, ExplicitVRLittleEndian, generate_uid

    folder.mkdir(parents=True, exist_ok=True)
    films = []
    for i in range(count):
        name, data = images[i % len(images)]
        pixels = np.asarray(Image.open(io.BytesIO(data)).convert("L"))
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = DigitalXRayImageStorageForPresentation
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
        ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = f"Bench^{i}", f"{folder.name}-{i}", "20200101", "O"
        ds.PatientAge, ds.AccessionNumber, ds.StudyID, ds.ReferringPhysicianName = "003Y", "", "1", ""
        ds.StudyDate, ds.StudyTime, ds.Modality, ds.SeriesNumber, ds.InstanceNumber = "20230101", "120000", "DX", 1, 1
        ds.ViewPosition, ds.BodyPartExamined, ds.PresentationIntentType = "AP", "CHEST", "FOR PRESENTATION"
        ds.ImageType = ["ORIGINAL", "PRIMARY"]
        ds.Rows, ds.Columns = pixels.shape
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
        ds.PixelData = np.ascontiguousarray(pixels).tobytes()
        path = folder / f"{i:04d}-{Path(name).stem}.dcm"
        ds.save_as(path, enforce_file_format=True)
        films.append(path)
    return films


class RunningNode:
    """``pneumoscan dicom-node`` on a free loopback port, sending to ``pacs`` (a context manager)."""

    def __init__(self, pacs: Orthanc, spool: Path, model: Path | None) -> None:
        self.port = free_port()
        self.command = [sys.executable, "-m", "pneumoscan", "dicom-node", "--port", str(self.port),
                        "--host", "127.0.0.1", "--allow", "STORESCU@127.0.0.1", "--spool", str(spool),
                        "--send", f"ORTHANC@127.0.0.1:{pacs.dicom}", *(["--model", str(model)] if model else [])]
        self.process: subprocess.Popen | None = None
        # a file, not a pipe: a pipe nobody reads fills after ~100 films and the node blocks on its log
        self.log_path = spool.parent / "node.log"

    def __enter__(self) -> "RunningNode":
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(self.command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 120
        while True:
            with socket.socket() as probe:
                if probe.connect_ex(("127.0.0.1", self.port)) == 0:
                    return self
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the node did not start:\n" + self.log_path.read_text()[-3000:])
            time.sleep(0.2)

    def __exit__(self, *exc) -> None:
        os.killpg(self.process.pid, signal.SIGTERM)
        self.process.wait(timeout=60)
        if exc[0] is not None:
            print("the node's log ends:\n" + "\n".join(self.log_path.read_text().splitlines()[-30:]), file=sys.stderr)


def storescu(port: int, *paths: Path, nagle: bool = False) -> None:
    """storescu; dcmtk turns Nagle's algorithm off only with TCP_NODELAY=1 in its environment."""
    done = subprocess.run(["storescu", "-aet", "STORESCU", "-aec", "PNEUMOSCAN", "127.0.0.1", str(port),
                           *map(str, paths)], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "TCP_NODELAY": "0" if nagle else "1"})
    if done.returncode != 0:
        raise RuntimeError(f"storescu failed: {done.stderr[-2000:]}")


def wait_for(pacs: Orthanc, uid: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not pacs.has_instance(uid):
        if time.monotonic() > deadline:
            raise RuntimeError(f"the SR {uid} did not reach Orthanc in {timeout:.0f} s")
        time.sleep(POLL_SECONDS)


def node_seconds(node: RunningNode, pacs: Orthanc, films: list[Path], sr_uid, nagle: bool = False) -> list[float]:
    seconds = []
    for path in films:
        started = time.perf_counter()
        storescu(node.port, path, nagle=nagle)
        wait_for(pacs, sr_uid(path))
        seconds.append(time.perf_counter() - started)
    return seconds


def api_seconds(port: int, films: list[Path]) -> list[float]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    seconds = []
    for path in films:
        boundary = uuid.uuid4().hex
        body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"{path.name}\"\r\n"
                "Content-Type: application/dicom\r\n\r\n").encode() + path.read_bytes() + f"\r\n--{boundary}--\r\n".encode()
        started = time.perf_counter()
        connection.request("POST", "/api/v1/predict?explain=1", body=body,
                           headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
        response = connection.getresponse()
        answer = response.read()
        seconds.append(time.perf_counter() - started)
        if response.status != 200 or b'"status":"error"' in answer:
            raise RuntimeError(f"the API did not analyse {path.name}: HTTP {response.status} {answer[:300]!r}")
    connection.close()
    return seconds


def _row(name: str, seconds: list[float]) -> str:
    ordered = sorted(seconds)
    p95 = ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))]
    return (f"{name:<34} {len(seconds):>5} {len(seconds) / sum(seconds):>8.2f} {statistics.median(seconds) * 1000:>8.1f} "
            f"{p95 * 1000:>8.1f}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, help="Kaggle-layout root: real test X-rays (default: synthetic films)")
    parser.add_argument("--films", type=int, default=100)
    parser.add_argument("--model", type=Path, help="bundle (default: the bundled model)")
    args = parser.parse_args(argv)
    missing = [package for tool, package in (("Orthanc", "orthanc"), ("storescu", "dcmtk")) if not shutil.which(tool)]
    if missing:
        print(f"needs {' '.join(missing)}: apt-get install -y {' '.join(missing)} (Orthanc is in /usr/sbin)")
        return 2

    from pneumoscan.dicom.results import result_uids
    from pneumoscan.integrity import bundle_digest, default_bundle_path
    from pydicom import dcmread

    digest = bundle_digest(args.model or default_bundle_path())

    def sr_uid(path: Path) -> str:
        return result_uids(dcmread(path, stop_before_pixels=True).SOPInstanceUID, digest)["sr"]

    with tempfile.TemporaryDirectory(prefix="pneumoscan-bench-") as scratch:
        root = Path(scratch)
        images = _images(args.data, count=min(args.films, 624))
        films = dx_films(images, args.films, root / "films")
        batch = dx_films(images, args.films, root / "batch")
        nagle_films = dx_films(images, args.films, root / "nagle")
        warm = dx_films(images, 2, root / "warm")
        print(f"{len(films)} DX films of {'real test X-rays' if args.data else 'synthetic chest-shaped images'}, "
              f"{dcmread(films[0]).Rows}x{dcmread(films[0]).Columns}; one at a time unless said")
        node_port = free_port()
        pacs = Orthanc(root / "orthanc", node_port)
        try:
            with RunningNode(pacs, root / "node", args.model) as node:
                for path in warm:  # loads the session and the heatmap graph before the clock starts
                    storescu(node.port, path)
                    wait_for(pacs, sr_uid(path))
                node_times = node_seconds(node, pacs, films, sr_uid)
                nagle_times = node_seconds(node, pacs, nagle_films, sr_uid, nagle=True)
                started = time.perf_counter()
                storescu(node.port, *batch)
                for path in batch:
                    wait_for(pacs, sr_uid(path))
                batch_seconds = time.perf_counter() - started
            # one worker: the node analyses one film at a time too
            with ServedApp(model=args.model, workers=1) as server:
                api_seconds(server.port, warm)
                api_times = api_seconds(server.port, films)
        finally:
            pacs.stop()
    header = f"{'path':<34} {'films':>5} {'films/s':>8} {'p50 ms':>8} {'p95 ms':>8}"
    print(header)
    print("-" * len(header))
    print(_row("node: storescu -> SR in Orthanc", node_times))
    print(_row("  the same, storescu with Nagle on", nagle_times))
    print(_row("API: POST predict?explain=1", api_times))
    print(f"{'node: one association, all films':<34} {len(batch):>5} {len(batch) / batch_seconds:>8.2f}")
    ratio = statistics.median(node_times) / statistics.median(api_times)
    print(f"node / API, median seconds per film: {ratio:.2f} (target <= 1.20)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
