"""The DICOM node against a real PACS: Debian's Orthanc on loopback (a temporary configuration
and storage folder), dcmtk's storescu and echoscu as the modality, dicom3tools' dciodvfy as the
validator. Without them the tests skip with the package to install; CI installs all three."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from conftest import make_xray
from hostile_inputs import _bench_bombs, _bench_module

_orthanc = _bench_module("orthanc")
Orthanc, _free_port, DICOMWEB_PLUGIN = _orthanc.Orthanc, _orthanc.free_port, _orthanc.DICOMWEB_PLUGIN

TOOLS = {"Orthanc": "orthanc", "storescu": "dcmtk", "echoscu": "dcmtk", "dciodvfy": "dicom3tools"}


def _need(*tools: str) -> None:
    missing = sorted({TOOLS[t] for t in tools if shutil.which(t) is None})
    if missing:
        pytest.skip(f"needs {' '.join(missing)} (apt-get install -y {' '.join(missing)})")


def film(path: Path, *, seed: int = 3, age: str = "003Y", view: str = "AP", sop_class: str = "1.2.840.10008.5.1.4.1.1.1.1",
         modality: str = "DX", study: str | None = None) -> Path:
    """A DX (or other) Part 10 file of a synthetic chest film, with patient identifiers to keep private."""
    from pydicom import Dataset
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study or generate_uid(), generate_uid()
    ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = "Doe^Jane", "PID-98765", "20200101", "F"
    ds.PatientAge, ds.AccessionNumber, ds.StudyID, ds.ReferringPhysicianName = age, "ACC-4242", "1", ""
    ds.StudyDate, ds.StudyTime = "20230101", "120000"
    ds.Modality, ds.SeriesNumber, ds.InstanceNumber = modality, 1, 1
    ds.ViewPosition, ds.BodyPartExamined, ds.PresentationIntentType = view, "CHEST", "FOR PRESENTATION"
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    pixels = np.asarray(make_xray(seed, size=(160, 144)))
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = pixels.tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


@pytest.fixture()
def node_port() -> int:
    return _free_port()


@pytest.fixture()
def orthanc(tmp_path: Path, node_port: int):
    _need("Orthanc")
    pacs = Orthanc(tmp_path / "orthanc", node_port)
    yield pacs
    pacs.stop()


def start_node(bundle: Path, spool: Path, port: int, pacs: Orthanc, *extra: str, stow: bool = False) -> subprocess.Popen:
    destination = (["--stow", f"http://127.0.0.1:{pacs.http}/dicom-web"] if stow
                   else ["--send", f"ORTHANC@127.0.0.1:{pacs.dicom}"])
    node = subprocess.Popen(
        [sys.executable, "-m", "pneumoscan", "dicom-node", "--model", str(bundle), "--port", str(port),
         "--host", "127.0.0.1", "--allow", "STORESCU@127.0.0.1", "--allow", "ORTHANC@127.0.0.1",
         *destination, "--spool", str(spool), *extra],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    deadline = time.monotonic() + 60
    while True:
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                return node
        assert node.poll() is None and time.monotonic() < deadline, node.stdout.read()[-3000:]
        time.sleep(0.2)


def stop_node(node: subprocess.Popen) -> str:
    os.killpg(node.pid, signal.SIGTERM)
    return node.communicate(timeout=60)[0]


def _study_instances(pacs: Orthanc, study_uid: str, want: int, timeout: float = 60) -> list[dict]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = [i for i in (pacs.get(f"/instances/{i}/simplified-tags") | {"id": i} for i in pacs.get("/instances"))
                 if i.get("StudyInstanceUID") == study_uid]
        if len(found) >= want:
            return found
        time.sleep(0.5)
    raise AssertionError(f"only {len(found)} of {want} instances of the study reached Orthanc")


def _content_items(dataset):
    for item in dataset.get("ContentSequence", []):
        yield item
        yield from _content_items(item)


def test_storescu_to_the_node_then_sr_and_heatmap_in_orthanc(exported_bundle: Path, tmp_path: Path,
                                                            orthanc: Orthanc, node_port: int) -> None:
    """A DX film sent by storescu comes back into Orthanc's study as a valid SR and SC; the SR's
    probability is predict's on the same pixels; no identifier reaches the node's log."""
    _need("storescu", "echoscu", "dciodvfy")
    from pydicom import dcmread

    from pneumoscan.imaging import decode_image
    from pneumoscan.inference import Predictor

    source = film(tmp_path / "film.dcm")
    study = dcmread(source).StudyInstanceUID
    metrics_port = _free_port()
    audit = tmp_path / "audit.jsonl"
    node = start_node(exported_bundle, tmp_path / "node", node_port, orthanc, "--metrics-port", str(metrics_port),
                      "--audit-log", str(audit))
    try:
        echo = subprocess.run(["echoscu", "-aet", "STORESCU", "-aec", "PNEUMOSCAN", "127.0.0.1", str(node_port)],
                              capture_output=True, text=True, timeout=30)
        assert echo.returncode == 0, echo.stderr
        sent = subprocess.run(["storescu", "-aet", "STORESCU", "-aec", "PNEUMOSCAN", "127.0.0.1", str(node_port),
                               str(source)], capture_output=True, text=True, timeout=60)
        assert sent.returncode == 0, sent.stderr
        results = _study_instances(orthanc, study, want=2)
        time.sleep(1)
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as r:
            metrics = r.read().decode()
    finally:
        log = stop_node(node)
    for line in ('pneumoscan_dicom_events_total{event="received"} 1.0', 'pneumoscan_dicom_events_total{event="analysed"} 1.0',
                 'pneumoscan_dicom_events_total{event="delivered"} 2.0', 'pneumoscan_dicom_pending{where="outbox"} 0.0'):
        assert line in metrics, metrics
    assert "PID-98765" not in metrics
    by_modality = {r["Modality"]: r for r in results}
    assert set(by_modality) == {"SR", "OT"}  # a Secondary Capture's modality is OT ("other")
    for result in results:
        data = orthanc.get_bytes(f"/instances/{result['id']}/file")
        path = tmp_path / f"{result['id']}.dcm"
        path.write_bytes(data)
        checked = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60)
        errors = [line for line in (checked.stdout + checked.stderr).splitlines() if line.startswith("Error")]
        assert not errors, errors
        ds = dcmread(path)
        assert ds.StudyInstanceUID == study and "research use only" in ds.SeriesDescription
        assert ds.PatientID == "PID-98765"  # DICOM requires the patient module in the study's objects
    sr = dcmread(tmp_path / f"{by_modality['SR']['id']}.dcm")
    text = str(sr)
    expected = Predictor.from_bundle(exported_bundle).predict([decode_image(source.read_bytes(), name="x")])[0]
    reported = float(next(item.MeasuredValueSequence[0].NumericValue for item in _content_items(sr)
                          if "ConceptNameCodeSequence" in item and item.ConceptNameCodeSequence[0].CodeValue == "P-PNEUMONIA"))
    assert abs(reported - expected.probability) < 1e-6
    assert dcmread(source).SOPInstanceUID in text  # the source film is the evidence
    assert "PID-98765" not in log and "Doe" not in log and "ACC-4242" not in log
    assert "film " in log and "-> SR " in log
    (record,) = [json.loads(line) for line in audit.read_text().splitlines()]  # one film, one line
    assert record["sop_instance_uid"] == dcmread(source).SOPInstanceUID and record["status"] == "ok"
    assert set(record["result_sop_instance_uids"]) == {dcmread(tmp_path / f"{r['id']}.dcm").SOPInstanceUID
                                                       for r in results}
    assert abs(record["probability_pneumonia"] - reported) < 1e-6
    for identifier in ("PID-98765", "Doe", "ACC-4242", "20200101"):  # ID, name, accession, birth date
        assert identifier not in audit.read_text()


def test_an_unknown_calling_ae_is_refused_at_association(exported_bundle: Path, tmp_path: Path,
                                                        orthanc: Orthanc, node_port: int) -> None:
    _need("echoscu")
    node = start_node(exported_bundle, tmp_path / "node", node_port, orthanc)
    try:
        echo = subprocess.run(["echoscu", "-aet", "INTRUDER", "-aec", "PNEUMOSCAN", "127.0.0.1", str(node_port)],
                              capture_output=True, text=True, timeout=30)
    finally:
        log = stop_node(node)
    assert echo.returncode != 0 and "reject" in (echo.stdout + echo.stderr).lower()
    assert "INTRUDER@127.0.0.1 refused: not on the allow-list" in log


LUA = Path(__file__).resolve().parents[1] / "deploy" / "orthanc" / "route-to-pneumoscan.lua"


def test_orthanc_routes_a_stored_film_to_the_node_by_the_documented_lua_script(exported_bundle: Path, tmp_path: Path,
                                                                              node_port: int) -> None:
    _need("Orthanc")
    from pydicom import dcmread

    pacs = Orthanc(tmp_path / "orthanc", node_port, lua=LUA)
    node = start_node(exported_bundle, tmp_path / "node", node_port, pacs)
    try:
        source = film(tmp_path / "film.dcm", seed=5)
        started = time.monotonic()
        pacs.post("/instances", source.read_bytes())  # as a modality or a person would store it
        results = _study_instances(pacs, dcmread(source).StudyInstanceUID, want=3)  # the film, its SR and SC
        seconds = time.monotonic() - started
    finally:
        log = stop_node(node)
        pacs.stop()
    assert sorted(r["Modality"] for r in results) == ["DX", "OT", "SR"], log[-2000:]
    assert seconds < 60


def _sr_codes(pacs: Orthanc, instance: dict, tmp_path: Path) -> list[str]:
    from pydicom import dcmread

    path = tmp_path / f"{instance['id']}.dcm"
    path.write_bytes(pacs.get_bytes(f"/instances/{instance['id']}/file"))
    # concept names and coded values; codes over 16 characters are Long Code Values
    return [code[0].get("CodeValue") or code[0].get("LongCodeValue") for item in _content_items(dcmread(path))
            for code in (item.get("ConceptNameCodeSequence"), item.get("ConceptCodeSequence")) if code]


def test_films_outside_the_population_or_the_sop_classes_get_a_clear_outcome(exported_bundle: Path, tmp_path: Path,
                                                                           orthanc: Orthanc, node_port: int) -> None:
    """An adult's film: an SR that says why it was not analysed. A CT slice: refused at
    negotiation, so the sender knows it was not taken. Neither stops the node."""
    _need("storescu")
    from pydicom import dcmread

    adult = film(tmp_path / "adult.dcm", age="045Y")
    ct = film(tmp_path / "ct.dcm", sop_class="1.2.840.10008.5.1.4.1.1.2", modality="CT")
    child = film(tmp_path / "child.dcm", seed=9)
    node = start_node(exported_bundle, tmp_path / "node", node_port, orthanc)
    try:
        sent = [subprocess.run(["storescu", "-aet", "STORESCU", "-aec", "PNEUMOSCAN", "127.0.0.1", str(node_port),
                                str(path)], capture_output=True, text=True, timeout=60) for path in (adult, ct, child)]
        (adult_sr,) = _study_instances(orthanc, dcmread(adult).StudyInstanceUID, want=1)
        _study_instances(orthanc, dcmread(child).StudyInstanceUID, want=2)  # the node carried on
    finally:
        log = stop_node(node)
    assert sent[0].returncode == 0 and sent[2].returncode == 0
    assert sent[1].returncode != 0 or "no presentation context" in (sent[1].stdout + sent[1].stderr).lower()
    assert adult_sr["Modality"] == "SR"
    codes = _sr_codes(orthanc, adult_sr, tmp_path)
    assert "age_outside_training_population" in codes and "P-PNEUMONIA" not in codes
    assert "rejected: age_outside_training_population" in log


def test_results_wait_while_the_pacs_is_down_and_arrive_once_when_it_is_back(exported_bundle: Path, tmp_path: Path,
                                                                            node_port: int) -> None:
    _need("Orthanc", "storescu")
    from pydicom import dcmread

    pacs = Orthanc(tmp_path / "orthanc", node_port)
    node = start_node(exported_bundle, tmp_path / "node", node_port, pacs)
    try:
        pacs.stop()  # the destination goes away before the film arrives
        source = film(tmp_path / "film.dcm", seed=11)
        sent = subprocess.run(["storescu", "-aet", "STORESCU", "-aec", "PNEUMOSCAN", "127.0.0.1", str(node_port),
                               str(source)], capture_output=True, text=True, timeout=60)
        assert sent.returncode == 0  # acknowledged: the film is the node's responsibility now
        outbox = tmp_path / "node" / "outbox"
        deadline = time.monotonic() + 60
        while len(list(outbox.glob("*.dcm"))) < 2:
            assert time.monotonic() < deadline, "the results never reached the outbox"
            time.sleep(0.3)
        os.killpg(node.pid, signal.SIGKILL)  # and the node dies with them undelivered
        node.wait(timeout=30)
        pacs = Orthanc(tmp_path / "orthanc", node_port, ports=(pacs.http, pacs.dicom))  # back, same storage
        node = start_node(exported_bundle, tmp_path / "node", node_port, pacs)
        results = _study_instances(pacs, dcmread(source).StudyInstanceUID, want=2)
        time.sleep(3)  # any duplicate would have arrived by now
        again = [i for i in (pacs.get(f"/instances/{i}/simplified-tags") for i in pacs.get("/instances"))
                 if i.get("StudyInstanceUID") == dcmread(source).StudyInstanceUID]
    finally:
        log = stop_node(node)
        pacs.stop()
    assert sorted(r["Modality"] for r in results) == ["OT", "SR"] and len(again) == 2
    assert not list(outbox.glob("*.dcm")) and "delivered SR" in log


def test_a_full_spool_answers_out_of_resources_and_keeps_nothing_half_taken(exported_bundle: Path, tmp_path: Path,
                                                                           orthanc: Orthanc, node_port: int) -> None:
    """Past --spool-max-mb the C-STORE answers A700 (out of resources): the sender keeps the film
    and may retry; nothing of it stays in the spool, and smaller films are still taken."""
    _need("storescu")
    from pydicom import dcmread

    big = film(tmp_path / "big.dcm", seed=13)
    ds = dcmread(big)
    ds.Rows = ds.Columns = 4200  # 17.6 MB of pixels: more than the 16 MB spool below
    ds.PixelData = np.zeros((4200, 4200), dtype=np.uint8).tobytes()
    ds.save_as(big, enforce_file_format=True)
    small = film(tmp_path / "small.dcm", seed=14)
    node = start_node(exported_bundle, tmp_path / "node", node_port, orthanc, "--spool-max-mb", "16")
    try:
        refused = subprocess.run(["storescu", "-v", "-aet", "STORESCU", "-aec", "PNEUMOSCAN", "127.0.0.1", str(node_port),
                                  str(big)], capture_output=True, text=True, timeout=120)
        taken = subprocess.run(["storescu", "-aet", "STORESCU", "-aec", "PNEUMOSCAN", "127.0.0.1", str(node_port),
                                str(small)], capture_output=True, text=True, timeout=60)
        _study_instances(orthanc, dcmread(small).StudyInstanceUID, want=2)
    finally:
        log = stop_node(node)
    said = (refused.stdout + refused.stderr).lower()
    assert "received store response (refused: outofresources)" in said, said[-2000:]
    assert taken.returncode == 0
    assert "the spool is full (out of resources; the sender keeps it)" in log
    spool = tmp_path / "node" / "spool"
    assert not list(spool.glob("*.dcm")) and not list((spool / "incoming").iterdir())


def test_results_can_go_by_stow_rs_to_orthancs_dicomweb(exported_bundle: Path, tmp_path: Path, node_port: int) -> None:
    _need("Orthanc", "storescu")
    if not Path(DICOMWEB_PLUGIN).is_file():
        pytest.skip("needs orthanc-dicomweb (apt-get install -y orthanc-dicomweb)")
    from pydicom import dcmread

    pacs = Orthanc(tmp_path / "orthanc", node_port, dicomweb=True)
    node = start_node(exported_bundle, tmp_path / "node", node_port, pacs, stow=True)
    try:
        source = film(tmp_path / "film.dcm", seed=15)
        sent = subprocess.run(["storescu", "-aet", "STORESCU", "-aec", "PNEUMOSCAN", "127.0.0.1", str(node_port),
                               str(source)], capture_output=True, text=True, timeout=60)
        results = _study_instances(pacs, dcmread(source).StudyInstanceUID, want=2)
    finally:
        log = stop_node(node)
        pacs.stop()
    assert sent.returncode == 0 and sorted(r["Modality"] for r in results) == ["OT", "SR"], log[-2000:]


def test_a_lateral_and_a_corrupt_film_each_get_an_sr_saying_why(exported_bundle: Path, tmp_path: Path,
                                                                orthanc: Orthanc, node_port: int) -> None:
    _need("storescu")
    from pydicom import dcmread

    lateral = film(tmp_path / "lateral.dcm", view="LL", seed=16)
    corrupt = film(tmp_path / "corrupt.dcm", seed=17)
    ds = dcmread(corrupt)
    ds.PixelData = ds.PixelData[: len(ds.PixelData) // 3]  # truncated pixel data, headers intact
    ds.save_as(corrupt, enforce_file_format=True)
    node = start_node(exported_bundle, tmp_path / "node", node_port, orthanc)
    try:
        for path in (lateral, corrupt):
            assert subprocess.run(["storescu", "-aet", "STORESCU", "-aec", "PNEUMOSCAN", "127.0.0.1", str(node_port),
                                   str(path)], capture_output=True, timeout=60).returncode == 0
        (lateral_sr,) = _study_instances(orthanc, dcmread(lateral).StudyInstanceUID, want=1)
        (corrupt_sr,) = _study_instances(orthanc, dcmread(corrupt).StudyInstanceUID, want=1)
        assert node.poll() is None  # still serving
    finally:
        log = stop_node(node)
    lateral_codes = _sr_codes(orthanc, lateral_sr, tmp_path)
    assert "lateral_view" in lateral_codes and "NOT-ANALYSED" in lateral_codes and "P-PNEUMONIA" not in lateral_codes
    corrupt_codes = _sr_codes(orthanc, corrupt_sr, tmp_path)
    assert corrupt_sr["Modality"] == "SR" and "NOT-ANALYSED" in corrupt_codes and "P-PNEUMONIA" not in corrupt_codes
    assert "Traceback" not in log


def _storescu(port: int, *paths: Path, options: tuple[str, ...] = (), timeout: float = 120) -> subprocess.CompletedProcess:
    """storescu; ``options`` to propose a compressed transfer syntax (-xy JPEG, -xd Deflated),
    which it does not by default (it would try to decompress the film instead)."""
    return subprocess.run(["storescu", *options, "-aet", "STORESCU", "-aec", "PNEUMOSCAN", "127.0.0.1", str(port),
                           *map(str, paths)], capture_output=True, text=True, timeout=timeout)


def _peak_rss_mb(pid: int) -> float:
    """The node's own peak resident memory (VmHWM), MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM in /proc status")


