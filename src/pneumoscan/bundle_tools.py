"""Operations that rewrite a bundle: recalibrate it, fit its input gate, record an evaluation.

Each writes a new bundle whose weights file is copied byte for byte (same sha256); only
``model.json`` and the listed extra files change.
"""

from __future__ import annotations

import tempfile
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from pneumoscan.calibration import calibrate_on_validation
from pneumoscan.data import read_split
from pneumoscan.errors import BundleError, ConfigError, DatasetError
from pneumoscan.gate import GATE_FILE, FeatureGate
from pneumoscan.inference import Predictor
from pneumoscan.models import default_bundle_path, read_spec, rewrite_bundle
from pneumoscan.models.bundle import sha256_file
from pneumoscan.spec import GateInfo

#: The share of synthetic documents and screenshots a gate must refuse before fit-gate stops warning.
SYNTHETIC_REFUSAL_TARGET = 0.99


def recalibrate_bundle(bundle_dir: Path | None, data_root: Path, out_dir: Path) -> dict[str, Any]:
    """Fit temperature and operating points on the bundle's own validation split; write a new bundle.

    Raises:
        BundleError: the bundle cannot be loaded or has no split.csv.
        DatasetError: a validation image is missing or unreadable.
    """
    bundle_dir = Path(bundle_dir or default_bundle_path())
    predictor = Predictor.from_bundle(bundle_dir)
    samples = read_split(bundle_dir, data_root)
    outcomes = predictor.predict_paths([s.path for s in samples], gate=False)
    bad = [o for o in outcomes if o.status == "error"]
    if bad:
        raise DatasetError(f"{len(bad)} validation image(s) could not be read, e.g. {bad[0].error}")
    calibration = calibrate_on_validation([s.label for s in samples], [o.log_odds for o in outcomes])
    spec = predictor.spec
    new_spec = spec.replace(decision=calibration.decision,
                            val_metrics={**spec.val_metrics, **calibration.validation_metrics()})
    rewrite_bundle(bundle_dir, new_spec, out_dir)
    return calibration.report


def record_evaluation(bundle_dir: Path | None, metrics: dict[str, Any]) -> None:
    """Store an evaluation's figures (with CIs, per operating point) in the bundle's ``model.json``
    under ``reported_metrics[split]``, where the model card shows them. Weights are untouched.

    Raises:
        BundleError: the metrics were computed with other weights than the bundle holds.
    """
    bundle_dir = Path(bundle_dir or default_bundle_path())
    spec = read_spec(bundle_dir)
    if metrics["model"]["weights_sha256"] != spec.weights_sha256:
        raise BundleError(f"these metrics belong to other weights than those in {bundle_dir}")
    keep = ("n", "n_by_class", "n_unreadable", "operating_point", "tta", "ci", "calibration", "input_gate")
    entry = {key: metrics[key] for key in keep if key in metrics}
    entry["operating_points"] = metrics["operating_points"]
    entry["dataset"] = Path(str(metrics["data"])).name
    entry["evaluated"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    reported = {**spec.reported_metrics, metrics["split"]: entry}
    rewrite_bundle(bundle_dir, spec.replace(reported_metrics=reported), bundle_dir)


def synthetic_refusals(predictor: Predictor) -> dict[str, float]:
    """How many of :mod:`pneumoscan.nonxray`'s documents and screenshots ``predictor`` refuses,
    through the same gate decision as the web app and ``predict``.

    They pass every image check, so this measures the feature gate alone. A gate is only as good
    as the features it is fitted on: fine-tuning recipes that make the network invariant to
    contrast or blur also made documents look like X-rays to it (39% refused instead of 99%),
    so every new gate is measured here before it ships.
    """
    from pneumoscan.nonxray import synthetic_non_xrays

    images = [predictor.preprocessing.decode(data, name=name) for name, data in synthetic_non_xrays().items()]
    refused = sum(r.status == "rejected" for r in predictor.predict(images))
    return {"n": len(images), "refused": int(refused), "target": SYNTHETIC_REFUSAL_TARGET}


def fit_bundle_gate(bundle_dir: Path | None, data_root: Path, out_dir: Path, *, quantile: float = 0.995,
                    batch_size: int = 32) -> GateInfo:
    """Fit the input gate's feature statistics on the bundle's own training images, its threshold
    at ``quantile`` of the validation images' distances; write a new bundle (weights unchanged).

    Raises:
        ConfigError: ``quantile`` outside (0.5, 1).
        BundleError: the bundle cannot be loaded or has no split.csv.
        DatasetError: a listed image is missing.
    """
    if not 0.5 < quantile < 1.0:
        raise ConfigError(f"--quantile must be between 0.5 and 1, got {quantile}")
    bundle_dir = Path(bundle_dir or default_bundle_path())
    predictor = Predictor.from_bundle(bundle_dir)

    def features(role: str) -> np.ndarray:
        samples = read_split(bundle_dir, data_root, role=role)
        chunks = []
        for start in range(0, len(samples), batch_size):
            batch = [predictor.preprocessing.read(s.path) for s in samples[start:start + batch_size]]
            chunks.append(predictor.forward(np.stack(batch))[1])
        return np.concatenate(chunks)

    train_features, val_features = features("train"), features("val")
    gate = FeatureGate.fit(train_features, val_features, quantile=quantile)
    predictor.gate = gate  # this local predictor now stands for the gated bundle being written
    with tempfile.TemporaryDirectory() as tmp:
        gate_path = Path(tmp) / GATE_FILE
        gate.save(gate_path)
        info = GateInfo(file=GATE_FILE, sha256=sha256_file(gate_path), threshold=round(gate.threshold, 6),
                        quantile=quantile,
                        method="mahalanobis, Ledoit-Wolf covariance of pooled backbone features",
                        n_train=int(len(train_features)), n_val=int(len(val_features)))
        info = replace(info, synthetic_non_xrays=synthetic_refusals(predictor))
        rewrite_bundle(bundle_dir, predictor.spec.replace(gate=info), out_dir, extra_files={GATE_FILE: gate_path})
    return info
