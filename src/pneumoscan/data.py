"""The Kaggle layout, the patient-grouped validation split, and the training dataset.

``ROOT/{train,val,test}/{NORMAL,PNEUMONIA}`` -> :class:`Sample` lists; a split carved by patient
(and by identical file) that a bundle keeps as ``split.csv``; :class:`XrayDataset`, which feeds
training through :class:`~pneumoscan.imaging.Preprocessing`. No Lightning here.
"""

from __future__ import annotations

import csv
import hashlib
import io
import random
import re
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

from pneumoscan.errors import BundleError, ConfigError, DatasetError
from pneumoscan.imaging import IMAGE_SUFFIXES

CLASS_NAMES: tuple[str, str] = ("NORMAL", "PNEUMONIA")
SPLITS: tuple[str, ...] = ("train", "val", "test")
SPLIT_FILE = "split.csv"

# ---------------------------------------------------------------------------------------------
# The Kaggle layout


@dataclass(frozen=True)
class Sample:
    """One labelled image file."""

    path: Path
    label: int  # index into CLASS_NAMES
    patient_id: str


_PERSON = re.compile(r"^(person\d+)_(?:bacteria|virus)", re.IGNORECASE)
_IM = re.compile(r"^((?:NORMAL2-)?IM-\d+)", re.IGNORECASE)


def patient_id_from_name(file_name: str, label: int) -> str:
    """Patient id from a Kermany file name, prefixed with the class.

    ``person1000_bacteria_2931.jpeg`` -> ``PNEUMONIA:person1000``; ``IM-0115-0001.jpeg`` ->
    ``NORMAL:IM-0115``; ``NORMAL2-IM-1427-0001.jpeg`` -> ``NORMAL:NORMAL2-IM-1427``. Other names
    fall back to the file stem, i.e. one patient per file.
    """
    stem = Path(file_name).stem
    match = _PERSON.match(stem) or _IM.match(stem)
    return f"{CLASS_NAMES[label]}:{match.group(1) if match else stem}"


#: Images per class below which a fitted temperature, threshold or gate, or a measured figure,
#: rests on too few to trust: calibration refuses a site sample under it, ``train`` warns when its
#: validation split is under it, and ``evaluate`` and the model card say so.
MIN_IMAGES_PER_CLASS = 20


def is_labelled_folder(folder: str | Path) -> bool:
    """Whether ``folder`` holds the class folders itself (``NORMAL/`` and ``PNEUMONIA/``)."""
    return all((Path(folder) / name).is_dir() for name in CLASS_NAMES)


def scan_evaluation_data(root: str | Path, split: str) -> tuple[list[Sample], str]:
    """The images to evaluate and the layout they were read as: ``ROOT/<split>/{NORMAL,PNEUMONIA}``
    (the Kaggle layout), or, when ROOT holds ``NORMAL/`` and ``PNEUMONIA/`` itself and no
    ``<split>`` folder, ROOT as a plain labelled folder (as ``calibrate --site`` takes).

    Raises:
        DatasetError: neither layout is there, or a class has no image.
    """
    root = Path(root)
    if root.is_dir() and not (root / split).is_dir() and is_labelled_folder(root):
        return scan_labelled_folder(root), f"the labelled folder {root} (NORMAL/, PNEUMONIA/)"
    return scan_split(root, split), f"the '{split}' split of the Kaggle layout {root}"


def scan_split(root: str | Path, split: str) -> list[Sample]:
    """List the images of ``ROOT/<split>/{NORMAL,PNEUMONIA}``.

    Raises:
        DatasetError: the root, the split or a class folder is missing, or a class has no image.
    """
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(
            f"dataset folder {root} does not exist; point --data at the folder that holds "
            "train/, val/ and test/ (the Kaggle chest_xray layout)"
        )
    split_dir = root / split
    if not split_dir.is_dir():
        found = sorted(p.name for p in root.iterdir() if p.is_dir())
        raise DatasetError(
            f"{root} has no '{split}' split folder (found: {', '.join(found) or 'nothing'}); "
            f"expected {root}/{split}/NORMAL and {root}/{split}/PNEUMONIA, or NORMAL/ and PNEUMONIA/ in {root} itself"
        )
    return scan_labelled_folder(split_dir)


