"""Interactive API docs at ``/api/docs``: Swagger UI, from the installed ``swagger-ui-bundle``
package (no CDN), reading this app's ``/api/v1/openapi.json``. The page's own script is a static
file, so the Content-Security-Policy (no inline script) holds here too."""

from __future__ import annotations

from flask import Blueprint, abort, render_template, send_from_directory

bp = Blueprint("docs", __name__)

#: The only Swagger UI files the page loads.
_ASSETS = frozenset({"swagger-ui.css", "swagger-ui-bundle.js"})


@bp.get("/api/docs")
def api_docs():
    """Swagger UI over this API."""
    return render_template("api_docs.html")


@bp.get("/api/docs/assets/<name>")
def asset(name: str):
    """One of Swagger UI's files, from the package."""
    if name not in _ASSETS:
        abort(404)
    from swagger_ui_bundle import swagger_ui_path

    return send_from_directory(str(swagger_ui_path), name, max_age=3600)
