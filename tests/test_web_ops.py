"""Operating the service: Prometheus metrics, the audit log, settings from PNEUMOSCAN_*, the
OpenAPI document, the model card page and evaluations recorded in the bundle."""

from __future__ import annotations

import hashlib
import io
import json
import shutil
from pathlib import Path

import pytest

from conftest import image_bytes, make_xray


def _post(client, *files: tuple[bytes, str], **fields):
    return client.post("/api/v1/predict", data={"file": [(io.BytesIO(d), n) for d, n in files], **fields},
                       content_type="multipart/form-data")


def _sample(metrics: str, prefix: str) -> float:
    lines = [line for line in metrics.splitlines() if line.startswith(prefix)]
    return float(lines[0].rsplit(" ", 1)[1]) if lines else 0.0


def test_metrics_count_requests_labels_rejections_and_errors(client) -> None:
    xray = image_bytes(make_xray(21, pneumonia=True))
    blank = image_bytes(__import__("PIL.Image", fromlist=["Image"]).new("L", (128, 128), 40))
    result = _post(client, (xray, "a.png"), (blank, "b.png"), (b"nope", "c.jpg")).get_json()["results"]
    label = result[0]["label"]
    metrics = client.get("/metrics")
    assert metrics.status_code == 200 and metrics.mimetype == "text/plain"
    text = metrics.get_data(as_text=True)
    assert _sample(text, f'pneumoscan_predictions_total{{label="{label}",operating_point="balanced"}}') == 1
    assert _sample(text, 'pneumoscan_rejections_total{reason="blank_or_constant"}') == 1
    assert _sample(text, 'pneumoscan_image_errors_total{code="unsupported_media_type"}') == 1
    assert _sample(text, 'pneumoscan_http_requests_total{endpoint="/api/v1/predict",method="POST",status="200"}') == 1
    assert _sample(text, 'pneumoscan_http_request_duration_seconds_count{endpoint="/api/v1/predict"}') == 1
    client.get("/no/such/page/123")
    text = client.get("/metrics").get_data(as_text=True)
    assert "/no/such/page" not in text and 'endpoint="unmatched"' in text  # no series per unknown URL


def test_every_result_carries_the_uploads_sha256(client) -> None:
    xray = image_bytes(make_xray(22))
    (result,) = _post(client, (xray, "a.png")).get_json()["results"]
    assert result["image_sha256"] == hashlib.sha256(xray).hexdigest()


def test_audit_log_is_off_by_default_and_records_no_names(tiny_bundle: Path, tmp_path: Path, monkeypatch) -> None:
    from pneumoscan.web import create_app

    monkeypatch.chdir(tmp_path)
    quiet = create_app({"TESTING": True, "MODEL_DIR": str(tiny_bundle)})
    assert quiet.extensions["pneumoscan_audit"] is None
    _post(quiet.test_client(), (image_bytes(make_xray(23)), "Doe_Jane.png"))
    assert list(tmp_path.iterdir()) == []  # nothing written anywhere by default

    log = tmp_path / "logs" / "audit.jsonl"
    monkeypatch.setenv("PNEUMOSCAN_AUDIT_LOG", str(log))
    client = create_app({"TESTING": True, "MODEL_DIR": str(tiny_bundle)}).test_client()
    xray = image_bytes(make_xray(24))
    response = _post(client, (xray, "Doe_Jane.png"), (b"junk", "Roe_Richard.jpg"),
                     operating_point="balanced")
    _post(client, (xray, "again.png"))
    lines = [json.loads(line) for line in log.read_text().splitlines()]
    assert len(lines) == 3
    first, second, third = lines
    assert first["request_id"] == response.headers["X-Request-ID"] == second["request_id"] != third["request_id"]
    assert first["image_sha256"] == hashlib.sha256(xray).hexdigest()
    assert first["status"] == "ok" and first["operating_point"] == "balanced"
    assert first["label"] == response.get_json()["results"][0]["label"]
    assert first["model"]["weights_sha256"] == client.get("/api/v1/model").get_json()["weights_sha256"]
    assert second["status"] == "error" and second["error_code"] == "unsupported_media_type"
    text = log.read_text()
    assert "Doe" not in text and "Roe" not in text and "filename" not in text


