"""Hostile inputs against the API and the CLI: each gets a clear 4xx JSON (or a per-file error or
rejection), the app keeps answering good requests correctly, and nothing is written to disk."""

from __future__ import annotations

import builtins
import io
import json
import tempfile
from pathlib import Path

import pytest

from conftest import image_bytes, make_xray
from hostile_inputs import hostile_files

HOSTILE = hostile_files()
GOOD = image_bytes(make_xray(99, pneumonia=True), "JPEG")


@pytest.fixture(scope="module")
def hostile_app(tiny_bundle: Path):
    from pneumoscan.web import create_app

    return create_app({"TESTING": True, "MODEL_DIR": str(tiny_bundle), "MAX_FILES": 8,
                       "MAX_CONTENT_LENGTH": 4 * 1024 * 1024, "WTF_CSRF_ENABLED": False})


@pytest.fixture()
def no_disk_writes(monkeypatch):
    """Fails the test if anything opens a file for writing or makes a temporary file."""
    writes: list[str] = []
    real_open = builtins.open

    def guarded_open(file, mode="r", *args, **kwargs):
        if any(flag in mode for flag in "wax+"):
            writes.append(str(file))
        return real_open(file, mode, *args, **kwargs)

    def refuse(*args, **kwargs):
        writes.append("tempfile")
        raise AssertionError("a temporary file was created while handling an upload")

    monkeypatch.setattr(builtins, "open", guarded_open)
    for name in ("TemporaryFile", "NamedTemporaryFile", "SpooledTemporaryFile", "mkstemp", "mkdtemp"):
        monkeypatch.setattr(tempfile, name, refuse)
    monkeypatch.setattr("werkzeug.formparser.SpooledTemporaryFile", refuse, raising=False)
    yield writes
    assert writes == [], f"files written during requests: {writes}"


def _post(client, files, **fields):
    return client.post("/api/v1/predict", data={"file": [(io.BytesIO(d), n) for n, d in files], **fields},
                       content_type="multipart/form-data")


def _assert_still_serving(client) -> None:
    response = _post(client, [("good.jpg", GOOD)])
    assert response.status_code == 200
    (result,) = response.get_json()["results"]
    assert result["status"] == "ok" and result["label"] == ("PNEUMONIA" if result["probability_pneumonia"]
                                                            >= result["threshold"] else "NORMAL")


@pytest.mark.parametrize(("name", "data", "expected"), HOSTILE, ids=[case[0] for case in HOSTILE])
def test_hostile_file_through_the_api(hostile_app, no_disk_writes, name: str, data: bytes, expected: set[str]) -> None:
    client = hostile_app.test_client()
    response = _post(client, [(name, data)])
    assert response.mimetype == "application/json"
    body = response.get_json()
    (result,) = body["results"]
    outcome = result["error"]["code"] if result["status"] == "error" else result["status"]
    assert outcome in expected, f"{name}: got {outcome}: {result}"
    if result["status"] == "error":
        assert 400 <= response.status_code < 500 and body["error"]["code"] == outcome
        assert name in result["error"]["message"] and "Traceback" not in result["error"]["message"]
    else:
        assert response.status_code == 200
    _assert_still_serving(client)


REQUESTS = {
    "no file field": dict(data={"operating_point": "balanced"}, content_type="multipart/form-data"),
    "multipart without boundary": dict(data=b"--x\r\n\r\n", content_type="multipart/form-data"),
    "garbage multipart": dict(data=b"--b\r\nnot a header\r\n\r\nzzz", content_type="multipart/form-data; boundary=b"),
    "empty filename and content": dict(data={"file": (io.BytesIO(b""), "")}, content_type="multipart/form-data"),
    "file in another field": dict(data={"image": (io.BytesIO(GOOD), "x.jpg")}, content_type="multipart/form-data"),
}


@pytest.mark.parametrize("label", list(REQUESTS))
def test_malformed_requests_are_json_400(hostile_app, no_disk_writes, label: str) -> None:
    client = hostile_app.test_client()
    response = client.post("/api/v1/predict", **REQUESTS[label])
    assert response.status_code == 400 and response.mimetype == "application/json"
    assert response.get_json()["error"]["code"] in ("missing_file", "bad_request")
    _assert_still_serving(client)


