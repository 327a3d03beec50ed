"""JSON API, mounted at ``/api/v1``."""

from __future__ import annotations

from flask import Blueprint, current_app, jsonify

from pneumoscan.card import model_card
from pneumoscan.web.openapi import openapi_spec
from pneumoscan.web.uploads import predict_uploads, predictor

bp = Blueprint("api", __name__)


@bp.post("/predict")
def predict():
    """Predict one or more images sent as multipart field ``file``.

    200 when at least one image got a prediction; when every file failed, the status of the
    first failure (415 not an image, 422 corrupt, 413 too many pixels) with an ``error`` object.
    """
    results = predict_uploads()
    status = 200
    if all(r["status"] == "error" for r in results):
        status = results[0]["http_status"]
    for r in results:
        r.pop("http_status", None)
    spec = predictor().spec
    body = {"results": results,
            "model": {"name": spec.name, "weights_sha256": spec.weights_sha256, "gated": predictor().gate is not None}}
    if status != 200:
        body["error"] = results[0]["error"]
    return jsonify(body), status


@bp.get("/model")
def model_info():
    """The loaded model's card: identity, data, intended use, metrics with CIs, calibration."""
    return jsonify({**model_card(predictor().spec), "bundle_digest": predictor().digest})


@bp.get("/openapi.json")
def openapi():
    """The OpenAPI 3.0 description of this API (with this app's limits and operating points)."""
    return jsonify(openapi_spec(operating_points=list(predictor().operating_points),
                                max_files=current_app.config["MAX_FILES"],
                                max_bytes=current_app.config["MAX_CONTENT_LENGTH"],
                                api_keys=bool(current_app.extensions.get("pneumoscan_api_keys"))))