@pytest.mark.parametrize(("name", "value", "message"), [
    ("PNEUMOSCAN_MAX_FILES", "many", "PNEUMOSCAN_MAX_FILES must be a positive whole number"),
    ("PNEUMOSCAN_MAX_CONTENT_LENGTH", "-5", "PNEUMOSCAN_MAX_CONTENT_LENGTH must be a positive whole number"),
    ("PNEUMOSCAN_DECODE_CONCURRENCY", "0", "PNEUMOSCAN_DECODE_CONCURRENCY must be a positive whole number"),
    ("PNEUMOSCAN_MODEL_SHA256", "abc", "PNEUMOSCAN_MODEL_SHA256 must be 64 hexadecimal digits"),
])
def test_bad_settings_are_named(tiny_bundle: Path, monkeypatch, name: str, value: str, message: str) -> None:
    from pneumoscan.errors import ConfigError
    from pneumoscan.web import create_app

    monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError, match=message):
        create_app({"MODEL_DIR": str(tiny_bundle)})


def test_settings_come_from_the_environment(tiny_bundle: Path, monkeypatch) -> None:
    from pneumoscan.web import create_app

    monkeypatch.setenv("PNEUMOSCAN_MAX_FILES", "1")
    client = create_app({"MODEL_DIR": str(tiny_bundle)}).test_client()
    xray = image_bytes(make_xray(25))
    response = _post(client, (xray, "a.png"), (xray, "b.png"))
    assert response.status_code == 413 and response.get_json()["error"]["code"] == "too_many_files"
    spec = client.get("/api/v1/openapi.json").get_json()
    body = spec["paths"]["/api/v1/predict"]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]
    assert body["properties"]["file"]["maxItems"] == 1


def test_unwritable_audit_log_is_a_clear_error(tiny_bundle: Path, tmp_path: Path) -> None:
    from pneumoscan.errors import ConfigError
    from pneumoscan.web import create_app

    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(ConfigError, match="cannot open the audit log"):
        create_app({"MODEL_DIR": str(tiny_bundle), "AUDIT_LOG": str(blocker / "audit.jsonl")})


def test_serve_refuses_bad_settings_before_starting(tiny_bundle: Path) -> None:
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-m", "pneumoscan", "serve", "--model", str(tiny_bundle),
                             "--max-files", "0"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "PNEUMOSCAN_MAX_FILES must be a positive whole number" in result.stderr
    assert "Traceback" not in result.stderr


def test_model_card_page_and_recorded_evaluation(tiny_bundle: Path, xray_root: Path, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from pneumoscan.cli import app as cli
    from pneumoscan.integrity import read_spec, verify_bundle
    from pneumoscan.web import create_app

    bundle = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, bundle)
    before = read_spec(bundle)
    result = CliRunner().invoke(cli, ["evaluate", "--data", str(xray_root), "--split", "test", "--model",
                                      str(bundle), "--out", str(tmp_path / "report"), "--bootstrap", "200",
                                      "--record"])
    assert result.exit_code == 0, result.output
    after = verify_bundle(bundle)  # still loads: weights untouched, sha256 unchanged
    assert after.weights_sha256 == before.weights_sha256
    recorded = after.reported_metrics["test"]
    assert recorded["n"] == 12 and set(recorded["operating_points"]) == set(after.decision.operating_points)
    accuracy = recorded["operating_points"]["balanced"]["accuracy"]
    assert accuracy["ci_low"] <= accuracy["value"] <= accuracy["ci_high"]

    client = create_app({"TESTING": True, "MODEL_DIR": str(bundle)}).test_client()
    assert client.get("/api/v1/model").get_json()["metrics"]["test"]["n"] == 12
    page = client.get("/model").get_data(as_text=True)
    assert "Metrics: test (n = 12)" in page and "Intended use" in page
    assert f"{accuracy['value']:.3f}" in page and f"{accuracy['ci_low']:.3f}" in page
    review = recorded["review"]["probability_band"]  # the review flag's figures travel with them
    assert f"{review['flagged']} of {review['n']} films flagged" in page


def test_a_pinned_bundle_digest_is_enforced(tiny_bundle: Path) -> None:
    from pneumoscan.errors import BundleError
    from pneumoscan.integrity import bundle_digest
    from pneumoscan.web import create_app

    digest = bundle_digest(tiny_bundle)
    client = create_app({"MODEL_DIR": str(tiny_bundle), "MODEL_SHA256": digest}).test_client()
    assert client.get("/readyz").get_json()["bundle_digest"] == digest
    assert client.get("/api/v1/model").get_json()["bundle_digest"] == digest
    with pytest.raises(BundleError, match="was expected"):
        create_app({"MODEL_DIR": str(tiny_bundle), "MODEL_SHA256": "f" * 64})


