"""Web security: response headers, CSRF for the upload form, optional API keys and rate limits.

API keys (``PNEUMOSCAN_API_KEYS``, comma-separated) and the rate limit (``PNEUMOSCAN_RATE_LIMIT``,
e.g. ``60/minute``) are off by default, for local use. With keys on, everything but the health
checks, the static files and the API's description needs a key:

- the JSON API and ``/metrics`` take it in a header (``Authorization: Bearer KEY`` or
  ``X-API-Key``); they read no cookies, so the API is exempt from CSRF: a forged cross-site
  request carries no credentials;
- the pages ask for it once (``/login``) and keep a fingerprint of it in Flask's signed session
  cookie (HttpOnly, SameSite=Lax; Secure with ``PNEUMOSCAN_SESSION_COOKIE_SECURE=true`` behind
  HTTPS); removing a key from the list signs out whoever used it;
- wrong keys are rate-limited per client address (``PNEUMOSCAN_AUTH_FAILURE_LIMIT``, 10 a minute,
  counted by each worker process) before the key is even compared, whether or not a request
  rate limit is set;
- a key in the query string (``?api_key=``, ``?token=``, ...) is refused, keys on or off: URLs end
  up in logs, proxies and browser history. The access log leaves query strings out anyway.
"""

from __future__ import annotations

import hashlib
import hmac

from flask import Flask, g, redirect, request, session, url_for
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
PUBLIC_PATHS = frozenset({"/api/v1/openapi.json", "/api/docs", "/healthz", "/readyz", "/favicon.ico", "/login"})
PUBLIC_PREFIXES = ("/api/docs/assets/", "/static/")
#: Query parameters that look like a credential: refused wherever they appear.
KEY_PARAMETERS = frozenset({"api_key", "apikey", "api-key", "key", "token", "access_token", "auth"})


class Unauthorized(PneumoscanError):
    """An API request without a valid key."""

    code = "unauthorized"
    http_status = 401


class KeyInQuery(PneumoscanError):
    """A credential in the URL."""

    code = "key_in_query"
    http_status = 400


class TooManyFailedKeys(PneumoscanError):
    """This client sent too many wrong keys lately."""

    code = "too_many_failed_keys"
    http_status = 429
    retry_after = 60


def fingerprint(key: str) -> str:
    """What the session cookie holds instead of the key (signed, but readable by its holder)."""
    return hashlib.sha256(b"pneumoscan-session:" + key.encode()).hexdigest()[:32]


def _uses_header_keys() -> bool:
    return request.path.startswith("/api/") or request.path == "/metrics"


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

    failures = _FailureLimit(str(app.config["AUTH_FAILURE_LIMIT"]))
    fingerprints = [fingerprint(key) for key in keys]  # once, not per request

    @app.before_request
    def refuse_keys_in_urls() -> None:
        if KEY_PARAMETERS & {name.lower() for name in request.args}:
            raise KeyInQuery("keys are not accepted in the URL (URLs are kept in logs and browser "
                             "history): send 'Authorization: Bearer KEY' or 'X-API-Key: KEY'")

    @app.before_request
    def require_api_key():
        if not keys or request.path in PUBLIC_PATHS or request.path.startswith(PUBLIC_PREFIXES):
            return None
        if _uses_header_keys():
            presented = _presented_key()
            index = match_key(presented) if presented else None
            if index is None:
                if presented:
                    failures.hit()
                raise Unauthorized("a valid API key is required: send 'Authorization: Bearer KEY' or 'X-API-Key: KEY'")
        else:
            index = next((i for i, known in enumerate(fingerprints)
                          if hmac.compare_digest(session.get("key", ""), known)), None)
            if index is None:
                if request.method == "GET":
                    return redirect(url_for("views.login"))
                raise Unauthorized("sign in with an API key first (the page at /login asks for it)")
        g.api_key_id = index  # the key's position, never the key itself, names the client
        return None

    def match_key(presented: str) -> int | None:
        """The position of ``presented`` among the keys, or None; rate-limited per client."""
        failures.check()
        # compare_digest against every key: the time taken does not reveal how much matched
        matches = [i for i, key in enumerate(keys) if hmac.compare_digest(presented.encode(), key.encode())]
        return matches[0] if matches else None

    def sign_in(presented: str) -> bool:
        """Check a key typed into /login; on success, keep its fingerprint in the session."""
        index = match_key(presented)
        if index is None:
            failures.hit()
            return False
        session.clear()
        session["key"] = fingerprints[index]
        return True

    app.extensions["pneumoscan_sign_in"] = sign_in

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



class _FailureLimit:
    """Wrong keys per client address, in a moving window (the ``limits`` package, which
    flask-limiter is built on), counted in this process."""

    def __init__(self, limit: str) -> None:
        from limits import parse
        from limits.storage import MemoryStorage
        from limits.strategies import MovingWindowRateLimiter

        self.limit = parse(limit)
        self.window = MovingWindowRateLimiter(MemoryStorage())

    def check(self) -> None:
        if not self.window.test(self.limit, "auth-failures", request.remote_addr or "?"):
            raise TooManyFailedKeys("too many wrong keys from this address: wait a minute before trying again")

    def hit(self) -> None:
        self.window.hit(self.limit, "auth-failures", request.remote_addr or "?")
