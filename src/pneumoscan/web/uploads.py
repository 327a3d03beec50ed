"""Turn the files of one request into per-file results. Uploads stay in memory."""

from __future__ import annotations

import base64
import hashlib
import math
from typing import Any

from flask import current_app, g, request
from PIL import Image

from pneumoscan.errors import InvalidImageError, PneumoscanError
from pneumoscan.gate import describe_reason
from pneumoscan.heatmap import DISPLAY_WIDTH, display_image, heatmap, overlay, png_bytes
from pneumoscan.imaging import JPEG_SIGNATURE, decode_image
from pneumoscan.inference import Predictor
from pneumoscan.audit import AuditUnavailable
from pneumoscan.web.deadline import decode_slot


class UploadError(PneumoscanError):
    """The request itself is unusable (no file field, too many files)."""

    def __init__(self, message: str, *, code: str = "bad_request", http_status: int = 400) -> None:
        super().__init__(message)
        self.code = code
        self.http_status = http_status


def predictor() -> Predictor:
    """The app's loaded Predictor."""
    return current_app.extensions["pneumoscan"]


def _float_or_none(value: str | None) -> float | None:
    """The ``threshold`` field: absent, or a number in [0, 1]. Every bad value is one 400 error,
    whether it is not a number ("half") or not a usable one ("nan", "1e309", "-0.1")."""
    if value in (None, ""):
        return None
    try:
        number = float(value)
    except ValueError:
        number = math.nan
    if not 0.0 <= number <= 1.0:  # also false for nan
        raise UploadError(f"threshold must be a number between 0 and 1, got {value[:40]!r}",
                          code="invalid_threshold", http_status=400)
    return number


def _safe_name(filename: str | None) -> str:
    """The upload's base name, without directories or control characters, at most 255 characters."""
    base = (filename or "").replace("\\", "/").rsplit("/", 1)[-1]
    cleaned = "".join(ch for ch in base if ch.isprintable())[:255].strip()
    return cleaned if cleaned not in ("", ".", "..") else "upload"


def _png_base64(image: Image.Image) -> str:
    return base64.b64encode(png_bytes(image)).decode()


#: Longest side of a refused film's thumbnail on the page.
THUMBNAIL_SIDE = 160


def _flag(name: str) -> bool:
    return request.values.get(name, "").lower() in ("1", "true", "yes", "on")


def _gate_words(result, limit: float | None) -> list[str]:
    return [describe_reason(reason, distance=result.distance, limit=limit) for reason in result.reasons]


def _gate_distance(result, limit: float | None) -> dict[str, float]:
    """``ood_distance`` and ``ood_limit`` when the distance is why the gate refused the film or
    why review is recommended; nothing otherwise."""
    if result.distance is None or limit is None or not {"out_of_distribution", "near_gate_limit"} & {
            *result.reasons, *result.review_reasons}:
        return {}
    return {"ood_distance": round(result.distance, 3), "ood_limit": round(limit, 3)}


