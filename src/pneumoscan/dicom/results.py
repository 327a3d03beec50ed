"""The answers in DICOM, stored into the film's own study: a Structured Report (TID 1500
measurement report, built with highdicom) and, for analysed films, a Secondary Capture of the
heatmap with "NOT FOR DIAGNOSTIC USE" burnt into its pixels.

UIDs are derived from the source film's SOP Instance UID and the bundle's digest, so a result
rebuilt after a crash or a retry carries the same UIDs: the destination stores it once.
"""

from __future__ import annotations

import copy

import numpy as np
from highdicom import sr
from highdicom.sc import SCImage
from PIL import Image, ImageDraw, ImageFont
from pydicom import Dataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code
from pydicom.uid import generate_uid

from pneumoscan import __version__
from pneumoscan.dicom.analysis import POPULATION_REASONS, Analysis
from pneumoscan.gate import describe_reason
from pneumoscan.heatmap import display_image, overlay

RESEARCH_ONLY = "pneumoscan - research use only, not for clinical diagnosis"
#: Private coding scheme for what SNOMED and LOINC do not name (DICOM PS3.16: 99-prefixed).
SCHEME = "99PNEUMOSCAN"
PNEUMONIA = Code("233604007", "SCT", "Pneumonia")
PRESENT, ABSENT = Code("52101004", "SCT", "Present"), Code("2667000", "SCT", "Absent")
YES, NO = Code("373066001", "SCT", "Yes"), Code("373067005", "SCT", "No")
CHEST_XRAY = Code("399208008", "SCT", "Plain chest X-ray")
NO_UNITS = Code("1", "UCUM", "no units")
SR_SERIES, SC_SERIES = 9901, 9902


def result_uids(source_uid: str, digest: str) -> dict[str, str]:
    """The same UIDs for the same film and bundle, every time."""
    return {part: generate_uid(entropy_srcs=[source_uid, digest, part])
            for part in ("sr_series", "sr", "sc_series", "sc", "tracking", "device")}


def _reason_text(reason: str) -> str:
    return POPULATION_REASONS.get(reason) or describe_reason(reason)


#: Type 2 patient and study attributes the SR copies from its evidence: a film may lack them
#: (a modality that leaves them out), and an empty value is what DICOM asks for then.
_TYPE2_FROM_SOURCE = ("PatientID", "PatientName", "PatientBirthDate", "PatientSex", "AccessionNumber",
                      "StudyID", "StudyDate", "StudyTime", "ReferringPhysicianName")


def _as_evidence(source: Dataset) -> Dataset:
    """The source header with every attribute highdicom reads present (empty where missing)."""
    missing = [keyword for keyword in _TYPE2_FROM_SOURCE if keyword not in source]
    if not missing:
        return source
    evidence = copy.deepcopy(source)
    for keyword in missing:
        setattr(evidence, keyword, None)
    return evidence


