"""The Flask app: upload page, JSON API, health check, and JSON errors for bad uploads."""

from __future__ import annotations

import io
from pathlib import Path

import pytest

from conftest import image_bytes, make_xray


def _upload(*files: tuple[bytes, str]) -> dict:
    return {"file": [(io.BytesIO(data), name) for data, name in files]}


def test_healthz_and_model(client) -> None:
    assert client.get("/healthz").status_code == 200
    card = client.get("/api/v1/model").get_json()
    assert card["architecture"]["backbone"] == "efficientnet_lite0" and len(card["weights_sha256"]) == 64
    assert card["architecture"]["histogram_equalized"] is False  # trained without --equalize
    assert "Not for clinical use" in card["intended_use"]
    assert card["training_data"]["n_train"] == sum(card["training_data"]["n_train_by_class"].values())
    assert set(card["decision"]["operating_points"]) == {"balanced", "high_sensitivity", "high_specificity"}
    validation = card["metrics"]["validation_at_training"]
    assert validation["n"] == card["training_data"]["n_validation"]
    assert set(validation["operating_points"]) == set(card["decision"]["operating_points"])
    assert card["calibration"]["method"] == "temperature_scaling_on_validation"


def test_index_page_has_form_and_notice(client) -> None:
    page = client.get("/").get_data(as_text=True)
    assert 'type="file"' in page and "multiple" in page
    assert "Research use only" in page and "Not for clinical diagnosis" in page


def test_api_predicts_one_and_many(client) -> None:
    xray = image_bytes(make_xray(11, pneumonia=True), "JPEG")
    response = client.post("/api/v1/predict", data=_upload((xray, "a.jpg")),
                           content_type="multipart/form-data")
    assert response.status_code == 200
    (result,) = response.get_json()["results"]
    assert result["filename"] == "a.jpg" and result["status"] == "ok"
    assert result["label"] in ("NORMAL", "PNEUMONIA") and 0 <= result["probability_pneumonia"] <= 1
    assert result["label"] == ("PNEUMONIA" if result["probability_pneumonia"] >= result["threshold"] else "NORMAL")
    response = client.post("/api/v1/predict", data=_upload(
        (xray, "a.jpg"), (image_bytes(make_xray(12)), "b.png"), (b"garbage", "c.jpg")),
        content_type="multipart/form-data")
    assert response.status_code == 200
    statuses = [r["status"] for r in response.get_json()["results"]]
    assert statuses == ["ok", "ok", "error"]


def test_api_predictions_match_the_cli_path(client, tiny_bundle: Path, xray_root: Path) -> None:
    from pneumoscan.inference import Predictor

    path = next((xray_root / "test" / "PNEUMONIA").iterdir())
    expected = Predictor.from_bundle(tiny_bundle).predict_paths([path])[0].probability
    response = client.post("/api/v1/predict", data=_upload((path.read_bytes(), path.name)),
                           content_type="multipart/form-data")
    assert response.get_json()["results"][0]["probability_pneumonia"] == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize("files,status,code", [
    ([], 400, "missing_file"),
    ([(b"%PDF-1.7 a document", "doc.jpg")], 415, "unsupported_media_type"),
    ([(b"GIF89a" + b"\x00" * 20, "anim.gif")], 415, "unsupported_media_type"),
    ([(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40, "broken.png")], 422, "invalid_image"),
    ([(b"", "empty.png")], 422, "empty_file"),
])
def test_api_bad_uploads_are_json_4xx(client, files, status: int, code: str) -> None:
    response = client.post("/api/v1/predict", data=_upload(*files), content_type="multipart/form-data")
    assert response.status_code == status
    assert response.is_json and response.get_json()["error"]["code"] == code


def test_api_too_large_and_too_many(client) -> None:
    big = b"\xff\xd8" + b"\x00" * (3 * 1024 * 1024)
    response = client.post("/api/v1/predict", data=_upload((big, "big.jpg")), content_type="multipart/form-data")
    assert response.status_code == 413 and response.get_json()["error"]["code"] == "payload_too_large"
    small = image_bytes(make_xray(1))
    response = client.post("/api/v1/predict", data=_upload(*[(small, f"{i}.png") for i in range(5)]),
                           content_type="multipart/form-data")
    assert response.status_code == 413 and response.get_json()["error"]["code"] == "too_many_files"


def test_api_wrong_method_and_unknown_route_are_json(client) -> None:
    assert client.get("/api/v1/predict").status_code == 405
    response = client.get("/api/v1/nothing")
    assert response.status_code == 404 and response.is_json


