"""JSON API, mounted at ``/api/v1``."""

from __future__ import annotations

from flask import Blueprint, jsonify

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
    body = {"results": results}
    if status != 200:
        body["error"] = results[0]["error"]
    return jsonify(body), status


@bp.get("/model")
def model_info():
    """The loaded model's name, backbone, threshold and validation metrics."""
    spec = predictor().spec
    return jsonify({"name": spec.name, "backbone": spec.backbone, "input_size": spec.input_size,
                    "class_names": list(spec.class_names), "threshold": spec.threshold,
                    "threshold_source": spec.threshold_source, "weights_sha256": spec.weights_sha256,
                    "val_metrics": spec.val_metrics, "created": spec.created})