def test_decoding_bombs_get_an_sr_saying_why_at_bounded_memory(exported_bundle: Path, tmp_path: Path,
                                                               orthanc: Orthanc, node_port: int) -> None:
    """A 2.5 kB JPEG DICOM whose frame claims 30000x30000 pixels and a 0.9 MB Deflated DICOM that
    inflates to 900 MB: each is acknowledged (it is a valid film to store), answered by an SR that
    says why it was not analysed, and costs the node a bounded amount of memory."""
    _need("storescu")
    from pydicom.uid import generate_uid

    bombs = _bench_bombs()
    studies = {kind: generate_uid() for kind in ("jpeg", "deflate")}

    def header(kind: str) -> dict:
        return {"StudyInstanceUID": studies[kind], "SeriesInstanceUID": generate_uid(), "PatientName": "Doe^Jane",
                "PatientID": "PID-98765", "PatientAge": "003Y", "StudyDate": "20230101", "ViewPosition": "AP",
                "BodyPartExamined": "CHEST", "SeriesNumber": 1, "InstanceNumber": 1}

    jpeg = tmp_path / "jpeg-claims-30000.dcm"
    jpeg.write_bytes(bombs.dicom_frame_claiming(30000, "jpeg", header("jpeg")))
    deflate = tmp_path / "deflate-900mb.dcm"
    deflate.write_bytes(bombs.deflated_dicom(30000, 8, header("deflate")))
    assert jpeg.stat().st_size < 4096 and deflate.stat().st_size < 1_000_000
    node = start_node(exported_bundle, tmp_path / "node", node_port, orthanc)
    try:
        warm = _storescu(node_port, jpeg, options=("-xy",))
        assert warm.returncode == 0, warm.stderr  # warm: the first film loads what analysis needs
        (jpeg_sr,) = _study_instances(orthanc, studies["jpeg"], want=1)
        before = _peak_rss_mb(node.pid)
        sent = _storescu(node_port, deflate, options=("-xd",))
        (deflate_sr,) = _study_instances(orthanc, studies["deflate"], want=1)
        grown = _peak_rss_mb(node.pid) - before
        assert node.poll() is None
    finally:
        log = stop_node(node)
    assert sent.returncode == 0, sent.stderr
    jpeg_codes, deflate_codes = _sr_codes(orthanc, jpeg_sr, tmp_path), _sr_codes(orthanc, deflate_sr, tmp_path)
    assert "dicom_frame_mismatch" in jpeg_codes and "P-PNEUMONIA" not in jpeg_codes
    assert "decode_budget_exceeded" in deflate_codes and "P-PNEUMONIA" not in deflate_codes
    # the inflation budget (80 MB) and a copy, not the 900 MB the data set inflates to
    assert grown < 300, f"the node's peak memory grew {grown:.0f} MB for one deflate bomb"
    assert "error: dicom_frame_mismatch" in log and "error: decode_budget_exceeded" in log
    assert "Traceback" not in log


