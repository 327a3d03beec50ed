"""Operations that rewrite a bundle: recalibrate it, fit its input gate, record an evaluation.

Each writes a new bundle whose weights file is copied byte for byte (same sha256); only
``model.json`` and the listed extra files change.
"""

from __future__ import annotations

import hashlib
import tempfile
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from pneumoscan.calibration import calibrate_on_validation
from pneumoscan.data import MIN_IMAGES_PER_CLASS, read_split
from pneumoscan.errors import BundleError, ConfigError, DatasetError
from pneumoscan.gate import GATE_FILE, FeatureGate
from pneumoscan.inference import Predictor
from pneumoscan.integrity import default_bundle_path, read_spec, rewrite_bundle, sha256_file
from pneumoscan.spec import GateInfo

#: The share of synthetic documents and screenshots a gate must refuse before fit-gate stops warning.
SYNTHETIC_REFUSAL_TARGET = 0.99


#: A site sample smaller than this per class cannot fit a temperature and thresholds it can trust.


def recalibrate_bundle(bundle_dir: Path | None, out_dir: Path, *, data_root: Path | None = None,
                       split: str | None = None, site: Path | None = None) -> dict[str, Any]:
    """Refit temperature and operating points, write a new bundle (weights unchanged).

    On the bundle's own validation split (``data_root`` only), or on a site's labelled images:
    ``site`` (a folder of NORMAL/ and PNEUMONIA/) or ``data_root/split``. A site calibration is
    recorded in ``Decision.site`` (n per class, sha256 of the file list) and shown on the card.

    Raises:
        BundleError: the bundle cannot be loaded, or has no split.csv (validation only).
        DatasetError: a class folder is missing, a class has fewer than MIN_IMAGES_PER_CLASS
            images, or images are unreadable (listed).
        ConfigError: neither or both of a site and a split were named.
    """
    from pneumoscan.data import CLASS_NAMES, scan_labelled_folder, scan_split

    bundle_dir = Path(bundle_dir or default_bundle_path())
    if site is not None and split is not None:
        raise ConfigError("name the site's images once: --site DIR, or --data ROOT --split NAME")
    if data_root is None and site is None:
        raise ConfigError("calibrate needs --data ROOT (the bundle's validation split, or --split NAME) or --site DIR")
    predictor = Predictor.from_bundle(bundle_dir)
    if site is not None:
        samples, source = scan_labelled_folder(site), Path(site)
    elif split is not None:
        samples, source = scan_split(data_root, split), Path(data_root) / split
    else:
        samples, source = read_split(bundle_dir, data_root), None
    counts = {name: sum(s.label == i for s in samples) for i, name in enumerate(CLASS_NAMES)}
    if source is not None and min(counts.values()) < MIN_IMAGES_PER_CLASS:
        raise DatasetError(f"{source} has {', '.join(f'{v} {k}' for k, v in counts.items())} images; a site "
                           f"calibration needs at least {MIN_IMAGES_PER_CLASS} of each class")
    calibration = calibrate_on_validation([s.label for s in samples], _log_odds(predictor, samples))
    decision = calibration.decision
    spec = predictor.spec
    if source is not None:
        listing = "\n".join(f"{s.path.relative_to(source).as_posix()}\t{CLASS_NAMES[s.label]}" for s in samples)
        decision = replace(decision, threshold_source=decision.threshold_source.replace("validation", "site"),
                           calibration=decision.calibration.replace("validation", "site_sample"),
                           site={"source": source.name, "n_by_class": counts,
                                 "file_list_sha256": hashlib.sha256(listing.encode()).hexdigest()})
        new_spec = spec.replace(decision=decision)  # val_metrics stay the training split's
    else:
        new_spec = spec.replace(decision=decision, val_metrics={**spec.val_metrics, **calibration.validation_metrics()})
    rewrite_bundle(bundle_dir, new_spec, out_dir)
    return {**calibration.report, "site": dict(decision.site)}


def _log_odds(predictor: Predictor, samples: list, *, batch_size: int = 32) -> list[float]:
    """Every sample's uncalibrated log-odds (ungated), for fitting a calibration.

    Raises:
        DatasetError: images that could not be read (the first ten listed).
    """
    outcomes = predictor.predict_paths([s.path for s in samples], batch_size=batch_size, gate=False)
    bad = [o for o in outcomes if o.status == "error"]
    if bad:
        listed = "; ".join(o.error or o.name for o in bad[:10]) + (f"; and {len(bad) - 10} more" if len(bad) > 10 else "")
        raise DatasetError(f"{len(bad)} image(s) could not be read: {listed}")
    return [o.log_odds for o in outcomes]


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
    keep = ("n", "n_by_class", "n_unreadable", "operating_point", "tta", "ci", "calibration", "input_gate",
            "site_calibrated", "review")
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


