"""One received film analysed: the population checks a DICOM header allows, then the same
:class:`~pneumoscan.inference.Predictor` as the API (decode, input gate, calibrated probability,
operating point, review flag, heatmap).

The header says what an upload cannot: the patient's age, the body part and the view. A film
outside the population the model was trained on (children aged 1-5, frontal chest films) is not
analysed; the reason has a machine-readable name, like the gate's.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import date
from typing import Any

from pydicom import Dataset

from pneumoscan.dicom.pixels import read_header
from pneumoscan.errors import PneumoscanError
from pneumoscan.imaging import decode_image
from pneumoscan.inference import Predictor, Result

#: Ages (years) of the training population (the bundled model's card: Kermany, ages 1-5).
TRAINING_AGES = (1.0, 5.99)
#: Frontal views; a lateral is already refused by the gate (``lateral_view``).
FRONTAL_VIEWS = frozenset({"AP", "PA"})
#: Body parts that are a chest film (DICOM PS3.16 CID 4031 terms as modalities write them).
CHEST = frozenset({"CHEST", "THORAX", "LUNG", "CHEST_LUNG"})

POPULATION_REASONS = {
    "age_outside_training_population": "the patient's age is outside the training population (1-5 years)",
    "view_not_frontal": "the view is not AP or PA",
    "body_part_not_chest": "the body part examined is not the chest",
}


@dataclass
class Analysis:
    """What the node learned about one film; ``result`` is None when it was not analysed."""

    status: str  # "ok", "rejected" (gate or population) or "error" (unreadable)
    reasons: list[str] = field(default_factory=list)
    result: Result | None = None
    film: Any = None  # the decoded grey film (PIL), for the heatmap
    cam: Any = None  # the heatmap at the network's input size
    error: str | None = None

    def describe(self) -> str:
        """One log line: results and reason names only, no identifiers."""
        if self.status == "ok" and self.result is not None:
            review = " review" if self.result.review_recommended else ""
            return f"{self.result.label} p={self.result.probability:.4f} thr={self.result.threshold:.4f}{review}"
        return f"{self.status}: {', '.join(self.reasons) or self.error}"


def age_years(ds: Dataset) -> float | None:
    """PatientAge (``nnnD/W/M/Y``), else StudyDate minus PatientBirthDate; None when unknown."""
    text = str(ds.get("PatientAge", "") or "").strip().upper()
    match = re.fullmatch(r"(\d{1,3})([DWMY])", text)
    if match:
        return int(match.group(1)) / {"D": 365.25, "W": 52.18, "M": 12.0, "Y": 1.0}[match.group(2)]
    try:
        born, studied = (str(ds.get(key, "") or "") for key in ("PatientBirthDate", "StudyDate"))
        if len(born) == 8 and len(studied) == 8:
            b = date(int(born[:4]), int(born[4:6]), int(born[6:]))
            s = date(int(studied[:4]), int(studied[4:6]), int(studied[6:]))
            return (s - b).days / 365.25
    except ValueError:
        return None
    return None


def population_reasons(ds: Dataset) -> list[str]:
    """Why the header puts this film outside the training population (empty: nothing known against it)."""
    reasons = []
    age = age_years(ds)
    if age is not None and not TRAINING_AGES[0] <= age <= TRAINING_AGES[1]:
        reasons.append("age_outside_training_population")
    view = str(ds.get("ViewPosition", "") or "").strip().upper()
    if view and view not in FRONTAL_VIEWS and view not in ("LL", "RL", "LATERAL"):  # laterals: the gate's
        reasons.append("view_not_frontal")
    part = str(ds.get("BodyPartExamined", "") or "").strip().upper()
    if part and part not in CHEST:
        reasons.append("body_part_not_chest")
    return reasons


def analyse(predictor: Predictor, data: bytes, *, explain: bool = True) -> tuple[Dataset | None, Analysis]:
    """The film's header (None if unreadable) and what the model says about it."""
    try:
        header = read_header(data, name="film")
    except PneumoscanError as exc:
        return None, Analysis("error", reasons=[exc.code], error=exc.code)
    refused = population_reasons(header)
    if refused:
        return header, Analysis("rejected", reasons=refused)
    try:
        film = decode_image(data, name="film")
    except PneumoscanError as exc:
        return header, Analysis("error", reasons=[exc.code], error=exc.code)
    result = predictor.predict([film])[0]
    if result.status != "ok":
        return header, Analysis(result.status, reasons=list(result.reasons), result=None)
    analysis = Analysis("ok", reasons=list(result.reasons), result=result, film=film)
    if explain:
        try:
            analysis.cam = predictor.explain(film).cam
        except PneumoscanError:
            analysis.cam = None  # a bundle without a CAM output: the SR still goes, no heatmap
    return header, analysis