NOT_MULTIPART = {
    "json body": dict(data=json.dumps({"file": "aGVsbG8="}), content_type="application/json"),
    "text body": dict(data="file=xray.jpg", content_type="text/plain"),
    "no content type": dict(data=b"\xff\xd8\xff" * 100),
    "urlencoded": dict(data="file=" + "A" * 1_000_000, content_type="application/x-www-form-urlencoded"),
}


@pytest.mark.parametrize("label", list(NOT_MULTIPART))
def test_bodies_that_are_not_multipart_are_refused_unread(hostile_app, no_disk_writes, monkeypatch,
                                                          label: str) -> None:
    """415 before a byte of the body is read: a 20 MB urlencoded body cost +0.9 GB before."""
    from werkzeug.wrappers import Request

    def never(self, *args, **kwargs):
        raise AssertionError("the body was parsed")

    monkeypatch.setattr(Request, "_load_form_data", never)
    client = hostile_app.test_client()
    response = client.post("/api/v1/predict", **NOT_MULTIPART[label])
    assert response.status_code == 415 and response.get_json()["error"]["code"] == "unsupported_media_type"
    assert "multipart/form-data" in response.get_json()["error"]["message"]
    monkeypatch.undo()
    _assert_still_serving(client)


def test_many_fields_with_one_file_name_the_field_limit(hostile_app, no_disk_writes) -> None:
    client = hostile_app.test_client()
    response = _post(client, [("x.jpg", GOOD)], **{f"field{i}": "1" for i in range(1000)})
    assert response.status_code == 413 and response.get_json()["error"]["code"] == "too_many_parts"
    assert "8 other fields" in response.get_json()["error"]["message"]
    _assert_still_serving(client)


def test_a_broken_body_stream_is_a_400_not_a_500(hostile_app) -> None:
    """What gunicorn raises for a malformed chunked body (a real server: test_web.py)."""
    from gunicorn.http.errors import InvalidChunkSize

    class BrokenChunks(io.BytesIO):
        def read(self, *args):
            raise InvalidChunkSize(b"zz")

        readline = read

    client = hostile_app.test_client()
    body = b"--b\r\nContent-Disposition: form-data; name=\"file\"; filename=\"x.jpg\"\r\n\r\n"
    response = client.post("/api/v1/predict", data=body, content_type="multipart/form-data; boundary=b",
                           environ_overrides={"wsgi.input": BrokenChunks(body)})
    assert response.status_code == 400 and response.get_json()["error"]["code"] == "malformed_body"
    _assert_still_serving(client)


@pytest.mark.parametrize(("fields", "status", "code"), [
    ({"threshold": "nan"}, 400, "invalid_threshold"),  # one status and code for every bad threshold
    ({"threshold": "1e309"}, 400, "invalid_threshold"),
    ({"threshold": "-0.1"}, 400, "invalid_threshold"),
    ({"threshold": "half"}, 400, "invalid_threshold"),
    ({"operating_point": "../../etc/passwd"}, 400, "config_error"),
    ({"operating_point": ["balanced", "nonsense"]}, 200, None),  # duplicate field: the first counts
    ({"explain": ["true", "false"]}, 200, None),
])
def test_bad_and_duplicate_fields(hostile_app, no_disk_writes, fields: dict, status: int, code: str | None) -> None:
    client = hostile_app.test_client()
    response = _post(client, [("x.jpg", GOOD)], **fields)
    assert response.status_code == status
    if code:
        assert response.get_json()["error"]["code"] == code
    _assert_still_serving(client)


def test_too_many_and_too_large(hostile_app, no_disk_writes) -> None:
    client = hostile_app.test_client()
    nine = _post(client, [(f"{i}.jpg", GOOD) for i in range(9)])
    assert nine.status_code == 413 and nine.get_json()["error"]["code"] == "too_many_files"
    swarm = _post(client, [(f"{i}.jpg", b"x") for i in range(10_000)])
    assert swarm.status_code == 413 and swarm.get_json()["error"]["code"] == "too_many_parts"
    huge = _post(client, [("big.jpg", b"\xff\xd8\xff" + b"\x00" * (5 * 1024 * 1024))])
    assert huge.status_code == 413 and huge.get_json()["error"]["code"] == "payload_too_large"
    _assert_still_serving(client)


