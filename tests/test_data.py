"""pneumoscan.data: decoding, the square resize, the Kaggle layout and the patient split."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import image_bytes, make_xray, write_kaggle_layout
from pneumoscan.data import (
    Augmentation,
    XrayDataset,
    carve_validation,
    class_counts,
    collect_image_paths,
    decode_image,
    normalize,
    patient_id_from_name,
    scan_split,
    square_resize,
)
from pneumoscan.errors import ConfigError, DatasetError, InvalidImageError


@pytest.mark.parametrize("name,label,expected", [
    ("person1000_bacteria_2931.jpeg", 1, "PNEUMONIA:person1000"),
    ("person447_virus_921_1.jpeg", 1, "PNEUMONIA:person447"),
    ("IM-0115-0001.jpeg", 0, "NORMAL:IM-0115"),
    ("NORMAL2-IM-1427-0001.jpeg", 0, "NORMAL:NORMAL2-IM-1427"),
    ("scan.png", 0, "NORMAL:scan"),
])
def test_patient_id_from_name(name: str, label: int, expected: str) -> None:
    assert patient_id_from_name(name, label) == expected


def test_decode_modes_all_become_8bit_grey() -> None:
    grey = make_xray(1)
    rgb = grey.convert("RGB")
    rgba = grey.convert("RGBA")
    wide = Image.fromarray(np.asarray(grey).astype(np.uint16) * 257)
    for image, fmt in ((grey, "PNG"), (rgb, "JPEG"), (rgba, "PNG"), (wide, "PNG"), (grey.convert("P"), "PNG")):
        decoded = decode_image(image_bytes(image, fmt))
        assert decoded.mode == "L" and decoded.size == grey.size
    # 16-bit is stretched to its own min..max range
    g = np.asarray(grey, float)
    expected = (g - g.min()) * 255.0 / (g.max() - g.min())
    assert np.abs(np.asarray(decode_image(image_bytes(wide)), float) - expected).max() <= 1.0


def test_decode_rejects_bad_input() -> None:
    with pytest.raises(InvalidImageError, match="empty"):
        decode_image(b"")
    with pytest.raises(InvalidImageError) as not_image:
        decode_image(b"%PDF-1.4 not an image at all")
    assert not_image.value.http_status == 415
    truncated = image_bytes(make_xray(2), "JPEG")[:200]
    with pytest.raises(InvalidImageError) as corrupt:
        decode_image(truncated, name="x.jpg")
    assert corrupt.value.http_status == 422 and "x.jpg" in str(corrupt.value)
    gif = image_bytes(make_xray(3), "GIF")
    with pytest.raises(InvalidImageError, match="GIF"):
        decode_image(gif)


def test_decode_refuses_too_many_pixels_before_decoding() -> None:
    with pytest.raises(InvalidImageError) as exc:
        decode_image(image_bytes(make_xray(4)), max_pixels=100)
    assert exc.value.http_status == 413


def test_square_resize_and_normalize() -> None:
    pixels = square_resize(make_xray(5, size=(300, 120)), 48)
    assert pixels.shape == (1, 48, 48) and pixels.dtype == torch.uint8
    x = normalize(pixels.unsqueeze(0), (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    assert x.shape == (1, 3, 48, 48) and x.dtype == torch.float32
    assert -1.0 <= x.min() and x.max() <= 1.0
    torch.testing.assert_close(x[0, 0], pixels[0].float() / 127.5 - 1.0)


def test_equalize_maps_any_exposure_of_an_image_to_the_same_pixels() -> None:
    # Eight grey levels, so a strictly increasing intensity map merges none of them: histogram
    # equalisation must then give the same pixels for the original and its re-exposed copy.
    levels = np.random.default_rng(0).integers(0, 8, size=(64, 64))
    original = Image.fromarray((levels * 20 + 30).astype(np.uint8))
    dark_low_contrast = original.point(lambda v: (v - 30) // 4 + 5)
    gamma = original.point(lambda v: round(255 * (v / 255) ** 0.5))
    equalized = square_resize(original, 64, equalize=True)
    assert torch.equal(square_resize(dark_low_contrast, 64, equalize=True), equalized)
    assert torch.equal(square_resize(gamma, 64, equalize=True), equalized)
    assert not torch.equal(square_resize(dark_low_contrast, 64), square_resize(original, 64))
    assert equalized.max() == 255  # spread over the full range, unlike the input's 30..170
    assert torch.equal(square_resize(original, 64, equalize=False), square_resize(original, 64))


def test_scan_split_reads_layout(xray_root: Path) -> None:
    samples = scan_split(xray_root, "train")
    assert class_counts(samples) == [16, 16]
    assert all(s.patient_id.startswith(("NORMAL:", "PNEUMONIA:")) for s in samples)


def test_scan_split_errors_name_the_problem(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="does not exist"):
        scan_split(tmp_path / "nowhere", "train")
    root = write_kaggle_layout(tmp_path / "ds", per_class={"train": 2})
    with pytest.raises(DatasetError, match="no 'test' split"):
        scan_split(root, "test")
    shutil.rmtree(root / "train" / "NORMAL")
    with pytest.raises(DatasetError, match="no NORMAL/ class folder"):
        scan_split(root, "train")
    (root / "train" / "NORMAL").mkdir()
    (root / "train" / "NORMAL" / "notes.txt").write_text("hi")
    with pytest.raises(DatasetError, match="holds no"):
        scan_split(root, "train")


def test_carve_validation_groups_patients_and_duplicates(tmp_path: Path) -> None:
    root = write_kaggle_layout(tmp_path / "ds", per_class={"train": 40})
    # A byte-identical copy under another patient's name must land with its twin.
    normal_dir = root / "train" / "NORMAL"
    first = sorted(normal_dir.iterdir())[0]
    shutil.copyfile(first, normal_dir / "IM-9999-0001.jpeg")
    samples = scan_split(root, "train")
    split = carve_validation(samples, fraction=0.2, seed=3)
    train_patients = {s.patient_id for s in split.train}
    val_patients = {s.patient_id for s in split.val}
    assert not train_patients & val_patients
    twins = {first.name, "IM-9999-0001.jpeg"}
    sides = {("val" if s in split.val else "train") for s in samples if s.path.name in twins}
    assert len(sides) == 1
    assert len(split.train) + len(split.val) == len(samples)
    counts = class_counts(split.val)
    assert all(6 <= c <= 12 for c in counts), counts  # ~20% of 40 per class, whole patients
    again = carve_validation(samples, fraction=0.2, seed=3)
    assert [s.path for s in again.val] == [s.path for s in split.val]
    other = carve_validation(samples, fraction=0.2, seed=4)
    assert [s.path for s in other.val] != [s.path for s in split.val]


def test_carve_validation_rejects_bad_fraction(xray_root: Path) -> None:
    with pytest.raises(ConfigError):
        carve_validation(scan_split(xray_root, "train"), fraction=1.5)


def test_split_manifest_hash_is_stable(xray_root: Path, tmp_path: Path) -> None:
    split = carve_validation(scan_split(xray_root, "train"), fraction=0.25, seed=0)
    h1 = split.write_manifest(tmp_path / "a.csv", xray_root)
    h2 = split.write_manifest(tmp_path / "b.csv", xray_root)
    assert h1 == h2 and len(h1) == 64
    header, first = (tmp_path / "a.csv").read_text().splitlines()[:2]
    assert header == "path,role,label,patient_id" and first.startswith("train/")


def test_augmentation_keeps_shape_and_changes_pixels() -> None:
    torch.manual_seed(0)
    pixels = square_resize(make_xray(6), 64)
    out = Augmentation().transform()(pixels)
    assert out.shape == pixels.shape and out.dtype == torch.uint8
    assert not torch.equal(out, pixels)
    assert torch.equal(Augmentation.none().transform()(pixels), pixels)


def test_dataset_caches_and_augments(xray_root: Path) -> None:
    samples = scan_split(xray_root, "train")[:3]
    dataset = XrayDataset(samples, size=32)
    x, y = dataset[0]
    assert x.shape == (1, 32, 32) and y == samples[0].label
    assert dataset.image(0) is dataset.image(0)  # decoded once


def test_collect_image_paths(xray_root: Path, tmp_path: Path) -> None:
    odd = tmp_path / "odd.bin"
    odd.write_bytes(b"x")
    paths = collect_image_paths([xray_root / "test", odd])
    assert len(paths) == 12 + 1 and paths[-1] == odd