#: The default gate extractor: ImageNet EfficientNet-Lite0, frozen (its weights ship with the package).
GATE_EXTRACTOR = "efficientnet_lite0"
EXTRACTOR_FILE = "gate_extractor.safetensors"


#: Folds of the cross-fitted gate limit (small validation splits).
CROSS_FIT_FOLDS = 5


def fit_bundle_gate(bundle_dir: Path | None, data_root: Path, out_dir: Path, *, quantile: float = 0.995,
                    extractor: str | None = GATE_EXTRACTOR, batch_size: int = 32,
                    cross_fit: bool = False) -> GateInfo:
    """Fit the input gate on the bundle's own split and write a new bundle (weights unchanged).

    The gate measures the Mahalanobis distance of ``extractor``'s pooled features (a frozen
    ImageNet backbone, stored in the bundle in fp16) to those of the training images; its
    threshold is the ``quantile`` of the validation images' distances. Fine-tuning never moves
    it, so any training recipe can ship with it. ``extractor=None`` measures the classifier's
    own features instead (the gates fitted before). It is then measured on the validation
    X-rays, their inverted copies and the synthetic documents and screenshots. A bundle with an
    ONNX model gets it re-exported (the graph computes the gate's features too). ``cross_fit``
    (a validation split too small to set the threshold alone) takes the quantile of 5-fold
    out-of-fold distances over the training and validation images instead.

    Raises:
        ConfigError: ``quantile`` outside (0.5, 1), or an unknown extractor.
        BundleError: the bundle cannot be loaded or has no split.csv.
        DatasetError: a listed image is missing.
    """
    import torch

    from pneumoscan.models import PixelNetwork, backbone_info, create_classifier
    from pneumoscan.models.bundle import save_weights
    from pneumoscan.runtime import TorchRunner

    if not 0.5 < quantile < 1.0:
        raise ConfigError(f"--quantile must be between 0.5 and 1, got {quantile}")
    bundle_dir = Path(bundle_dir or default_bundle_path())
    predictor = Predictor.from_bundle(bundle_dir, backend="torch")
    spec = predictor.spec
    network = None
    if extractor:
        info = backbone_info(extractor)
        frozen = create_classifier(extractor, weights="imagenet", input_size=spec.input_size).eval()
        for parameter in frozen.head.parameters():
            # never used (the gate reads the features), but randomly initialised: zeroed, so that
            # every gate on this extractor stores the same file
            torch.nn.init.zeros_(parameter)
        frozen.half().float()  # the precision it is stored in
        network = PixelNetwork(predictor.model, spec.mean, spec.std, extractor=frozen,
                               extractor_mean=info.mean, extractor_std=info.std).eval()

    def features(pixels: np.ndarray) -> np.ndarray:
        if network is None:
            return predictor.forward(pixels)[1]
        with torch.inference_mode():
            return network.gate_features(torch.from_numpy(pixels)).numpy()

    def split_features(role: str, *, invert: bool = False, every: int = 1) -> np.ndarray:
        samples = read_split(bundle_dir, data_root, role=role)[::every]
        chunks = []
        for start in range(0, len(samples), batch_size):
            pixels = np.stack([predictor.preprocessing.read(s.path) for s in samples[start:start + batch_size]])
            chunks.append(features(255 - pixels if invert else pixels))
        return np.concatenate(chunks)

    train_features, val_features = split_features("train"), split_features("val")
    # Negative films: every fourth training image inverted teaches the polarity detector.
    inverted_train = split_features("train", invert=True, every=4)
    gate = FeatureGate.fit(train_features, val_features, quantile=quantile, inverted_features=inverted_train,
                           cross_fit_folds=CROSS_FIT_FOLDS if cross_fit else 0)
    inverted_val = split_features("val", invert=True)
    inverted = gate.inverted(inverted_val) | (gate.distances(inverted_val) > gate.threshold)
    val_refused = gate.inverted(val_features) | (gate.distances(val_features) > gate.threshold)
    if network is not None:
        predictor.runner = TorchRunner(network)
    predictor.gate = gate  # this local predictor now stands for the gated bundle being written
    with tempfile.TemporaryDirectory() as tmp:
        gate_path = Path(tmp) / GATE_FILE
        gate.save(gate_path)
        extra = {GATE_FILE: gate_path}
        info_kwargs: dict[str, Any] = {}
        if network is not None:
            extractor_path = Path(tmp) / EXTRACTOR_FILE
            save_weights(network.extractor, extractor_path, half=True)
            extra[EXTRACTOR_FILE] = extractor_path
            info_kwargs = {"extractor": extractor, "extractor_file": EXTRACTOR_FILE,
                           "extractor_sha256": sha256_file(extractor_path)}
        method = (f"mahalanobis, Ledoit-Wolf covariance of pooled {extractor} ImageNet features (frozen)"
                  if network is not None else "mahalanobis, Ledoit-Wolf covariance of pooled backbone features")
        info = GateInfo(file=GATE_FILE, sha256=sha256_file(gate_path), threshold=round(gate.threshold, 6),
                        quantile=quantile, method=method, n_train=int(len(train_features)),
                        n_val=int(len(val_features)),
                        validation_refused=round(float(np.mean(val_refused)), 6),
                        inverted_refused=round(float(np.mean(inverted)), 6),
                        limit_from="cross-fitted" if cross_fit else "validation", **info_kwargs)
        info = replace(info, synthetic_non_xrays=synthetic_refusals(predictor))
        had_onnx = spec.onnx is not None
        rewrite_bundle(bundle_dir, spec.replace(gate=info, onnx=None), out_dir, extra_files=extra,
                       drop=("model.onnx",) if had_onnx else ())
    if had_onnx:
        from pneumoscan.export import export_bundle_onnx  # the graph must compute the new gate's features

        export_bundle_onnx(out_dir)
    return info


