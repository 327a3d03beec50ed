"""``model.json``: what a bundle says about its network, as a frozen dataclass with typed parts.

:class:`BundleSpec` holds the architecture and preprocessing facts as plain fields, and four typed
parts: :class:`Decision` (temperature and thresholds, chosen on validation), :class:`GateInfo`
(the input gate's file and threshold), :class:`OnnxInfo` (the exported graph) and
:class:`Provenance` (how the weights were made). Version 1 files (flat keys) still load.

No torch here: reading a spec, deciding a label and describing a model need numpy only.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np

from pneumoscan.errors import BundleError, ConfigError
from pneumoscan.imaging import Preprocessing
from pneumoscan.stats import sigmoid

FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)


@dataclass(frozen=True)
class Decision:
    """How log-odds become a label: temperature scaling, then a named threshold on P(pneumonia)."""

    threshold: float = 0.5  # the default operating point's threshold on calibrated P(pneumonia)
    threshold_source: str = "default"  # "validation_youden" when chosen on validation
    temperature: float = 1.0  # P = sigmoid(log_odds / temperature)
    calibration: str = "none"  # "temperature_scaling_on_validation" when fitted there
    operating_points: Mapping[str, float] = field(default_factory=dict)  # name -> threshold
    default_operating_point: str = "balanced"
    # Set when a site's labelled sample, not the training split, fitted this decision
    # (``pneumoscan calibrate --site``): n per class, sha256 of the file list, where it came from.
    site: Mapping[str, Any] = field(default_factory=dict)
    # The review band (``pneumoscan.calibration.review_band``): ``low`` and ``high`` on calibrated
    # P(pneumonia), the ``target_accuracy`` outside it, what the calibration set showed, and
    # ``distance_fraction`` of the gate's limit beyond which a film is "close to the limit".
    # Empty for bundles calibrated before it existed: then nothing is flagged.
    review: Mapping[str, Any] = field(default_factory=dict)

    @property
    def points(self) -> dict[str, float]:
        """Named thresholds (at least the default one)."""
        return dict(self.operating_points) or {self.default_operating_point: self.threshold}

    def threshold_for(self, operating_point: str | None = None,
                      threshold: float | None = None) -> tuple[float, str]:
        """``(threshold, operating point name)``: an explicit threshold wins, then a named point.

        Raises:
            ConfigError: an unknown operating point or a threshold outside [0, 1].
        """
        if threshold is not None:
            if math.isnan(threshold) or not 0.0 <= threshold <= 1.0:
                raise ConfigError(f"threshold must be between 0 and 1, got {threshold}")
            return float(threshold), "custom"
        name = operating_point or self.default_operating_point
        points = self.points
        if name not in points:
            raise ConfigError(f"unknown operating point '{name}'; this model has: {', '.join(points)}")
        return points[name], name

    def review_reasons(self, probability: float, threshold: float, distance: float | None = None,
                       gate_limit: float | None = None) -> tuple[str, ...]:
        """Why a prediction should be reviewed by a person (empty: no reason).

        ``uncertain_probability``: P(pneumonia) lies inside the review band, widened to include
        ``threshold`` when another operating point is in use. ``near_gate_limit``: the gate's
        distance is beyond ``distance_fraction`` of its limit (or beyond the limit itself, when the
        film was analysed anyway).
        """
        if not self.review:
            return ()
        reasons = []
        low, high = self.review_band_for(threshold)
        if low < probability < high:
            reasons.append("uncertain_probability")
        fraction = self.review.get("distance_fraction")
        if distance is not None and gate_limit and fraction is not None and distance > fraction * gate_limit:
            reasons.append("near_gate_limit")
        return tuple(reasons)

    def review_band_for(self, threshold: float) -> tuple[float, float]:
        """The review band in use with ``threshold``: the fitted band, widened to include it."""
        return min(self.review["low"], threshold), max(self.review["high"], threshold)

    def probability(self, log_odds: np.ndarray | float) -> np.ndarray:
        """Uncalibrated log-odds -> calibrated P(pneumonia) (float64)."""
        return sigmoid(np.asarray(log_odds, dtype=np.float64) / self.temperature)


@dataclass(frozen=True)
class GateInfo:
    """The input gate's feature statistics (``file``, sha256-checked) and where it refuses."""

    file: str
    sha256: str
    threshold: float  # Mahalanobis distance beyond which an image is out of distribution
    quantile: float = 0.995  # of the validation images' distances, where the threshold sits
    method: str = ""
    n_train: int = 0
    n_val: int = 0
    synthetic_non_xrays: Mapping[str, float] = field(default_factory=dict)  # n, refused, target
    # The frozen ImageNet network whose pooled features the gate measures (its weights in
    # ``extractor_file``, sha256-checked), so that fine-tuning never moves the gate. "" = the
    # classifier's own features (gates fitted before independent extractors existed).
    extractor: str = ""
    extractor_file: str = ""
    extractor_sha256: str = ""
    # Measured when fitted: share of validation X-rays (and of their inverted copies) refused.
    validation_refused: float | None = None
    inverted_refused: float | None = None
    # Where the threshold's quantile was taken: "validation" films, or "cross-fitted" out-of-fold
    # distances over the training and validation films (a validation split too small alone).
    limit_from: str = "validation"