def test_decoding_waits_for_a_slot_no_longer_than_the_deadline(tiny_bundle: Path) -> None:
    """With every decoding slot held (other uploads decoding), a request gets a 503 with
    Retry-After when its deadline passes, not an unbounded wait."""
    import time

    from pneumoscan.web import create_app

    app = create_app({"MODEL_DIR": str(tiny_bundle), "REQUEST_TIMEOUT": 1, "DECODE_CONCURRENCY": 1})
    client = app.test_client()
    slots = app.extensions["pneumoscan_decode_slots"]
    assert slots.acquire(timeout=1)
    try:
        started = time.monotonic()
        response = _post(client, (image_bytes(make_xray(3)), "a.png"))
        waited = time.monotonic() - started
    finally:
        slots.release()
    assert response.status_code == 503 and response.get_json()["error"]["code"] == "server_busy"
    assert response.headers["Retry-After"] == "5" and 0.9 < waited < 5
    assert _post(client, (image_bytes(make_xray(3)), "a.png")).status_code == 200


_FULL_DISK_SCRIPT = r"""
import io, json, resource, sys
from conftest import image_bytes, make_xray
from pneumoscan.web import create_app

bundle, log = sys.argv[1], sys.argv[2]
app = create_app({"TESTING": True, "WTF_CSRF_ENABLED": False, "MODEL_DIR": bundle, "AUDIT_LOG": log})
client = app.test_client()
films = [image_bytes(make_xray(40 + i)) for i in range(4)]

def post(path="/api/v1/predict"):
    data = {"file": [(io.BytesIO(film), f"Doe_{i}.png") for i, film in enumerate(films)]}
    response = client.post(path, data=data, content_type="multipart/form-data")
    return response.status_code, response.headers["X-Request-ID"], response.get_data(as_text=True)

answers = [post()]
request_bytes = len(open(log, "rb").read())
# a real short write: the kernel stops a write at RLIMIT_FSIZE (Python ignores SIGXFSZ) half-way
# through the second request's records, then refuses every write after it, as a full disk does
limit = int(request_bytes * 1.5)
resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))
answers += [post(), post(), post("/")]
resource.setrlimit(resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
answers.append(post())  # the disk has room again
metrics = client.get("/metrics").get_data(as_text=True)
print(json.dumps({"answers": answers, "limit": limit, "metrics": metrics}))
"""


def test_a_full_disk_fails_the_request_and_loses_no_record(tiny_bundle: Path, tmp_path: Path) -> None:
    """Every 200 has its records in the log, whole; every request whose records did not fit is a
    503 (API and page), counted in /metrics, and leaves nothing of itself behind."""
    import subprocess
    import sys

    log = tmp_path / "audit.jsonl"
    tests = Path(__file__).parent
    done = subprocess.run([sys.executable, "-c", _FULL_DISK_SCRIPT, str(tiny_bundle), str(log)], cwd=tests,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    outcome = json.loads(done.stdout.strip().splitlines()[-1])
    statuses = [status for status, _, _ in outcome["answers"]]
    assert statuses == [200, 503, 503, 503, 200]
    api_refusal = json.loads(outcome["answers"][1][2])
    assert api_refusal["error"]["code"] == "audit_unavailable" and "results" not in api_refusal
    assert "audit log cannot be written" in outcome["answers"][3][2]  # the page says it too
    assert "pneumoscan_audit_write_failures_total 3.0" in outcome["metrics"]
    assert "audit log write failed for request" in done.stderr and "Doe_" not in done.stderr

    records = [json.loads(line) for line in log.read_text().splitlines()]  # every line whole
    answered = [request_id for status, request_id, _ in outcome["answers"] if status == 200]
    assert [r["request_id"] for r in records] == [answered[0]] * 4 + [answered[1]] * 4
    assert "Doe_" not in log.read_text()


def test_a_torn_last_line_never_corrupts_the_next_record(tiny_bundle: Path, tmp_path: Path) -> None:
    from pneumoscan.audit import AuditLog

    path = tmp_path / "audit.jsonl"
    path.write_bytes(b'{"time": "2026-12-03T06:00:00", "request_id": "a", "sta')  # killed mid-write
    audit = AuditLog(path)
    audit.record(request_id="b", model={"name": "m"}, results=[{"status": "ok", "label": "NORMAL"}])
    torn, whole = path.read_text().splitlines()
    assert torn.endswith('"sta') and json.loads(whole)["request_id"] == "b"
    audit.record(request_id="c", model={"name": "m"}, results=[{"status": "ok", "label": "NORMAL"}])
    assert [json.loads(line)["request_id"] for line in path.read_text().splitlines()[1:]] == ["b", "c"]
