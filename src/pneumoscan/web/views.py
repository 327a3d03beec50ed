"""Server-rendered pages: the upload page and its results, and the health check."""

from __future__ import annotations

from flask import Blueprint, current_app, render_template

from pneumoscan.web.uploads import UploadError, predict_uploads, predictor

bp = Blueprint("views", __name__)


@bp.get("/")
def index():
    """The upload form."""
    return render_template("index.html", spec=predictor().spec, results=None, error=None)


@bp.post("/")
def upload():
    """Predict the uploaded files and show one result card per file."""
    try:
        results, error, status = predict_uploads(), None, 200
    except UploadError as exc:
        results, error, status = None, str(exc), exc.http_status
    return render_template("index.html", spec=predictor().spec, results=results, error=error), status


@bp.get("/healthz")
def healthz():
    """The process is alive (the model was loaded when the app was created)."""
    return {"status": "ok"}


@bp.get("/readyz")
def readyz():
    """200 once the model is loaded, its sha256 verified and one warm-up inference done."""
    if not current_app.extensions.get("pneumoscan_ready"):
        return {"status": "loading"}, 503
    spec = predictor().spec
    return {"status": "ready", "model": spec.name, "weights_sha256": spec.weights_sha256}