def test_a_data_set_past_the_size_limit_is_aborted_while_it_arrives(exported_bundle: Path, tmp_path: Path,
                                                                    orthanc: Orthanc, node_port: int) -> None:
    """A 90 MB film (the limit is 80 MB) is cut off by an A-ABORT as it arrives: not acknowledged,
    nothing of it left on disk; the next film is taken as usual."""
    _need("storescu")
    from pydicom import dcmread

    big = film(tmp_path / "big.dcm", seed=18)
    ds = dcmread(big)
    ds.Rows = ds.Columns = 9500  # 90 MB of 8-bit pixels
    ds.PixelData = np.zeros((9500, 9500), dtype=np.uint8).tobytes()
    ds.save_as(big, enforce_file_format=True)
    del ds
    small = film(tmp_path / "small.dcm", seed=19)
    node = start_node(exported_bundle, tmp_path / "node", node_port, orthanc)
    try:
        refused = _storescu(node_port, big)
        taken = _storescu(node_port, small)
        _study_instances(orthanc, dcmread(small).StudyInstanceUID, want=2)
        spool = tmp_path / "node" / "spool"
        leftovers = list(spool.glob("*.dcm")) + list((spool / "incoming").iterdir())
    finally:
        log = stop_node(node)
    said = (refused.stdout + refused.stderr).lower()
    assert refused.returncode != 0 and "abort" in said, said[-2000:]
    assert taken.returncode == 0
    assert "aborted: a data set past 80 MB, the limit" in log
    assert not leftovers
    assert "Traceback" not in log