#: What every member of an ensemble must share: the same network input, and the same head shape.
SHARED_FIELDS = ("backbone", "head", "input_size", "mean", "std", "equalize", "dropout", "class_names")


def build_ensemble(member_dirs: list[Path], data_root: Path, out_dir: Path, *, batch_size: int = 32) -> dict[str, Any]:
    """Join member bundles into one ensemble bundle: their log-odds are averaged, and the mean is
    calibrated on the members' shared validation split. Weights are stored in fp16.

    When the first member's gate measures a frozen extractor (not the classifier), the ensemble
    keeps it: the members share its preprocessing and split, so its statistics hold unchanged.
    Otherwise fit one (``fit-gate``). Export (``export``) afterwards, as for any bundle.

    Raises:
        ConfigError: fewer than two members, members that disagree on preprocessing or
            architecture, or that were trained on different splits.
        BundleError: a member cannot be loaded or has no split.csv.
    """
    from pneumoscan.data import CLASS_NAMES, SPLIT_FILE, class_counts
    from pneumoscan.models import Ensemble, load_bundle, save_bundle
    from pneumoscan.runtime import TorchRunner
    from pneumoscan.spec import Provenance

    if len(member_dirs) < 2:
        raise ConfigError(f"an ensemble needs at least 2 member bundles, got {len(member_dirs)}")
    loaded = [load_bundle(path, check_onnx=False) for path in member_dirs]
    first = loaded[0][1]
    for path, (_, spec) in zip(member_dirs[1:], loaded[1:]):
        differ = [name for name in SHARED_FIELDS if getattr(spec, name) != getattr(first, name)]
        if differ:
            raise ConfigError(f"members disagree on preprocessing or architecture: {path} differs from "
                              f"{member_dirs[0]} in {', '.join(differ)}")
        if spec.provenance.split_manifest_sha256 != first.provenance.split_manifest_sha256:
            raise ConfigError(f"{path} was trained on another split than {member_dirs[0]}; train every "
                              "member with the same --split-seed")
    members = []
    for model, _ in loaded:
        members.extend(model.members if isinstance(model, Ensemble) else [model])
    ensemble = Ensemble(members).eval()
    ensemble.half().float()  # calibrate exactly the weights the bundle will hold
    samples = read_split(member_dirs[0], data_root)
    joined = Predictor(ensemble, first, TorchRunner.for_bundle(ensemble, first.replace(gate=None)))
    calibration = calibrate_on_validation([s.label for s in samples], _log_odds(joined, samples, batch_size=batch_size))
    spec = first.replace(
        name=f"{first.backbone}-x{len(members)}-res{first.input_size}-chest_xray-{datetime.now(timezone.utc):%Y%m%d}",
        decision=calibration.decision, gate=None, onnx=None, reported_metrics={},
        val_metrics=calibration.validation_metrics(n_by_class=dict(zip(CLASS_NAMES, class_counts(samples)))),
        provenance=Provenance(
            training={"ensemble_of": [spec.name for _, spec in loaded],
                      "members": [dict(spec.provenance.training) for _, spec in loaded]},
            split_manifest_sha256=first.provenance.split_manifest_sha256,
            versions=dict(first.provenance.versions),
            created=datetime.now(timezone.utc).isoformat(timespec="seconds")))
    extra = {SPLIT_FILE: Path(member_dirs[0]) / SPLIT_FILE}
    if first.gate is not None and first.gate.extractor:
        spec = spec.replace(gate=first.gate)
        extra.update({name: Path(member_dirs[0]) / name for name in (first.gate.file, first.gate.extractor_file)})
    save_bundle(ensemble, spec, out_dir, half=True, extra_files=extra)
    return {**calibration.report, "gate_kept": spec.gate is not None}