def predict_uploads(*, layers: bool = False) -> list[dict[str, Any]]:
    """Predict every file in the multipart field ``file``.

    Each result has ``filename`` and ``status``: ``ok`` results add ``label``,
    ``probability_pneumonia``, ``threshold``, ``operating_point``, ``review_recommended`` and
    ``review_reasons``; ``rejected`` results (the input gate refused the image) add
    machine-readable ``reasons`` and their ``messages`` in words; ``error`` results add ``error``.
    With ``force``, the gate's refusals are analysed anyway: such results are ``ok`` and carry
    ``outside_gate: true`` with the ``gate_reasons``, and review is always recommended.
    With ``explain``, ``ok`` results add the Grad-CAM overlay on the film at its own aspect ratio;
    with ``layers`` (for the web page) they add the film and the heatmap as separate PNGs instead,
    so the page can toggle and fade the heatmap, and refused films add a thumbnail and the upload
    itself (base64), so "analyse anyway" can send it again without the server keeping it.

    Raises:
        UploadError: no ``file`` field with a file in it, or more files than MAX_FILES.
    """
    files = [f for f in request.files.getlist("file") if f and (f.filename or f.content_length)]
    if not files:
        raise UploadError("no file uploaded: send one or more images in the multipart field 'file'",
                          code="missing_file")
    limit = current_app.config["MAX_FILES"]
    if len(files) > limit:
        raise UploadError(f"{len(files)} files in one request; the limit is {limit}",
                          code="too_many_files", http_status=413)
    model = predictor()
    explain, force = _flag("explain"), _flag("force")
    limit = model.gate.threshold if model.gate is not None else None
    operating_point = request.values.get("operating_point") or None
    threshold = _float_or_none(request.values.get("threshold"))
    model.decision.threshold_for(operating_point, threshold)  # a bad choice fails the request up front
    results: list[dict[str, Any]] = []
    for upload in files:
        name = _safe_name(upload.filename)
        data = upload.read()
        digest = hashlib.sha256(data).hexdigest()
        try:
            with decode_slot():
                image = model.preprocessing.decode(data, name=name)
        except InvalidImageError as exc:
            results.append({"filename": name, "status": "error", "image_sha256": digest,
                            "error": {"code": exc.code, "message": str(exc)},
                            "http_status": exc.http_status})
            continue
        result = model.predict([image], names=[name], operating_point=operating_point, threshold=threshold,
                               gate=not force)[0]
        distance = _gate_distance(result, limit)
        if result.status == "rejected":
            entry: dict[str, Any] = {"filename": name, "status": "rejected", "image_sha256": digest,
                                     "reasons": list(result.reasons), "messages": _gate_words(result, limit),
                                     **distance}
            if layers:
                thumbnail = image.convert("RGB") if image.mode not in ("L", "RGB") else image.copy()
                thumbnail.thumbnail((THUMBNAIL_SIDE, THUMBNAIL_SIDE))
                entry["thumbnail_png"] = _png_base64(thumbnail)
                entry["upload_b64"] = base64.b64encode(data).decode()
            results.append(entry)
            continue
        entry = {
            "filename": name, "status": "ok", "image_sha256": digest, "label": result.label,
            "probability_pneumonia": round(result.probability, 6),
            "threshold": round(result.threshold, 6),
            "operating_point": result.operating_point,
            "review_recommended": result.review_recommended,
            "review_reasons": list(result.review_reasons),
        }
        if result.reasons:  # analysed although the gate refuses it (force)
            entry.update(outside_gate=True, gate_reasons=list(result.reasons), messages=_gate_words(result, limit))
        entry.update(distance)
        if explain:
            try:
                explanation = model.explain(image)
            except PneumoscanError as exc:  # e.g. a bundle without a CAM output, served without PyTorch
                entry["explain_error"] = str(exc)
                results.append(entry)
                continue
            film = display_image(_display_source(data, image, name))  # its own aspect ratio; the map stretches back
            if layers:
                entry["xray_png"] = _png_base64(film)
                entry["heatmap_png"] = _png_base64(heatmap(explanation.cam, film.size))
            else:
                entry["gradcam_png"] = _png_base64(overlay(film, explanation.cam))
            entry["gradcam_central_share"] = round(explanation.central_share, 4)
        results.append(entry)
    _account(results)
    return results


def _display_source(data: bytes, image: Image.Image, name: str) -> Image.Image:
    """The decoded film to draw a heatmap on. A large JPEG was decoded at the smallest DCT scale
    that covers the network's input (often 250-450 px); drawing that 512 px wide would be soft, so
    it is decoded once more at the scale that covers the display width, under the same limits and
    in a decoding slot. The network's input is never taken from this copy."""
    if image.width >= DISPLAY_WIDTH or not data.startswith(JPEG_SIGNATURE):
        return image
    with decode_slot():
        sharper = decode_image(data, name=name, draft_size=DISPLAY_WIDTH)
    return sharper if sharper.width > image.width else image


def _account(results: list[dict[str, Any]]) -> None:
    """Append the outcomes to the audit log when one is configured, then count them for /metrics.

    Raises:
        AuditUnavailable: the records could not be written; the results are withheld (503).
    """
    metrics = current_app.extensions["pneumoscan_metrics"]
    audit = current_app.extensions.get("pneumoscan_audit")
    if audit is not None:
        spec = predictor().spec
        try:
            audit.record(request_id=g.request_id, results=results,
                         model={"name": spec.name, "weights_sha256": spec.weights_sha256})
        except AuditUnavailable:
            metrics.audit_failures.inc()
            raise
    metrics.count_results(results)
