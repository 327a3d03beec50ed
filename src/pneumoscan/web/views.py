"""Server-rendered pages: the upload page and its results, and the health check."""

from __future__ import annotations

from flask import Blueprint, render_template

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