def test_upload_page_shows_result_cards(client) -> None:
    response = client.post("/", data=_upload((image_bytes(make_xray(3)), "scan<1>.png"), (b"junk", "x.jpg")),
                           content_type="multipart/form-data")
    page = response.get_data(as_text=True)
    assert response.status_code == 200
    assert "scan&lt;1&gt;.png" in page and "<1>" not in page  # names are escaped
    assert "P(pneumonia)" in page and 'class="card error"' in page
    response = client.post("/", data={}, content_type="multipart/form-data")
    assert response.status_code == 400 and "no file uploaded" in response.get_data(as_text=True)


def test_factory_refuses_a_broken_bundle(tmp_path: Path) -> None:
    from pneumoscan.errors import BundleError
    from pneumoscan.web import create_app

    with pytest.raises(BundleError):
        create_app({"TESTING": True, "MODEL_DIR": str(tmp_path)})


def test_pneumoscan_serve_runs_gunicorn_and_answers(tiny_bundle: Path, xray_root: Path, tmp_path: Path) -> None:
    """The real server: gunicorn workers fork after the master checked the bundle (and, for an
    exported bundle on one inference thread each, loaded it), then predict; /metrics adds up both
    workers, and the audit log gets the prediction."""
    import json
    import os
    import signal
    import socket
    import subprocess
    import sys
    import time
    import urllib.request

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    audit_log = tmp_path / "audit" / "audit.jsonl"
    server = subprocess.Popen(
        [sys.executable, "-m", "pneumoscan", "serve", "--model", str(tiny_bundle), "--port", str(port),
         "--workers", "2", "--threads", "2", "--audit-log", str(audit_log), "--request-timeout", "3"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
        env={**{key: value for key, value in os.environ.items() if key != "PROMETHEUS_MULTIPROC_DIR"},
             "PNEUMOSCAN_INFERENCE_THREADS": "1"})
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as r:
                    assert r.status == 200
                    break
            except OSError:
                assert server.poll() is None and time.monotonic() < deadline, "server did not start"
                time.sleep(0.5)
        # A slow-loris client: headers and a trickle of a large body, never finished. It holds one
        # thread until the 3-second upload deadline; everyone else is still served meanwhile.
        slow = socket.create_connection(("127.0.0.1", port), timeout=10)
        slow_started = time.monotonic()
        slow.sendall(b"POST /api/v1/predict HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; "
                     b"boundary=zz\r\nContent-Length: 1000000\r\n\r\n--zz\r\n")
        image = next((xray_root / "test" / "NORMAL").iterdir())
        boundary = "pneumoscanboundary"
        body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"{image.name}\"\r\n"
                f"Content-Type: image/jpeg\r\n\r\n").encode() + image.read_bytes() + f"\r\n--{boundary}--\r\n".encode()
        request = urllib.request.Request(f"http://127.0.0.1:{port}/api/v1/predict", data=body, method="POST",
                                         headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
        with urllib.request.urlopen(request, timeout=60) as r:
            result = json.loads(r.read())["results"][0]
        assert result["status"] == "ok" and result["filename"] == image.name
        for _ in range(4):  # whichever worker answers, it reports both workers' counts
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
                metrics = r.read().decode()
            assert f'pneumoscan_predictions_total{{label="{result["label"]}",operating_point="balanced"}} 1.0' in metrics
        (line,) = audit_log.read_text().splitlines()
        assert json.loads(line)["image_sha256"] == result["image_sha256"]
        chunks = []  # the answer arrives once the deadline has passed; then the server closes
        while chunk := slow.recv(4096):
            chunks.append(chunk)
        answer = b"".join(chunks).decode(errors="replace")
        assert answer.startswith("HTTP/1.1 408") and '"request_timeout"' in answer
        assert 2.5 < time.monotonic() - slow_started < 30
        slow.close()
        # A chunked body whose second chunk size is not hexadecimal: a 400, not a 500 with a traceback.
        broken = socket.create_connection(("127.0.0.1", port), timeout=10)
        broken.sendall(b"POST /api/v1/predict HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; "
                       b"boundary=zz\r\nTransfer-Encoding: chunked\r\n\r\n6\r\n--zz\r\n\r\nZZ\r\nxx\r\n0\r\n\r\n")
        chunks = []
        while chunk := broken.recv(4096):
            chunks.append(chunk)
        answer = b"".join(chunks).decode(errors="replace")
        assert answer.startswith("HTTP/1.1 400") and '"malformed_body"' in answer
        broken.close()
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        output = server.communicate(timeout=30)[0]
    assert "gunicorn" in output.lower()
    shared = (tiny_bundle / "model.onnx").is_file()  # the light install's test bundle is exported
    assert ("loaded once, before the 2 worker(s) fork" in output) is shared, output[:2000]
    assert "Traceback" not in output and "unexpected error" not in output


def test_api_operating_point_and_threshold(client, app) -> None:
    predictor = app.extensions["pneumoscan"]
    data = lambda **kw: {"file": [(io.BytesIO(image_bytes(make_xray(8))), "x.png")], **kw}  # noqa: E731
    post = lambda **kw: client.post("/api/v1/predict", data=data(**kw), content_type="multipart/form-data")  # noqa: E731
    result = post(operating_point="high_specificity").get_json()["results"][0]
    assert result["operating_point"] == "high_specificity"
    assert result["threshold"] == pytest.approx(predictor.decision.operating_points["high_specificity"], abs=1e-6)
    custom = post(threshold="0.99").get_json()["results"][0]
    assert custom["threshold"] == 0.99 and custom["operating_point"] == "custom"
    assert custom["label"] == ("PNEUMONIA" if custom["probability_pneumonia"] >= 0.99 else "NORMAL")
    for bad, status in ((dict(operating_point="reckless"), 400), (dict(threshold="abc"), 400),
                        (dict(threshold="1.5"), 400)):
        response = post(**bad)
        assert response.status_code == status and response.is_json, bad


def test_readyz_and_request_ids(client, app) -> None:
    ready = client.get("/readyz")
    assert ready.status_code == 200 and ready.get_json()["weights_sha256"] == app.extensions["pneumoscan"].spec.weights_sha256
    app.extensions["pneumoscan_ready"] = False
    assert client.get("/readyz").status_code == 503
    first, second = client.get("/healthz"), client.get("/api/v1/nothing")
    assert len(first.headers["X-Request-ID"]) == 32 and second.headers["X-Request-ID"] != first.headers["X-Request-ID"]
    assert client.get("/healthz", headers={"X-Request-ID": "abc-123"}).headers["X-Request-ID"] == "abc-123"
    hostile = client.get("/healthz", headers={"X-Request-ID": "x\x7f<script>"}).headers["X-Request-ID"]
    assert hostile != "x\x7f<script>" and len(hostile) == 32


def test_favicon(client) -> None:
    from PIL import Image

    response = client.get("/favicon.ico")
    assert response.status_code == 200
    assert Image.open(io.BytesIO(response.data)).format == "ICO"
    assert 'rel="icon"' in client.get("/").get_data(as_text=True)


def test_coinciding_operating_points_are_offered_once() -> None:
    from pneumoscan.web.views import point_choices

    points = {"balanced": 0.743, "high_sensitivity": 0.453, "high_specificity": 0.743}
    assert point_choices(points, "balanced") == [("balanced", "balanced = high specificity", 0.743),
                                                  ("high_sensitivity", "high sensitivity", 0.453)]
    assert len(point_choices({"balanced": 0.265, "high_sensitivity": 0.265, "high_specificity": 0.265}, "balanced")) == 1


def test_the_selectors_disappear_when_every_point_coincides(tiny_bundle: Path, tmp_path: Path) -> None:
    from pneumoscan.integrity import read_spec, rewrite_bundle
    from pneumoscan.web import create_app

    spec = read_spec(tiny_bundle)
    same = {name: 0.5 for name in spec.decision.points}
    from dataclasses import replace

    rewrite_bundle(tiny_bundle, spec.replace(decision=replace(spec.decision, threshold=0.5, operating_points=same)),
                   tmp_path / "same")
    client = create_app({"TESTING": True, "MODEL_DIR": str(tmp_path / "same"), "WTF_CSRF_ENABLED": False}).test_client()
    page = client.post("/", data={"file": [(io.BytesIO(image_bytes(make_xray(3))), "x.png")]},
                       content_type="multipart/form-data").get_data(as_text=True)
    assert 'id="operating_point"' not in page and 'class="card-operating-point"' not in page
    assert "P(pneumonia)" in page
    model_page = client.get("/model").get_data(as_text=True)
    assert "balanced = high sensitivity = high specificity" in model_page


def test_workers_share_the_model_only_when_forking_is_safe(exported_bundle: Path, tiny_bundle: Path) -> None:
    from pneumoscan.integrity import read_spec
    from pneumoscan.web.server import shares_model

    spec = read_spec(exported_bundle)
    assert shares_model(spec, 1, "auto") and shares_model(spec, 1, "onnxruntime")
    assert not shares_model(spec, 2, "auto")  # ONNX Runtime's thread pool would not survive the fork
    assert not shares_model(spec, 1, "openvino") and not shares_model(spec, 1, "torch")
    assert not shares_model(spec, 1, "auto", allow_torch_fallback=True)  # a tampered graph would load PyTorch
    if read_spec(tiny_bundle).onnx is None:
        assert not shares_model(read_spec(tiny_bundle), 1, "auto")  # PyTorch runs it
