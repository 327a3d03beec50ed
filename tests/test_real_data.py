"""Checks on the real Kermany folder (skipped when ../shared/data is absent) and the bundled model."""

from __future__ import annotations

import csv
import json
from pathlib import Path


from conftest import SHARED_DATA, needs_shared_data
from pneumoscan.data import carve_validation, class_counts, scan_split
from pneumoscan.models import default_bundle_path, load_bundle


def test_bundled_default_model_loads() -> None:
    model, spec = load_bundle(default_bundle_path())
    assert spec.backbone == "efficientnet_lite0" and spec.input_size == 224
    assert spec.decision.threshold_source.startswith("validation_")  # chosen on validation, not a site
    assert spec.val_metrics["n"] > 400  # chosen on a real validation split
    assert (default_bundle_path() / "split.csv").is_file()


@needs_shared_data()
def test_real_layout_counts_and_patient_split() -> None:
    train = scan_split(SHARED_DATA, "train")
    assert class_counts(train) == [1341, 3875]
    assert class_counts(scan_split(SHARED_DATA, "test")) == [234, 390]
    split = carve_validation(train + scan_split(SHARED_DATA, "val"), fraction=0.1, seed=0)
    assert not {s.patient_id for s in split.train} & {s.patient_id for s in split.val}
    assert 0.08 < len(split.val) / (len(split.train) + len(split.val)) < 0.12
    # byte-identical images (the data's build report lists them) never straddle the split
    report = json.loads((SHARED_DATA.parent / "build_report.json").read_text())
    side = {s.path.name: ("val" if i >= len(split.train) else "train")
            for i, s in enumerate([*split.train, *split.val])}
    groups = [g for g in report["duplicate_output_pixels"] if all(name in side for name in g)]
    assert len(groups) >= 10
    for group in groups:
        assert len({side[name] for name in group}) == 1, group


@needs_shared_data()
def test_bundled_model_on_the_real_test_split(tmp_path: Path) -> None:
    """The figures recorded in MODEL_CARD.md are reproducible (threshold fixed on validation)."""
    from pneumoscan.evaluation import evaluate_folder

    metrics = evaluate_folder(None, SHARED_DATA, "test", tmp_path, n_boot=200)
    assert metrics["n"] == 624 and metrics["n_unreadable"] == 0
    assert metrics["roc_auc"]["value"] > 0.9
    assert metrics["accuracy"]["value"] > 0.8
    # the point figures the bundle (and MODEL_CARD.md) record, to the digit
    recorded = load_bundle(default_bundle_path())[1].reported_metrics["test"]["operating_points"]["balanced"]
    for name in ("accuracy", "roc_auc", "f1_weighted", "sensitivity", "specificity"):
        assert metrics[name]["value"] == recorded[name]["value"], name
    # the bundle's own validation split never includes a test image
    rows = csv.DictReader((default_bundle_path() / "split.csv").open())
    assert not any(r["path"].startswith("test/") for r in rows)


@needs_shared_data()
def test_bundled_app_explains_a_jpeg_and_a_dicom_and_refuses_a_photo() -> None:
    """The issue's first-use story: a real JPEG X-ray, the same film as a DICOM, a holiday photo."""
    import io

    import numpy as np
    import pytest
    from PIL import Image

    from pneumoscan.web import create_app
    from test_dicom import make_dicom

    skimage_data = pytest.importorskip("skimage.data")
    jpeg = next((SHARED_DATA / "test" / "PNEUMONIA").glob("*.jpeg")).read_bytes()
    film = np.asarray(Image.open(io.BytesIO(jpeg)).convert("L"))
    dicom = make_dicom(film, extra={"Modality": "DX", "ViewPosition": "AP"})
    photo = io.BytesIO()
    Image.fromarray(skimage_data.chelsea()).save(photo, "JPEG")
    client = create_app({"TESTING": True}).test_client()
    files = [(io.BytesIO(jpeg), "film.jpeg"), (io.BytesIO(dicom), "film.dcm"), (io.BytesIO(photo.getvalue()), "cat.jpg")]
    response = client.post("/api/v1/predict", data={"file": files, "explain": "true"},
                           content_type="multipart/form-data")
    film_jpeg, film_dicom, cat = response.get_json()["results"]
    for result in (film_jpeg, film_dicom):
        assert result["status"] == "ok" and result["label"] == "PNEUMONIA" and result["gradcam_png"]
    assert abs(film_jpeg["probability_pneumonia"] - film_dicom["probability_pneumonia"]) < 0.01
    assert cat["status"] == "rejected" and cat["reasons"] == ["colour_image"]
    # (base64 PNGs can hold any three letters, so the name check skips them)
    texts = [json.dumps({k: v for k, v in r.items() if k != "gradcam_png"}) for r in (film_jpeg, film_dicom, cat)]
    assert not any("Doe" in text or "Jane" in text for text in texts)