def scan_labelled_folder(folder: str | Path) -> list[Sample]:
    """List the images of ``FOLDER/{NORMAL,PNEUMONIA}`` (a split, or a site's labelled sample).

    Raises:
        DatasetError: the folder or a class folder is missing, or a class has no image.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise DatasetError(f"{folder} does not exist; expected a folder holding NORMAL/ and PNEUMONIA/")
    samples: list[Sample] = []
    for label, class_name in enumerate(CLASS_NAMES):
        class_dir = folder / class_name
        if not class_dir.is_dir():
            raise DatasetError(f"{folder} has no {class_name}/ class folder")
        files = sorted(p for p in class_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        broken = [p for p in files if not p.is_file()]  # a symlink loop, a dangling link, a folder named x.jpg
        if broken:
            raise DatasetError(f"{broken[0]} is not a readable file (a symbolic link that loops or points "
                               f"nowhere, or a folder){f', nor are {len(broken) - 1} more' if len(broken) > 1 else ''}; "
                               "remove or fix it")
        if not files:
            raise DatasetError(f"{class_dir} holds no .jpeg/.jpg/.png/.dcm image")
        samples.extend(Sample(p, label, patient_id_from_name(p.name, label)) for p in files)
    return samples


def file_sha256(path: Path) -> str:
    """Hex SHA-256 of a file's bytes.

    Raises:
        DatasetError: the file cannot be read.
    """
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError as exc:
        raise DatasetError(f"{path}: cannot read the file ({exc.strerror})") from None


# ---------------------------------------------------------------------------------------------
# The patient-grouped validation split


@dataclass(frozen=True)
class Split:
    """Train and validation samples carved from the training pool."""

    train: list[Sample]
    val: list[Sample]

    def manifest_rows(self, root: Path) -> list[tuple[str, str, str, str]]:
        """``(path relative to root, role, label, patient_id)`` rows, sorted by path."""
        rows = []
        for role, samples in (("train", self.train), ("val", self.val)):
            for s in samples:
                rows.append((_relative(s.path, root), role, CLASS_NAMES[s.label], s.patient_id))
        return sorted(rows)

    def write_manifest(self, path: Path, root: Path) -> str:
        """Write the split as CSV and return its sha256."""
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(("path", "role", "label", "patient_id"))
        writer.writerows(self.manifest_rows(root))
        text = buffer.getvalue().encode()
        path.write_bytes(text)
        return hashlib.sha256(text).hexdigest()


def _relative(path: Path, root: Path) -> str:
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return path.as_posix()


def carve_validation(samples: Sequence[Sample], *, fraction: float = 0.1, seed: int = 0) -> Split:
    """Split ``samples`` into train/validation by patient, stratified by class.

    Images of one patient, and byte-identical files (even under different patient ids), always
    land on the same side. For each class, patient groups are shuffled with ``seed`` and taken
    into validation until the class's share reaches ``fraction``.

    Raises:
        ConfigError: ``fraction`` outside (0, 1).
        DatasetError: too few patients to leave some on both sides.
    """
    if not 0.0 < fraction < 1.0:
        raise ConfigError(f"validation fraction must be between 0 and 1, got {fraction}")
    parent = list(range(len(samples)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    first_by_key: dict[str, int] = {}
    for i, s in enumerate(samples):
        for key in (f"patient:{s.patient_id}", f"sha:{file_sha256(s.path)}"):
            j = first_by_key.setdefault(key, i)
            parent[find(i)] = find(j)

    groups: dict[int, list[int]] = defaultdict(list)
    for i in range(len(samples)):
        groups[find(i)].append(i)
    by_class: dict[int, list[list[int]]] = defaultdict(list)
    for members in groups.values():
        majority = Counter(samples[i].label for i in members).most_common(1)[0][0]
        by_class[majority].append(sorted(members))

    rng = random.Random(seed)
    val_idx: set[int] = set()
    for label in sorted(by_class):
        class_groups = sorted(by_class[label])
        if len(class_groups) < 2:
            raise DatasetError(
                f"class {CLASS_NAMES[label]} has {len(class_groups)} patient(s); need at least 2 "
                "to carve a validation split"
            )
        rng.shuffle(class_groups)
        target = fraction * sum(len(g) for g in class_groups)
        taken = 0
        for group in class_groups[:-1]:  # always leave at least one group for training
            if taken >= target:
                break
            val_idx.update(group)
            taken += len(group)
    train = [s for i, s in enumerate(samples) if i not in val_idx]
    val = [s for i, s in enumerate(samples) if i in val_idx]
    return Split(train=train, val=val)


def class_counts(samples: Iterable[Sample]) -> list[int]:
    """Number of samples per class, in CLASS_NAMES order."""
    counts = Counter(s.label for s in samples)
    return [counts.get(i, 0) for i in range(len(CLASS_NAMES))]


# ---------------------------------------------------------------------------------------------
# A bundle's split, read back


def read_split(bundle_dir: Path, data_root: Path, *, role: str = "val") -> list[Sample]:
    """The bundle's validation (or ``role="train"``) images, from its ``split.csv``, under ``data_root``.

    Raises:
        BundleError: the bundle has no split.csv.
        DatasetError: a listed image is missing under ``data_root``.
    """
    split_csv = Path(bundle_dir) / SPLIT_FILE
    if not split_csv.is_file():
        raise BundleError(f"{bundle_dir} has no {SPLIT_FILE}, so its validation split is unknown")
    samples = []
    with split_csv.open(newline="") as handle:
        for row in csv.DictReader(handle):
            if row["role"] != role:
                continue
            path = Path(data_root) / row["path"]
            if not path.is_file():
                raise DatasetError(f"{path} (listed in {split_csv}) does not exist; is --data the "
                                   "folder the model was trained on?")
            samples.append(Sample(path, CLASS_NAMES.index(row["label"]), row["patient_id"]))
    return samples


def collect_image_paths(paths: Iterable[str | Path]) -> list[Path]:
    """Expand files and folders (recursively) into image file paths, in a stable order.

    Files given by name are kept whatever their suffix, so that a bad file is reported rather
    than silently skipped; folders contribute their .jpeg/.jpg/.png files.
    """
    result: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            result.extend(sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES))
        else:
            result.append(path)
    return result


def describe_dataset(root: Path, split: Split, *, max_headers: int = 2000) -> dict:
    """What the model card says about a run's own data: the folder's name, a digest of the
    training pool's contents, class counts per split, and the image sizes seen (read from the
    headers of up to ``max_headers`` files, evenly spaced)."""
    from PIL import Image

    pool = sorted(split.train + split.val, key=lambda s: s.path)
    digest = hashlib.sha256()
    for sample in pool:
        digest.update(f"{_relative(sample.path, root)}\0{CLASS_NAMES[sample.label]}\0{file_sha256(sample.path)}\n".encode())
    counts = {"train": dict(zip(CLASS_NAMES, class_counts(split.train))),
              "validation": dict(zip(CLASS_NAMES, class_counts(split.val)))}
    try:
        counts["test"] = dict(zip(CLASS_NAMES, class_counts(scan_split(root, "test"))))
    except DatasetError:
        pass  # no test/ folder: nothing held out beyond validation
    sizes = []
    for sample in pool[:: max(1, len(pool) // max_headers)]:
        try:
            if sample.path.suffix.lower() == ".dcm":
                import pydicom

                header = pydicom.dcmread(sample.path, stop_before_pixels=True)
                sizes.append((int(header.Columns), int(header.Rows)))
            else:
                with Image.open(sample.path) as image:  # the header only: no pixels decoded
                    sizes.append(image.size)
        except Exception:  # an unreadable file is training's problem to report, not the card's
            continue
    areas = sorted(sizes, key=lambda wh: wh[0] * wh[1])
    return {
        "folder": root.resolve().name,
        "sha256": digest.hexdigest(),
        "digest_of": "sorted (relative path, class, file sha256) of the training and validation images",
        "n_by_split": counts,
        "image_sizes": ({"n_read": len(sizes), "smallest": list(areas[0]), "median": list(areas[len(areas) // 2]),
                         "largest": list(areas[-1])} if areas else None),
    }
