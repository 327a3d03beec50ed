"""The Flask web app and JSON API (application factory).

Serve with ``pneumoscan serve`` (gunicorn). The web layer calls :mod:`pneumoscan.inference`
only; it never imports training code or Lightning.
"""

from __future__ import annotations

import io
import re
import secrets
import uuid
from typing import Any, Mapping

from flask import Flask, Request, g, jsonify, render_template, request
from flask_wtf.csrf import CSRFProtect
from PIL import Image
from werkzeug.exceptions import HTTPException

from pneumoscan.errors import PneumoscanError
from pneumoscan.inference import Predictor
from pneumoscan.audit import AuditLog
from pneumoscan.web.config import load_config
from pneumoscan.web.deadline import install_upload_deadline
from pneumoscan.web.metrics import install_metrics
from pneumoscan.web.security import install_security


def create_app(test_config: Mapping[str, Any] | None = None) -> Flask:
    """Build the app: defaults, then ``PNEUMOSCAN_*`` environment variables, then ``test_config``.

    The model bundle is loaded (and its sha256 checked) here, once per process.

    Raises:
        BundleError: the configured bundle cannot be loaded.
        ConfigError: a setting is invalid, or the audit log cannot be opened.
    """
    app = Flask(__name__)
    app.config.update(load_config(test_config))
    _register_request_ids(app)  # first: every later hook and error has the id
    install_upload_deadline(app)
    # werkzeug stops parsing beyond this many parts: 10,000 tiny files cost nothing to refuse
    app.config["MAX_FORM_PARTS"] = app.config["MAX_FILES"] + FORM_FIELDS
    app.config["MAX_FORM_MEMORY_SIZE"] = 100_000  # bytes per non-file field (the form has a few short ones)
    _refuse_unparseable_bodies(app)  # before the CSRF check, which would read the form
    app.request_class = InMemoryRequest
    if not app.config.get("SECRET_KEY"):
        app.config["SECRET_KEY"] = secrets.token_hex(32)
    predictor = Predictor.from_bundle(app.config["MODEL_DIR"], backend=app.config["BACKEND"],
                                      allow_torch_fallback=app.config["ALLOW_TORCH_FALLBACK"],
                                      expected_digest=app.config["MODEL_SHA256"])  # checks every file
    # One warm-up inference before /readyz says yes: the first real request pays no start-up cost.
    predictor.predict([Image.new("L", (predictor.spec.input_size,) * 2)])
    app.extensions["pneumoscan"] = predictor
    app.extensions["pneumoscan_audit"] = AuditLog(app.config["AUDIT_LOG"]) if app.config["AUDIT_LOG"] else None
    app.extensions["pneumoscan_metrics"] = install_metrics(app)
    app.extensions["pneumoscan_ready"] = True

    from pneumoscan.web import api, docs, views

    csrf = CSRFProtect()
    csrf.exempt(api.bp)
    install_security(app, csrf)
    app.register_blueprint(views.bp)
    app.register_blueprint(api.bp, url_prefix="/api/v1")
    app.register_blueprint(docs.bp)
    _register_error_handlers(app)

    from pneumoscan.card import model_card

    card = model_card(predictor.spec)

    @app.context_processor
    def model_facts() -> dict[str, Any]:
        # every page says who the model was trained on, and says so when nothing is refused
        return {"ungated": predictor.gate is None, "population": card["population"]}

    return app


_REQUEST_ID = re.compile(r"^[A-Za-z0-9._-]{1,128}$")
#: Non-file form fields a request may carry besides its files (the page's form sends 4).
FORM_FIELDS = 8
#: The page's small url-encoded forms (an API key and a CSRF token), and their largest body.
SMALL_FORMS = frozenset({"/login", "/logout"})
SMALL_FORM_BYTES = 4096


def _refuse_unparseable_bodies(app: Flask) -> None:
    """A POST whose body is not multipart/form-data is refused before any of it is read: a 20 MB
    urlencoded body would otherwise be read and parsed whole (+0.9 GB) only to lack a file."""

    @app.before_request
    def require_multipart():
        if request.path in SMALL_FORMS and request.mimetype == "application/x-www-form-urlencoded":
            if request.content_length is None or request.content_length > SMALL_FORM_BYTES:
                return _error(413, "payload_too_large", f"the sign-in form takes at most {SMALL_FORM_BYTES} bytes")
            return None
        if request.method == "POST" and request.mimetype != "multipart/form-data":
            return _error(415, "unsupported_media_type",
                          f"send images as multipart/form-data in the field 'file', not as {request.mimetype or 'a body without a Content-Type'}")
        return None


class InMemoryRequest(Request):
    """Uploaded files stay in memory: werkzeug would spool those over 500 kB to a temporary file.

    MAX_CONTENT_LENGTH bounds what a request can hold in memory.
    """

    def _get_file_stream(self, total_content_length, content_type, filename=None, content_length=None):
        return io.BytesIO()


def _register_request_ids(app: Flask) -> None:
    """Every response carries X-Request-ID: the caller's (if well-formed) or a new one."""

    @app.before_request
    def assign_request_id() -> None:
        incoming = request.headers.get("X-Request-ID", "")
        g.request_id = incoming if _REQUEST_ID.match(incoming) else uuid.uuid4().hex

    @app.after_request
    def add_request_id(response):
        response.headers["X-Request-ID"] = g.get("request_id") or uuid.uuid4().hex
        return response


def _wants_json() -> bool:
    return request.path.startswith("/api/") or request.accept_mimetypes.best == "application/json"


def _error(status: int, code: str, message: str):
    if _wants_json():
        return jsonify({"error": {"code": code, "message": message}}), status
    return render_template("error.html", status=status, message=message), status


def _register_error_handlers(app: Flask) -> None:
    @app.errorhandler(PneumoscanError)
    def user_error(exc: PneumoscanError):
        response = app.make_response(_error(exc.http_status, exc.code, str(exc)))
        if getattr(exc, "retry_after", None):
            response.headers["Retry-After"] = str(exc.retry_after)
        return response

    @app.errorhandler(413)
    def too_large(exc: HTTPException):
        limit = app.config["MAX_CONTENT_LENGTH"]
        if request.content_length is not None and request.content_length <= limit:
            # within the byte limit, so werkzeug stopped at MAX_FORM_PARTS or MAX_FORM_MEMORY_SIZE:
            # which parts were files is unknown once parsing stops, so the message names both limits
            return _error(413, "too_many_parts",
                          f"too many parts in one request, or a form field over "
                          f"{app.config['MAX_FORM_MEMORY_SIZE'] // 1000} kB: the limit is "
                          f"{app.config['MAX_FILES']} files and {FORM_FIELDS} other fields")
        return _error(413, "payload_too_large", f"the upload is larger than the limit of {limit / 1e6:g} MB"
                      if limit >= 1e6 else f"the upload is larger than the limit of {limit} bytes")

    @app.errorhandler(HTTPException)
    def http_error(exc: HTTPException):
        return _error(exc.code or 400, (exc.name or "error").lower().replace(" ", "_"),
                      exc.description or exc.name)

    @app.errorhandler(Exception)
    def unexpected(exc: Exception):  # never a stack trace or a bare 500 page
        app.logger.exception("unexpected error")
        return _error(500, "internal_error", "the server could not process this request")