@pytest.mark.parametrize(("filename", "shown"), [
    ("../../../etc/passwd.jpg", "passwd.jpg"),
    ("a\x00b\x07c\x1b.jpg", "abc.jpg"),
    ("\u202eexe.jpg", "exe.jpg"),
    ("x" * 5000 + ".jpg", "x" * 255),
    ("..", "upload"),
])
def test_file_names_are_reduced_to_a_safe_base_name(hostile_app, no_disk_writes, filename: str, shown: str) -> None:
    response = _post(hostile_app.test_client(), [(filename, GOOD)])
    assert response.status_code == 200
    assert response.get_json()["results"][0]["filename"] == shown


def test_a_line_break_in_a_file_name_is_a_bad_request(hostile_app) -> None:
    response = _post(hostile_app.test_client(), [("a\r\nSet-Cookie: x.jpg", GOOD)])
    assert response.status_code == 400 and response.mimetype == "application/json"
    assert "Set-Cookie" not in response.headers


def test_wrong_methods_and_odd_request_ids(hostile_app) -> None:
    client = hostile_app.test_client()
    for method in ("get", "put", "delete"):
        response = getattr(client, method)("/api/v1/predict")
        assert response.status_code == 405 and response.mimetype == "application/json"
    response = client.get("/healthz", headers={"X-Request-ID": "x" * 500})
    assert len(response.headers["X-Request-ID"]) == 32  # too long: replaced, not echoed
    _assert_still_serving(client)


def test_hostile_files_through_the_cli(tiny_bundle: Path, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from pneumoscan.cli import app

    folder = tmp_path / "hostile"
    folder.mkdir()
    for name, data, _ in HOSTILE:
        (folder / name).write_bytes(data)
    (folder / "good.jpg").write_bytes(GOOD)
    result = CliRunner().invoke(app, ["predict", "--model", str(tiny_bundle), str(folder),
                                      "--csv", str(tmp_path / "out.csv")])
    assert result.exit_code == 1, result.output  # some files unreadable: reported, not a crash
    assert "Traceback" not in result.output and result.exception is None or isinstance(result.exception, SystemExit)
    import csv

    rows = {Path(row["path"]).name: row for row in csv.DictReader((tmp_path / "out.csv").open())}
    predicted = {name for name, row in rows.items() if row["status"] != "error"}
    assert rows["good.jpg"]["status"] == "ok"
    from pneumoscan.data import IMAGE_SUFFIXES

    # the CLI looks at image suffixes only (a .gif or .svg in a folder is not an X-ray to read)
    refused = {name for name, _, expected in HOSTILE
               if not expected & {"ok", "rejected"} and Path(name).suffix in IMAGE_SUFFIXES}
    assert len(refused) >= 25
    assert not refused & predicted
    for name in refused:
        assert name in result.output and rows[name]["status"] == "error" and rows[name]["reasons"]


def test_a_large_upload_stays_in_memory(hostile_app, no_disk_writes) -> None:
    """werkzeug spools uploads over 500 kB to a temporary file unless the app keeps them in memory."""
    import numpy as np
    from PIL import Image

    noise = Image.fromarray(np.random.default_rng(1).integers(0, 255, (1400, 1400), dtype=np.uint8))
    big = image_bytes(noise, "JPEG")
    assert len(big) > 1024 * 1024
    response = _post(hostile_app.test_client(), [("big.jpg", big)])
    assert response.status_code == 200 and response.get_json()["results"][0]["status"] in ("ok", "rejected")


def test_an_upload_that_outlasts_the_request_timeout_gets_408(tiny_bundle: Path) -> None:
    from pneumoscan.web import create_app

    app = create_app({"TESTING": True, "MODEL_DIR": str(tiny_bundle), "REQUEST_TIMEOUT": 1e-9})
    response = _post(app.test_client(), [("x.jpg", GOOD)])
    assert response.status_code == 408 and response.get_json()["error"]["code"] == "request_timeout"
    assert response.headers["Connection"] == "close"
    # the real server's slow-loris case: tests/test_web.py::test_pneumoscan_serve_runs_gunicorn_and_answers