def structured_report(source: Dataset, analysis: Analysis, *, model_name: str, digest: str) -> Dataset:
    """The finding, P(pneumonia), threshold and operating point, review and its reasons, or why
    the film was not analysed; the source film as evidence; the algorithm and bundle digest."""
    uids = result_uids(source.SOPInstanceUID, digest)
    algorithm = sr.AlgorithmIdentification(name="pneumoscan", version=__version__,
                                           parameters=[f"model {model_name}", f"bundle sha256 {digest}"])
    qualitative, measurements = [], []
    result = analysis.result
    if result is not None:
        qualitative.append(sr.QualitativeEvaluation(PNEUMONIA, PRESENT if result.label == "PNEUMONIA" else ABSENT))
        measurements += [
            sr.Measurement(Code("P-PNEUMONIA", SCHEME, "Calibrated probability of pneumonia"),
                           round(float(result.probability), 6), NO_UNITS),
            sr.Measurement(Code("THRESHOLD", SCHEME, "Decision threshold"), round(float(result.threshold), 6), NO_UNITS),
        ]
        qualitative.append(sr.QualitativeEvaluation(Code("OPERATING-POINT", SCHEME, "Operating point"),
                                                    Code(result.operating_point, SCHEME, result.operating_point)))
        qualitative.append(sr.QualitativeEvaluation(Code("REVIEW", SCHEME, "Review recommended"),
                                                    YES if result.review_recommended else NO))
        qualitative += [sr.QualitativeEvaluation(Code("REVIEW-REASON", SCHEME, "Review reason"),
                                                 Code(reason, SCHEME, reason)) for reason in result.review_reasons]
    else:
        qualitative.append(sr.QualitativeEvaluation(Code("NOT-ANALYSED", SCHEME, "Not analysed"), YES))
        qualitative += [sr.QualitativeEvaluation(Code("NOT-ANALYSED-REASON", SCHEME, "Not analysed because"),
                                                 Code(reason, SCHEME, _reason_text(reason)[:64]))
                        for reason in analysis.reasons or ["unreadable"]]
    group = sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=sr.TrackingIdentifier(uid=uids["tracking"], identifier="pneumoscan chest X-ray analysis"),
        algorithm_id=algorithm, measurements=measurements or None, qualitative_evaluations=qualitative,
        source_images=[sr.SourceImageForMeasurementGroup(source.SOPClassUID, source.SOPInstanceUID)])
    observer = sr.ObserverContext(
        observer_type=codes.cid270.Device,
        observer_identifying_attributes=sr.DeviceObserverIdentifyingAttributes(uid=uids["device"], name="pneumoscan"))
    report = sr.MeasurementReport(observation_context=sr.ObservationContext(observer_device_context=observer),
                                  procedure_reported=CHEST_XRAY, imaging_measurements=[group])
    document = sr.ComprehensiveSR(evidence=[_as_evidence(source)], content=report, series_instance_uid=uids["sr_series"],
                                  series_number=SR_SERIES, sop_instance_uid=uids["sr"], instance_number=1,
                                  manufacturer="pneumoscan", is_complete=True, series_description=RESEARCH_ONLY)
    return document


def _burn_in(rgb: Image.Image) -> np.ndarray:
    """Burn the warning into the pixels: a viewer that ignores every header still shows it."""
    draw = ImageDraw.Draw(rgb)
    big = ImageFont.load_default(size=max(14, rgb.width // 22))
    small = ImageFont.load_default(size=max(10, rgb.width // 40))
    first, second = "NOT FOR DIAGNOSTIC USE", "pneumoscan heatmap - research use only"
    height = draw.textbbox((0, 0), first, font=big)[3] + draw.textbbox((0, 0), second, font=small)[3] + 18
    draw.rectangle((0, 0, rgb.width, height), fill=(0, 0, 0))
    draw.text((8, 5), first, fill=(255, 255, 0), font=big)
    draw.text((8, 10 + draw.textbbox((0, 0), first, font=big)[3]), second, fill=(255, 255, 255), font=small)
    return np.asarray(rgb, dtype=np.uint8)


def heatmap_capture(source: Dataset, analysis: Analysis, *, digest: str) -> Dataset | None:
    """The heatmap over the film as a Secondary Capture in the same study; None without a heatmap."""
    if analysis.cam is None or analysis.film is None:
        return None
    uids = result_uids(source.SOPInstanceUID, digest)
    pixels = _burn_in(overlay(display_image(analysis.film), analysis.cam).convert("RGB"))
    image = SCImage.from_ref_dataset(
        ref_dataset=source, pixel_array=pixels, photometric_interpretation="RGB", bits_allocated=8,
        coordinate_system="PATIENT", series_instance_uid=uids["sc_series"], series_number=SC_SERIES,
        sop_instance_uid=uids["sc"], instance_number=1, manufacturer="pneumoscan",
        patient_orientation=("L", "F"), series_description=RESEARCH_ONLY,
        transfer_syntax_uid="1.2.840.10008.1.2.1")
    image.Laterality = ""  # type 2C: the chest is not a paired body part
    image.BurnedInAnnotation = "YES"
    image.ImageComments = "NOT FOR DIAGNOSTIC USE"
    return image
