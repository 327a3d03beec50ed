"""The Flask web app and JSON API (application factory).

Serve with ``pneumoscan serve`` (gunicorn). The web layer calls :mod:`pneumoscan.inference`
only; it never imports training code or Lightning.
"""

from __future__ import annotations

import secrets
from typing import Any, Mapping

from flask import Flask, jsonify, render_template, request
from werkzeug.exceptions import HTTPException

from pneumoscan.errors import PneumoscanError
from pneumoscan.inference import Predictor

DEFAULTS: dict[str, Any] = {
    "MODEL_DIR": None,  # None: the bundled default model
    "MAX_CONTENT_LENGTH": 20 * 1024 * 1024,  # bytes per request
    "MAX_FILES": 32,  # files per request
}


def create_app(test_config: Mapping[str, Any] | None = None) -> Flask:
    """Build the app: defaults, then ``PNEUMOSCAN_*`` environment variables, then ``test_config``.

    The model bundle is loaded (and its sha256 checked) here, once per process.

    Raises:
        BundleError: the configured bundle cannot be loaded.
    """
    app = Flask(__name__)
    app.config.from_mapping(DEFAULTS)
    app.config.from_prefixed_env("PNEUMOSCAN")
    if test_config is not None:
        app.config.update(test_config)
    if not app.config.get("SECRET_KEY"):
        app.config["SECRET_KEY"] = secrets.token_hex(32)
    app.extensions["pneumoscan"] = Predictor.from_bundle(app.config["MODEL_DIR"])

    from pneumoscan.web import api, views

    app.register_blueprint(views.bp)
    app.register_blueprint(api.bp, url_prefix="/api/v1")
    _register_error_handlers(app)
    return app


def _wants_json() -> bool:
    return request.path.startswith("/api/") or request.accept_mimetypes.best == "application/json"


def _error(status: int, code: str, message: str):
    if _wants_json():
        return jsonify({"error": {"code": code, "message": message}}), status
    return render_template("error.html", status=status, message=message), status


def _register_error_handlers(app: Flask) -> None:
    @app.errorhandler(PneumoscanError)
    def user_error(exc: PneumoscanError):
        return _error(exc.http_status, exc.code, str(exc))

    @app.errorhandler(413)
    def too_large(exc: HTTPException):
        limit = app.config["MAX_CONTENT_LENGTH"]
        return _error(413, "payload_too_large",
                      f"the upload is larger than the limit of {limit // (1024 * 1024)} MB")

    @app.errorhandler(HTTPException)
    def http_error(exc: HTTPException):
        return _error(exc.code or 400, (exc.name or "error").lower().replace(" ", "_"),
                      exc.description or exc.name)

    @app.errorhandler(Exception)
    def unexpected(exc: Exception):  # never a stack trace or a bare 500 page
        app.logger.exception("unexpected error")
        return _error(500, "internal_error", "the server could not process this request")