def test_a_film_the_gate_refuses_gets_an_sr_with_the_gates_reason(tmp_path: Path, orthanc: Orthanc,
                                                                   node_port: int) -> None:
    """The bundled (gated) model: a greyscale image that is no chest film (noise) is refused by
    the input gate, and the SR says so in the API's reason name."""
    _need("storescu")
    from pydicom import dcmread

    from pneumoscan.integrity import default_bundle_path

    noise = film(tmp_path / "noise.dcm", seed=20)
    ds = dcmread(noise)
    ds.PixelData = np.random.default_rng(3).integers(0, 255, (ds.Rows, ds.Columns), dtype=np.uint8).tobytes()
    ds.save_as(noise, enforce_file_format=True)
    node = start_node(default_bundle_path(), tmp_path / "node", node_port, orthanc)
    try:
        assert _storescu(node_port, noise).returncode == 0
        (sr,) = _study_instances(orthanc, dcmread(noise).StudyInstanceUID, want=1)
    finally:
        log = stop_node(node)
    codes = _sr_codes(orthanc, sr, tmp_path)
    assert "out_of_distribution" in codes and "NOT-ANALYSED" in codes and "P-PNEUMONIA" not in codes
    assert "rejected: out_of_distribution" in log


def test_twenty_associations_at_once_every_acknowledged_film_is_answered(exported_bundle: Path, tmp_path: Path,
                                                                          orthanc: Orthanc, node_port: int) -> None:
    """20 modalities at once against --max-associations 4: each film is either acknowledged (and
    then answered by an SR in its study) or its association is rejected as transient (the sender
    keeps it and retries); none is acknowledged and lost; the node keeps serving."""
    _need("storescu")
    from pydicom import dcmread

    films = [film(tmp_path / f"film-{i}.dcm", seed=100 + i) for i in range(20)]
    node = start_node(exported_bundle, tmp_path / "node", node_port, orthanc, "--max-associations", "4")
    try:
        senders = [subprocess.Popen(["storescu", "-aet", "STORESCU", "-aec", "PNEUMOSCAN", "127.0.0.1",
                                     str(node_port), str(path)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                    text=True) for path in films]
        said = [sender.communicate(timeout=120)[0] for sender in senders]
        taken = [path for path, sender in zip(films, senders) if sender.returncode == 0]
        for path in taken:
            _study_instances(orthanc, dcmread(path).StudyInstanceUID, want=2)
        refused = [text for sender, text in zip(senders, said) if sender.returncode != 0]
        after = _storescu(node_port, film(tmp_path / "after.dcm", seed=140))
    finally:
        log = stop_node(node)
    assert taken, said
    for text in refused:  # a refusal is the association's, transient: the sender may try again
        assert "association rejected" in text.lower() and "transient" in text.lower(), text
    assert after.returncode == 0
    assert log.count("-> SR ") == len(taken) + 1
    assert "Traceback" not in log


@pytest.mark.parametrize(("options", "says"), [
    (["--allow", "STORESCU@127.0.0.1"], "needs a destination for its results"),
    (["--allow", "STORESCU@127.0.0.1", "--send", "ORTHANC"], "--send takes AET@HOST:PORT"),
    (["--allow", "STORESCU@127.0.0.1", "--stow", "orthanc/dicom-web"], "--stow takes the http(s) URL"),
    (["--allow", "STORESCU", "--send", "ORTHANC@127.0.0.1:4242"], "--allow takes AET@HOST"),
    (["--allow", "STORESCU@127.0.0.1", "--send", "ORTHANC@127.0.0.1:4242", "--ae-title", "A" * 17],
     "--ae-title must be 1-16 characters"),
])
def test_a_misconfigured_node_says_what_is_wrong_in_one_line(tmp_path: Path, options: list[str], says: str) -> None:
    """Configuration mistakes end before the node listens: exit 2 and one line naming the option."""
    pytest.importorskip("pynetdicom")
    done = subprocess.run([sys.executable, "-m", "pneumoscan", "dicom-node", "--spool", str(tmp_path / "spool"),
                           "--port", str(_free_port()), "--host", "127.0.0.1", *options],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stdout + done.stderr
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and says in lines[0], done.stderr
    assert "listening" not in done.stdout


@pytest.mark.parametrize(("header", "reasons"), [
    ({"PatientAge": "003Y", "ViewPosition": "AP", "BodyPartExamined": "CHEST"}, []),
    ({"PatientAge": "045Y"}, ["age_outside_training_population"]),
    ({"PatientAge": "006M"}, ["age_outside_training_population"]),  # 6 months: younger than 1 year
    ({"PatientBirthDate": "20100101", "StudyDate": "20230101"}, ["age_outside_training_population"]),
    ({"PatientBirthDate": "20200101", "StudyDate": "20230101", "ViewPosition": "PA"}, []),
    ({"ViewPosition": "LAO"}, ["view_not_frontal"]),
    ({"ViewPosition": "LL"}, []),  # a lateral is the gate's to refuse, as lateral_view
    ({"BodyPartExamined": "ABDOMEN"}, ["body_part_not_chest"]),
    ({"BodyPartExamined": "THORAX", "PatientAge": "bogus"}, []),  # an unreadable age is no evidence against
])
def test_the_header_says_when_a_film_is_outside_the_training_population(header: dict, reasons: list[str]) -> None:
    from pydicom import Dataset

    from pneumoscan.dicom.analysis import population_reasons

    ds = Dataset()
    for keyword, value in header.items():
        setattr(ds, keyword, value)
    assert population_reasons(ds) == reasons
