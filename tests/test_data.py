"""pneumoscan.data: the Kaggle layout, the patient split, its manifest read back, the dataset."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from conftest import write_kaggle_layout
from pneumoscan.data import (
    carve_validation,
    class_counts,
    collect_image_paths,
    patient_id_from_name,
    read_split,
    scan_split,
)
from pneumoscan.dataset import XrayDataset
from pneumoscan.errors import BundleError, ConfigError, DatasetError
from pneumoscan.imaging import Preprocessing


@pytest.mark.parametrize("name,label,expected", [
    ("person1000_bacteria_2931.jpeg", 1, "PNEUMONIA:person1000"),
    ("person447_virus_921_1.jpeg", 1, "PNEUMONIA:person447"),
    ("IM-0115-0001.jpeg", 0, "NORMAL:IM-0115"),
    ("NORMAL2-IM-1427-0001.jpeg", 0, "NORMAL:NORMAL2-IM-1427"),
    ("scan.png", 0, "NORMAL:scan"),
])
def test_patient_id_from_name(name: str, label: int, expected: str) -> None:
    assert patient_id_from_name(name, label) == expected


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


def test_dataset_caches_and_augments(xray_root: Path) -> None:
    samples = scan_split(xray_root, "train")[:3]
    dataset = XrayDataset(samples, Preprocessing(size=32))
    x, y = dataset[0]
    assert x.shape == (1, 32, 32) and y == samples[0].label
    assert dataset.image(0) is dataset.image(0)  # decoded once


def test_collect_image_paths(xray_root: Path, tmp_path: Path) -> None:
    odd = tmp_path / "odd.bin"
    odd.write_bytes(b"x")
    paths = collect_image_paths([xray_root / "test", odd])
    assert len(paths) == 12 + 1 and paths[-1] == odd


def test_read_split_reads_back_what_the_manifest_wrote(xray_root: Path, tmp_path: Path) -> None:
    split = carve_validation(scan_split(xray_root, "train"), fraction=0.25, seed=3)
    split.write_manifest(tmp_path / "split.csv", xray_root)
    assert read_split(tmp_path, xray_root) == split.val
    assert read_split(tmp_path, xray_root, role="train") == split.train
    with pytest.raises(BundleError, match="split.csv"):
        read_split(tmp_path / "elsewhere", xray_root)
    with pytest.raises(DatasetError, match="does not exist"):
        read_split(tmp_path, tmp_path / "not-the-data")
