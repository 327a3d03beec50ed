"""Web security: response headers, CSRF for the upload form, optional API keys and rate limits.

API keys (``PNEUMOSCAN_API_KEYS``, comma-separated) and the rate limit (``PNEUMOSCAN_RATE_LIMIT``,
e.g. ``60/minute``) are off by default, for local use. The JSON API is exempt from CSRF: it
reads no cookies, so a forged cross-site request carries no credentials.
"""

from __future__ import annotations

import hmac

from flask import Flask, g, request
from flask_wtf.csrf import CSRFProtect

from pneumoscan.errors import PneumoscanError

#: Scripts and styles only from this origin (no inline script); images also from data: URLs
#: (the Grad-CAM overlays); the page may not be framed.
CONTENT_SECURITY_POLICY = ("default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
                           "img-src 'self' data:; object-src 'none'; base-uri 'none'; form-action 'self'; "
                           "frame-ancestors 'none'")
SECURITY_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cross-Origin-Opener-Policy": "same-origin",
    "Permissions-Policy": "camera=(), microphone=(), geolocation=()",
}
#: Open without a key even when keys are configured: the API's own description, and the docs
#: page that renders it (its "Authorize" button takes the key for "Try it out").
PUBLIC_API_PATHS = frozenset({"/api/v1/openapi.json", "/api/docs"})
PUBLIC_API_PREFIXES = ("/api/docs/assets/",)


class Unauthorized(PneumoscanError):
    """An API request without a valid key."""

    code = "unauthorized"
    http_status = 401


def _presented_key() -> str:
    header = request.headers.get("Authorization", "")
    if header.lower().startswith("bearer "):
        return header[7:].strip()
    return request.headers.get("X-API-Key", "").strip()


def install_security(app: Flask, csrf: CSRFProtect) -> None:
    """Headers on every response, CSRF on the form, and the optional API keys and rate limit."""
    keys = [k.strip() for k in str(app.config.get("API_KEYS") or "").split(",") if k.strip()]
    app.extensions["pneumoscan_api_keys"] = keys
    csrf.init_app(app)

    @app.before_request
    def require_api_key() -> None:
        if (not keys or not request.path.startswith("/api/") or request.path in PUBLIC_API_PATHS
                or request.path.startswith(PUBLIC_API_PREFIXES)):
            return
        presented = _presented_key().encode()
        # compare_digest against every key: the time taken does not reveal how much matched
        matches = [i for i, key in enumerate(keys) if hmac.compare_digest(presented, key.encode())]
        if not matches:
            raise Unauthorized("a valid API key is required: send 'Authorization: Bearer KEY' or 'X-API-Key: KEY'")
        g.api_key_id = matches[0]  # the key's position, never the key itself, names the client

    @app.after_request
    def add_security_headers(response):
        for header, value in SECURITY_HEADERS.items():
            response.headers.setdefault(header, value)
        if request.method == "POST":  # results about patients are not kept in caches
            response.headers["Cache-Control"] = "no-store"
        return response

    limit = app.config.get("RATE_LIMIT")
    if limit:
        from flask_limiter import Limiter
        from flask_limiter.util import get_remote_address

        def client_key() -> str:
            # with API keys, each key gets its own budget; otherwise each client address
            return f"key:{g.api_key_id}" if "api_key_id" in g else get_remote_address()

        Limiter(client_key, app=app, default_limits=[limit], storage_uri="memory://",
                default_limits_exempt_when=lambda: request.path in ("/healthz", "/readyz", "/metrics")
                or request.path.startswith("/static/"))