@dataclass(frozen=True)
class OnnxInfo:
    """The network exported to ONNX (``file``, sha256-checked) and its measured parity with PyTorch."""

    file: str
    sha256: str
    opset: int = 0
    parity_max_abs_diff: Mapping[str, float] = field(default_factory=dict)
    n_real_images: int = 0
    # The graph's ``cam`` output (pool heads) against the grad-cam package on PyTorch, on the
    # parity images: lowest Pearson correlation and largest difference of the [0, 1] maps.
    # Empty when the graph has no CAM output (other heads, or exported before it existed).
    cam_agreement: Mapping[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class Provenance:
    """How the weights were made: the training recipe, the split, library versions, the date."""

    training: Mapping[str, Any] = field(default_factory=dict)  # TrainConfig.as_json() and run facts
    split_manifest_sha256: str = ""
    versions: Mapping[str, str] = field(default_factory=dict)
    created: str = ""


@dataclass(frozen=True)
class BundleSpec:
    """Everything needed to rebuild, feed and interpret the network."""

    backbone: str
    head: str
    input_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    # Histogram equalisation after the square resize; False for bundles written before the option.
    equalize: bool = False
    class_names: tuple[str, ...] = ("NORMAL", "PNEUMONIA")
    dropout: float = 0.5
    cam_layer: str = ""
    members: int = 1  # >1: an ensemble whose members' log-odds are averaged
    name: str = "pneumoscan-model"
    weights_sha256: str = ""
    weights_dtype: str = "float32"
    decision: Decision = field(default_factory=Decision)
    gate: GateInfo | None = None
    onnx: OnnxInfo | None = None
    provenance: Provenance = field(default_factory=Provenance)
    # Validation figures at training or calibration time (calibration.Calibration.validation_metrics).
    val_metrics: Mapping[str, Any] = field(default_factory=dict)
    # Figures with 95% CIs per operating point, by split, from ``pneumoscan evaluate --record``.
    reported_metrics: Mapping[str, Any] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION

    @property
    def preprocessing(self) -> Preprocessing:
        """The one image -> network-input transform this network was trained with."""
        return Preprocessing(size=self.input_size, equalize=self.equalize)

    def to_json(self) -> str:
        """Pretty JSON text of the spec (always the current format version)."""
        raw = dataclasses.asdict(self.replace(format_version=FORMAT_VERSION))
        return json.dumps(raw, indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str, *, source: str = "model.json") -> "BundleSpec":
        """Parse and validate ``model.json`` (format version 1 or 2).

        Raises:
            BundleError: not JSON, an unknown format version, or missing or malformed fields.
        """
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as exc:
            raise BundleError(f"{source} is not valid JSON ({exc})") from None
        except RecursionError:
            raise BundleError(f"{source} nests too deeply to be a model.json") from None
        return cls.from_raw(raw, source=source)

    @classmethod
    def from_raw(cls, raw: Any, *, source: str = "model.json") -> "BundleSpec":
        """Validate parsed ``model.json`` contents (see :meth:`from_json`).

        Raises:
            BundleError: an unknown format version, or missing or malformed fields.
        """
        if not isinstance(raw, dict):
            raise BundleError(f"{source} must hold a JSON object")
        version = raw.get("format_version")
        if version not in READABLE_VERSIONS:
            raise BundleError(
                f"{source} has bundle format version {version!r}; this pneumoscan reads versions "
                f"{', '.join(map(str, READABLE_VERSIONS))}. Re-export the bundle with a matching pneumoscan version."
            )
        if version == 1:
            raw = _from_version_1(raw)
        values = _known(cls, raw, source)
        for key, part in (("decision", Decision), ("provenance", Provenance)):
            values[key] = _part(part, values.get(key) or {}, f"{source} {key}")
        for key, part in (("gate", GateInfo), ("onnx", OnnxInfo)):
            values[key] = _part(part, values[key], f"{source} {key}") if values.get(key) else None
        for key in ("mean", "std", "class_names"):
            if key in values:
                if not isinstance(values[key], list):
                    raise BundleError(f"{source}: {key} must be a list, got {str(values[key])[:40]!r}")
                values[key] = tuple(values[key])
        spec = cls(**values)
        _validate(spec, source)
        return spec

    def replace(self, **changes: Any) -> "BundleSpec":
        """A copy with some fields changed."""
        return dataclasses.replace(self, **changes)


def _known(cls: type, raw: Mapping[str, Any], source: str) -> dict[str, Any]:
    """The fields of ``cls`` found in ``raw``; unknown keys are ignored (newer minor additions).

    Raises:
        BundleError: a field without a default is missing.
    """
    fields = dataclasses.fields(cls)
    values = {f.name: raw[f.name] for f in fields if f.name in raw}
    missing = [f.name for f in fields if f.name not in values and f.default is dataclasses.MISSING
               and f.default_factory is dataclasses.MISSING]
    if missing:
        raise BundleError(f"{source} lacks the field(s): {', '.join(missing)}")
    return values


CLASS_NAMES = ("NORMAL", "PNEUMONIA")
#: The network input sizes a bundle may declare: every input is resized to this square, and
#: serving allocates batches of it (input_size 100000 took serve to 15.6 GB before a traceback).
MIN_INPUT_SIZE, MAX_INPUT_SIZE = 32, 1024


def is_plain_file_name(value: Any) -> bool:
    """A name of a file directly inside a bundle directory: no directories, no ``..``, not hidden."""
    return isinstance(value, str) and bool(re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}", value)) and ".." not in value


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _validate(spec: "BundleSpec", source: str) -> None:
    """Values a network cannot be served with, refused in one line each.

    Raises:
        BundleError: swapped or unknown class names, a temperature that is not a positive number,
            thresholds outside [0, 1], or a default operating point the bundle does not have.
    """
    decision = spec.decision
    problems = []
    if tuple(spec.class_names) != CLASS_NAMES:
        problems.append(f"class_names must be {list(CLASS_NAMES)} in that order, got {list(spec.class_names)}")
    if not (_number(decision.temperature) and decision.temperature > 0):
        problems.append(f"the temperature must be a positive number, got {decision.temperature!r}")
    thresholds = {"threshold": decision.threshold, **{f"operating point {k!r}": v
                                                      for k, v in dict(decision.operating_points).items()}}
    problems += [f"{name} must be a number between 0 and 1, got {value!r}"
                 for name, value in thresholds.items() if not (_number(value) and 0 <= value <= 1)]
    if decision.operating_points and decision.default_operating_point not in decision.operating_points:
        problems.append(f"the default operating point {decision.default_operating_point!r} is not one of "
                        f"{list(decision.operating_points)}")
    if decision.review:
        low, high = decision.review.get("low"), decision.review.get("high")
        if not (_number(low) and _number(high) and 0 <= low <= high <= 1):
            problems.append(f"the review band must be two numbers 0 <= low <= high <= 1, got {low!r} and {high!r}")
    if not (isinstance(spec.members, int) and spec.members >= 1):
        problems.append(f"members must be a whole number >= 1, got {spec.members!r}")
    if spec.gate is not None and not (_number(spec.gate.threshold) and spec.gate.threshold > 0):
        problems.append(f"the gate threshold must be a positive number, got {spec.gate.threshold!r}")
    if not (isinstance(spec.input_size, int) and not isinstance(spec.input_size, bool)
            and MIN_INPUT_SIZE <= spec.input_size <= MAX_INPUT_SIZE):
        problems.append(f"input_size must be a whole number from {MIN_INPUT_SIZE} to {MAX_INPUT_SIZE}, "
                        f"got {spec.input_size!r}")
    for label, values in (("mean", spec.mean), ("std", spec.std)):
        if len(values) != 3 or not all(_number(v) for v in values) or (label == "std" and min(values) <= 0):
            problems.append(f"{label} must be three finite numbers{' above 0' if label == 'std' else ''}, "
                            f"got {list(values)[:4]!r}")
    for part, names in ((spec.gate, ("file", "extractor_file")), (spec.onnx, ("file",))):
        for key in names if part is not None else ():
            value = getattr(part, key)
            if value and not is_plain_file_name(value):
                problems.append(f"{key} {str(value)[:80]!r} is not a plain file name inside the bundle")
    if problems:
        raise BundleError(f"{source}: {problems[0]}" + (f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""))


def _part(cls: type, raw: Any, source: str) -> Any:
    if not isinstance(raw, dict):
        raise BundleError(f"{source} must be a JSON object")
    return cls(**_known(cls, raw, source))


# Version 1 kept these at the top level; version 2 groups them into typed parts.
_V1_DECISION = ("threshold", "threshold_source", "temperature", "calibration", "operating_points",
                "default_operating_point")
_V1_PROVENANCE = ("training", "split_manifest_sha256", "versions", "created")


def _from_version_1(raw: dict[str, Any]) -> dict[str, Any]:
    """A version-1 ``model.json`` (flat decision and provenance keys) in version-2 shape."""
    new = {k: v for k, v in raw.items() if k not in _V1_DECISION + _V1_PROVENANCE}
    new["decision"] = {k: raw[k] for k in _V1_DECISION if k in raw}
    new["provenance"] = {k: raw[k] for k in _V1_PROVENANCE if k in raw}
    for key in ("gate", "onnx"):  # version 1 wrote {} for "none"
        new[key] = raw.get(key) or None
    return new
