"""Web security: headers, CSRF on the form, optional API keys and rate limit, no stack traces."""

from __future__ import annotations

import io
import re
from pathlib import Path

import pytest

from conftest import image_bytes, make_xray


def _upload(**fields) -> dict:
    return {"file": [(io.BytesIO(image_bytes(make_xray(5))), "x.png")], **fields}


@pytest.fixture()
def secure_app(tiny_bundle: Path):
    from pneumoscan.web import create_app

    return create_app({"MODEL_DIR": str(tiny_bundle)})  # production defaults: CSRF on


def test_security_headers_on_pages_api_and_errors(secure_app) -> None:
    client = secure_app.test_client()
    for response in (client.get("/"), client.get("/api/v1/model"), client.get("/missing"),
                     client.post("/api/v1/predict", data={}, content_type="multipart/form-data")):
        csp = response.headers["Content-Security-Policy"]
        assert "frame-ancestors 'none'" in csp and "script-src 'self'" in csp and "unsafe-eval" not in csp
        assert response.headers["X-Content-Type-Options"] == "nosniff"
        assert response.headers["X-Frame-Options"] == "DENY"
    response = client.post("/api/v1/predict", data=_upload(), content_type="multipart/form-data")
    assert response.headers["Cache-Control"] == "no-store"


def test_the_form_needs_its_csrf_token(secure_app) -> None:
    client = secure_app.test_client()
    forged = client.post("/", data=_upload(), content_type="multipart/form-data")
    assert forged.status_code == 400 and "CSRF" in forged.get_data(as_text=True)
    assert "Traceback" not in forged.get_data(as_text=True)
    page = client.get("/").get_data(as_text=True)
    token = re.search(r'name="csrf_token" value="([^"]+)"', page).group(1)
    response = client.post("/", data=_upload(csrf_token=token), content_type="multipart/form-data")
    assert response.status_code == 200 and "P(pneumonia)" in response.get_data(as_text=True)
    # the JSON API reads no cookies and needs no token
    api = client.post("/api/v1/predict", data=_upload(), content_type="multipart/form-data")
    assert api.status_code == 200


def test_api_keys_when_configured(tiny_bundle: Path, monkeypatch) -> None:
    from pneumoscan.web import create_app

    monkeypatch.setenv("PNEUMOSCAN_API_KEYS", "alpha-key,beta-key")
    client = create_app({"MODEL_DIR": str(tiny_bundle)}).test_client()
    missing = client.post("/api/v1/predict", data=_upload(), content_type="multipart/form-data")
    assert missing.status_code == 401 and missing.get_json()["error"]["code"] == "unauthorized"
    wrong = client.get("/api/v1/model", headers={"Authorization": "Bearer alpha-kez"})
    assert wrong.status_code == 401 and "alpha" not in wrong.get_data(as_text=True)
    assert client.get("/api/v1/model", headers={"Authorization": "Bearer beta-key"}).status_code == 200
    ok = client.post("/api/v1/predict", data=_upload(), headers={"X-API-Key": "alpha-key"},
                     content_type="multipart/form-data")
    assert ok.status_code == 200 and ok.get_json()["results"][0]["status"] == "ok"
    spec = client.get("/api/v1/openapi.json")
    assert spec.status_code == 200  # the API's description stays open, and says how to send a key
    predict = spec.get_json()["paths"]["/api/v1/predict"]["post"]
    assert predict["security"] == [{"bearer": []}, {"apiKeyHeader": []}] and "401" in predict["responses"]
    # the docs page and its files stay open too (Swagger UI's Authorize button takes the key)
    assert client.get("/api/docs").status_code == 200
    assert client.get("/api/docs/assets/swagger-ui-bundle.js").status_code == 200
    assert client.get("/api/docs/assets/../v1/model").status_code in (401, 404)
    assert client.get("/healthz").status_code == 200


def test_the_openapi_document_names_no_key_scheme_when_keys_are_off(client) -> None:
    spec = client.get("/api/v1/openapi.json").get_json()
    assert "components" not in spec and "security" not in spec["paths"]["/api/v1/predict"]["post"]


def test_rate_limit_when_configured(tiny_bundle: Path) -> None:
    from pneumoscan.web import create_app

    client = create_app({"MODEL_DIR": str(tiny_bundle), "RATE_LIMIT": "3/minute"}).test_client()
    statuses = [client.get("/api/v1/model").status_code for _ in range(5)]
    assert statuses == [200, 200, 200, 429, 429]
    limited = client.get("/api/v1/model")
    assert limited.get_json()["error"]["code"] == "too_many_requests"
    assert client.get("/healthz").status_code == 200  # health checks are never limited


def test_rate_limit_is_off_by_default(secure_app) -> None:
    client = secure_app.test_client()
    assert all(client.get("/api/v1/model").status_code == 200 for _ in range(20))


def test_bad_rate_limit_setting_is_named(tiny_bundle: Path) -> None:
    from pneumoscan.errors import ConfigError
    from pneumoscan.web import create_app

    with pytest.raises(ConfigError, match="PNEUMOSCAN_RATE_LIMIT must look like"):
        create_app({"MODEL_DIR": str(tiny_bundle), "RATE_LIMIT": "lots"})


def test_unexpected_errors_show_no_stack_trace(secure_app, monkeypatch) -> None:
    def explode(*args, **kwargs):
        raise RuntimeError("secret internal detail /etc/passwd")

    monkeypatch.setattr("pneumoscan.web.api.predict_uploads", explode)
    response = secure_app.test_client().post("/api/v1/predict", data=_upload(), content_type="multipart/form-data")
    body = response.get_data(as_text=True)
    assert response.status_code == 500 and response.get_json()["error"]["code"] == "internal_error"
    assert "secret internal detail" not in body and "Traceback" not in body
    assert not secure_app.debug
