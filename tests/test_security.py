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


def _keyed_client(tiny_bundle: Path, **config):
    from pneumoscan.web import create_app

    return create_app({"MODEL_DIR": str(tiny_bundle), "API_KEYS": "alpha-key,beta-key", **config}).test_client()


def _token(page: str) -> str:
    return re.search(r'name="csrf_token" value="([^"]+)"', page).group(1)


def test_with_keys_on_the_page_asks_for_a_key_and_keeps_it_in_a_signed_httponly_cookie(tiny_bundle: Path) -> None:
    client = _keyed_client(tiny_bundle)
    start = client.get("/")
    assert start.status_code == 302 and start.headers["Location"].endswith("/login")
    assert client.get("/model").status_code == 302
    login = client.get("/login").get_data(as_text=True)
    # the old hole: a CSRF token from a page, then POST / without a key
    forged = client.post("/", data=_upload(csrf_token=_token(login)), content_type="multipart/form-data")
    assert forged.status_code == 401 and "P(pneumonia)" not in forged.get_data(as_text=True)
    wrong = client.post("/login", data={"csrf_token": _token(login), "api_key": "alpha-kez"})
    assert wrong.status_code == 401 and "not valid" in wrong.get_data(as_text=True)
    signed = client.post("/login", data={"csrf_token": _token(login), "api_key": "beta-key"})
    assert signed.status_code == 302
    cookie = signed.headers["Set-Cookie"]
    assert "HttpOnly" in cookie and "SameSite=Lax" in cookie and "beta-key" not in cookie
    page = client.get("/")
    assert page.status_code == 200 and "Sign out" in page.get_data(as_text=True)
    done = client.post("/", data=_upload(csrf_token=_token(page.get_data(as_text=True))),
                       content_type="multipart/form-data")
    assert done.status_code == 200 and "P(pneumonia)" in done.get_data(as_text=True)
    # the cookie is not a key for the API (which takes no CSRF token), and is signed
    assert client.get("/api/v1/model").status_code == 401
    client.post("/logout", data={"csrf_token": _token(page.get_data(as_text=True))})
    assert client.get("/").status_code == 302


def test_removing_a_key_signs_out_its_sessions(tiny_bundle: Path) -> None:
    client = _keyed_client(tiny_bundle)
    client.post("/login", data={"csrf_token": _token(client.get("/login").get_data(as_text=True)),
                                "api_key": "beta-key"})
    assert client.get("/").status_code == 200
    secret = client.application.config["SECRET_KEY"]
    rotated = _keyed_client(tiny_bundle, API_KEYS="alpha-key", SECRET_KEY=secret)
    rotated.set_cookie("session", client.get_cookie("session").value)
    assert rotated.get("/").status_code == 302


def test_metrics_need_the_key_and_wrong_keys_are_rate_limited(tiny_bundle: Path) -> None:
    client = _keyed_client(tiny_bundle, AUTH_FAILURE_LIMIT="3/minute")
    assert client.get("/metrics").status_code == 401
    assert client.get("/metrics", headers={"X-API-Key": "alpha-key"}).status_code == 200
    statuses = [client.get("/api/v1/model", headers={"X-API-Key": f"guess-{i}"}).status_code for i in range(5)]
    assert statuses == [401, 401, 401, 429, 429]
    # blocked before the comparison: even the right key waits out the window from this address
    blocked = client.get("/api/v1/model", headers={"X-API-Key": "alpha-key"})
    assert blocked.status_code == 429 and blocked.get_json()["error"]["code"] == "too_many_failed_keys"
    assert blocked.headers["Retry-After"] == "60"
    login = client.post("/login", data={"csrf_token": _token(client.get("/login").get_data(as_text=True)),
                                        "api_key": "alpha-key"})
    assert login.status_code == 429  # the sign-in form counts against the same budget
    assert client.get("/healthz").status_code == 200


@pytest.mark.parametrize("keys", ["alpha-key", ""])
def test_keys_in_the_query_string_are_refused(tiny_bundle: Path, keys: str) -> None:
    from pneumoscan.web import create_app

    client = create_app({"MODEL_DIR": str(tiny_bundle), "API_KEYS": keys}).test_client()
    for name in ("api_key", "token", "API_KEY"):
        response = client.post(f"/api/v1/predict?{name}=alpha-key", data=_upload(), content_type="multipart/form-data")
        assert response.status_code == 400 and response.get_json()["error"]["code"] == "key_in_query"
        assert "alpha-key" not in response.get_data(as_text=True)


def test_the_access_log_leaves_out_query_strings() -> None:
    from pneumoscan.web.server import ACCESS_LOG_FORMAT

    assert "%(r)s" not in ACCESS_LOG_FORMAT and "%(q)s" not in ACCESS_LOG_FORMAT and "%(U)s" in ACCESS_LOG_FORMAT
    assert "%(f)s" not in ACCESS_LOG_FORMAT  # a referrer can carry another site's query string
