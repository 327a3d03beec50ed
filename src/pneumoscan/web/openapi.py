"""The OpenAPI 3.0 description of the JSON API, served at ``/api/v1/openapi.json``.

Written by hand (the API is small) and checked against the running app by schemathesis in the
tests, so the two cannot drift apart silently.
"""

from __future__ import annotations

from typing import Any

from pneumoscan import __version__

_ERROR = {
    "type": "object",
    "required": ["error"],
    "properties": {"error": {"type": "object", "required": ["code", "message"],
                             "properties": {"code": {"type": "string"}, "message": {"type": "string"}}}},
}

_RESULT = {
    "type": "object",
    "required": ["filename", "status"],
    "properties": {
        "filename": {"type": "string"},
        "status": {"type": "string", "enum": ["ok", "rejected", "error"]},
        "image_sha256": {"type": "string", "pattern": "^[0-9a-f]{64}$"},
        "label": {"type": "string"},
        "probability_pneumonia": {"type": "number", "minimum": 0, "maximum": 1,
                                  "description": "Calibrated (temperature-scaled on validation)."},
        "threshold": {"type": "number", "minimum": 0, "maximum": 1},
        "operating_point": {"type": "string"},
        "reasons": {"type": "array", "items": {"type": "string"},
                    "description": "Why the input gate refused the image (status 'rejected')."},
        "messages": {"type": "array", "items": {"type": "string"},
                     "description": "The gate's reasons in words (rejected, or ok with outside_gate)."},
        "ood_distance": {"type": "number", "description": "The gate's feature distance, when it matters "
                                                          "(out of distribution, or near the limit)."},
        "ood_limit": {"type": "number", "description": "The gate's distance limit."},
        "review_recommended": {"type": "boolean", "description": "A person should review this answer: "
                               "the probability is inside the review band, the film is near or beyond the "
                               "gate's limit, or it was analysed with force=true although the gate refused it."},
        "review_reasons": {"type": "array", "items": {"type": "string", "enum": [
            "uncertain_probability", "near_gate_limit", "outside_gate"]}},
        "outside_gate": {"type": "boolean", "description": "Analysed with force=true although the gate refused it."},
        "gate_reasons": {"type": "array", "items": {"type": "string"},
                         "description": "What the gate would have refused it for (with outside_gate)."},
        "gradcam_png": {"type": "string", "format": "byte",
                        "description": "Base64 PNG: the heatmap over the film at its own aspect ratio, 512 px wide."},
        "gradcam_central_share": {"type": "number", "minimum": 0, "maximum": 1,
                                  "description": "Share of the heatmap inside the central chest box (descriptive)."},
        "explain_error": {"type": "string", "description": "Why no heatmap could be drawn (e.g. a bundle "
                                                           "exported without a CAM output, served without PyTorch)."},
        "error": _ERROR["properties"]["error"],
    },
}


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


#: Which model answered, and whether an input gate stood in front of it.
_MODEL_BLOCK = {"type": "object", "required": ["name", "weights_sha256", "gated"],
                "properties": {"name": {"type": "string"}, "weights_sha256": {"type": "string"},
                               "gated": {"type": "boolean", "description": "false: this bundle has no input gate, "
                                         "so nothing far from its training films is refused"}}}


def openapi_spec(*, operating_points: list[str], max_files: int, max_bytes: int,
                 api_keys: bool = False) -> dict[str, Any]:
    """The spec for one app: its model's operating points, its configured limits, and (when the
    app requires API keys) the two ways to send one."""
    errors = {
        "400": _json(_ERROR, "Malformed request (no file field, a broken chunked body) or a bad option "
                             "(threshold, operating point)."),
        "408": _json(_ERROR, "The body did not arrive within the request deadline."),
        "413": _json(_ERROR, f"Upload over {max_bytes} bytes, more than {max_files} files or too many other "
                             "fields, or every image over the pixel or decoding-memory limit."),
        "415": _json(_ERROR, "The body is not multipart/form-data, or no file is a JPEG, PNG or DICOM image."),
        "422": _json(_ERROR, "Every file is corrupt."),
        "503": _json(_ERROR, "The server could not decode the images within the request deadline (busy); "
                             "retry after the Retry-After seconds."),
    }
    spec: dict[str, Any] = {
        "openapi": "3.0.3",
        "info": {"title": "pneumoscan API", "version": __version__,
                 "description": "Pneumonia detection on paediatric chest X-rays. Research use only, "
                                "not for clinical diagnosis."},
        "paths": {
            "/api/v1/predict": {"post": {
                "operationId": "predict",
                "summary": "Classify one or more chest X-rays (JPEG, PNG or DICOM).",
                "requestBody": {"required": True, "content": {"multipart/form-data": {
                    "schema": {
                        "type": "object", "required": ["file"],
                        "properties": {
                            "file": {"type": "array", "minItems": 1, "maxItems": max_files,
                                     "items": {"type": "string", "format": "binary"},
                                     "description": f"One or more images (JPEG, PNG or DICOM), one part per file, "
                                                    f"at most {max_files}."},
                            "operating_point": {"type": "string", "enum": operating_points},
                            "threshold": {"type": "number", "minimum": 0, "maximum": 1},
                            "explain": {"type": "boolean", "description": "Add a Grad-CAM overlay."},
                            "force": {"type": "boolean", "description": "Analyse images the input gate refuses; "
                                      "they come back ok with outside_gate and review_recommended."},
                        },
                    }}}},
                "responses": {
                    "200": _json({"type": "object", "required": ["results", "model"],
                                  "properties": {"results": {"type": "array", "items": _RESULT},
                                                 "model": _MODEL_BLOCK}},
                                 "One result per file; at least one file was an image."),
                    **errors,
                },
            }},
            "/api/v1/model": {"get": {
                "operationId": "modelCard",
                "summary": "The loaded model's card: identity, data, intended use, metrics with CIs.",
                "responses": {"200": _json({"type": "object", "required": ["name", "weights_sha256", "metrics"]},
                                           "The model card.")},
            }},
            "/api/v1/openapi.json": {"get": {
                "operationId": "openapi", "summary": "This document.",
                "responses": {"200": _json({"type": "object"}, "OpenAPI 3.0 document.")},
            }},
            "/healthz": {"get": {
                "operationId": "healthz", "summary": "The process is alive.",
                "responses": {"200": _json({"type": "object"}, "Alive.")},
            }},
            "/readyz": {"get": {
                "operationId": "readyz", "summary": "Model loaded, verified and warmed up.",
                "responses": {"200": _json({"type": "object"}, "Ready."),
                              "503": _json({"type": "object"}, "Still loading.")},
            }},
            "/metrics": {"get": {
                "operationId": "metrics", "summary": "Prometheus metrics.",
                "responses": {"200": {"description": "Prometheus text format.",
                                      "content": {"text/plain": {"schema": {"type": "string"}}}}},
            }},
        },
    }
    if api_keys:
        spec["components"] = {"securitySchemes": {
            "bearer": {"type": "http", "scheme": "bearer"},
            "apiKeyHeader": {"type": "apiKey", "in": "header", "name": "X-API-Key"}}}
        for path in ("/api/v1/predict", "/api/v1/model"):
            for operation in spec["paths"][path].values():
                operation["security"] = [{"bearer": []}, {"apiKeyHeader": []}]
                operation["responses"]["401"] = _json(_ERROR, "No valid API key.")
    return spec
