"""Image I/O, the one square preprocessing, the Kaggle-layout dataset and the patient split.

Every image, in training and in serving, goes through :func:`decode_image` (any supported file
-> 8-bit greyscale) and :func:`square_resize` (-> ``size x size``, aspect ratio not kept). The test
split of the Kermany set only exists as squashed 224x224 copies, so squashing everything the same
way keeps train, test and served images alike. No Lightning here.
"""

from __future__ import annotations

import csv
import hashlib
import io
import random
import re
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torch.utils.data import Dataset
from torchvision.transforms import v2

from pneumoscan.errors import ConfigError, DatasetError, InvalidImageError
from pneumoscan.gate import COLOURFULNESS_KEY, DICOM_MODALITY_KEY, DICOM_VIEW_KEY, colourfulness

CLASS_NAMES: tuple[str, str] = ("NORMAL", "PNEUMONIA")
SPLITS: tuple[str, ...] = ("train", "val", "test")
IMAGE_SUFFIXES: frozenset[str] = frozenset({".jpg", ".jpeg", ".png", ".dcm"})
#: Decoding more pixels than this is refused before the pixel data is read (decompression bombs).
MAX_PIXELS: int = 64_000_000
_SIGNATURES: tuple[bytes, ...] = (b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n")  # JPEG, PNG

# ---------------------------------------------------------------------------------------------
# Decoding and the square resize


def decode_image(data: bytes, *, name: str = "image", max_pixels: int = MAX_PIXELS,
                 draft_size: int | None = None) -> Image.Image:
    """Decode JPEG, PNG or DICOM bytes into an 8-bit greyscale ("L") image.

    Colour is averaged to grey, alpha is dropped (composited on black), and 16-bit greyscale is
    stretched to its own min..max range. ``draft_size`` lets JPEG decode at a reduced scale that
    is still at least that size, which is much faster for large radiographs.

    Raises:
        InvalidImageError: empty, not an image, an unsupported format, too many pixels, or corrupt.
    """
    if not data:
        raise InvalidImageError(f"{name}: the file is empty", code="empty_file")
    if data[128:132] == b"DICM":
        return decode_dicom(data, name=name, max_pixels=max_pixels)
    try:
        image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError:
        raise InvalidImageError(f"{name}: the image declares more pixels than the limit of {max_pixels}",
                                code="too_many_pixels", http_status=413) from None
    except UnidentifiedImageError:
        if data.startswith(_SIGNATURES):
            raise InvalidImageError(f"{name}: the image header is corrupt") from None
        raise InvalidImageError(
            f"{name}: not a JPEG, PNG or DICOM image", code="unsupported_media_type", http_status=415
        ) from None
    except Exception as exc:  # Pillow raises many types on hostile headers
        raise InvalidImageError(f"{name}: cannot read the image header ({exc})") from None
    if image.format not in ("JPEG", "PNG"):
        raise InvalidImageError(
            f"{name}: {image.format} images are not supported (use JPEG or PNG)",
            code="unsupported_media_type", http_status=415,
        )
    width, height = image.size
    if width * height > max_pixels:
        raise InvalidImageError(
            f"{name}: {width}x{height} pixels is more than the limit of {max_pixels}",
            code="too_many_pixels", http_status=413,
        )
    if width < 1 or height < 1:
        raise InvalidImageError(f"{name}: the image has no pixels")
    try:
        if draft_size is not None and image.format == "JPEG":
            # keep the source's own mode: the input gate needs to know whether it was colour
            image.draft(image.mode, (draft_size, draft_size))
        image.load()
        grey = _to_grey(image)
    except Exception as exc:
        raise InvalidImageError(f"{name}: the image data is corrupt or truncated ({exc})") from None
    grey.info[COLOURFULNESS_KEY] = colourfulness(image)
    return grey


def decode_dicom(data: bytes, *, name: str = "image", max_pixels: int = MAX_PIXELS) -> Image.Image:
    """DICOM (Part 10) bytes -> 8-bit grey: Rescale (modality LUT), then VOI LUT / windowing,
    then MONOCHROME1 inverted, then stretched to 0..255. All in memory.

    Error messages never quote the data set, so patient identifiers cannot leak through them.

    Raises:
        InvalidImageError: unreadable DICOM, no pixel data, too many pixels, or a compressed
            transfer syntax no installed decoder handles.
    """
    import pydicom
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    try:
        dataset = pydicom.dcmread(io.BytesIO(data))
    except Exception:
        raise InvalidImageError(f"{name}: the DICOM file is corrupt or truncated") from None
    if "PixelData" not in dataset:
        raise InvalidImageError(f"{name}: the DICOM file has no pixel data", code="dicom_no_pixels")
    try:
        rows, columns = int(dataset.get("Rows", 0) or 0), int(dataset.get("Columns", 0) or 0)
    except (TypeError, ValueError):
        raise InvalidImageError(f"{name}: the DICOM image size (Rows, Columns) is invalid") from None
    if rows * columns > max_pixels:
        raise InvalidImageError(f"{name}: {columns}x{rows} pixels is more than the limit of {max_pixels}",
                                code="too_many_pixels", http_status=413)
    try:
        pixels = dataset.pixel_array
    except Exception as exc:  # pydicom and its decoders raise many types on broken pixel data
        raise InvalidImageError(f"{name}: cannot decode the DICOM pixel data{_transfer_syntax(dataset)}: "
                                f"{type(exc).__name__}", code="dicom_undecodable") from None
    if pixels.ndim == 3 and dataset.get("SamplesPerPixel", 1) == 1:
        pixels = pixels[0]  # multi-frame: the first frame
    if pixels.ndim != 2:
        raise InvalidImageError(f"{name}: only single-channel (greyscale) DICOM images are supported",
                                code="unsupported_media_type", http_status=415)
    try:
        values = apply_voi_lut(apply_modality_lut(pixels, dataset), dataset).astype(np.float64)
    except Exception:  # a malformed Rescale or VOI LUT / window attribute
        raise InvalidImageError(f"{name}: the DICOM rescale or window (VOI LUT) attributes are invalid") from None
    if not np.isfinite(values).all():
        raise InvalidImageError(f"{name}: the DICOM rescale or window gives non-finite pixel values")
    if str(dataset.get("PhotometricInterpretation", "")).upper() == "MONOCHROME1":
        values = values.max() + values.min() - values
    low, high = float(values.min()), float(values.max())
    scale = 255.0 / (high - low) if high > low else 0.0
    image = Image.fromarray(((values - low) * scale).round().astype(np.uint8))
    # Only these two acquisition tags travel on, for the input gate; no other tag leaves here.
    image.info[DICOM_MODALITY_KEY] = str(dataset.get("Modality", "") or "").strip().upper()
    image.info[DICOM_VIEW_KEY] = str(dataset.get("ViewPosition", "") or "").strip().upper()
    return image


def _transfer_syntax(dataset: Any) -> str:
    """`` (transfer syntax NAME)`` for error messages, or "" when the file's own value is unusable."""
    try:
        return f" (transfer syntax {dataset.file_meta.TransferSyntaxUID.name})"
    except Exception:
        return ""


def _to_grey(image: Image.Image) -> Image.Image:
    """Any Pillow mode -> "L"."""
    if image.mode == "L":
        return image
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        array = np.asarray(image, dtype=np.float64)
        low, high = float(array.min()), float(array.max())
        scale = 255.0 / (high - low) if high > low else 0.0
        return Image.fromarray(((array - low) * scale).round().astype(np.uint8))
    if image.mode == "P":
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA"):
        background = Image.new("RGBA", image.size, (0, 0, 0, 255))
        image = Image.alpha_composite(background, image.convert("RGBA"))
    return image.convert("RGB").convert("L")


def load_image(path: str | Path, *, draft_size: int | None = None) -> Image.Image:
    """Read an image file from disk as 8-bit greyscale.

    Raises:
        InvalidImageError: the file cannot be read or decoded.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise InvalidImageError(f"{path}: cannot read the file ({exc.strerror})") from None
    return decode_image(data, name=str(path), draft_size=draft_size)


def square_resize(image: Image.Image, size: int, *, equalize: bool = False) -> torch.Tensor:
    """Greyscale PIL image -> uint8 tensor ``1 x size x size`` (aspect ratio not kept).

    ``equalize`` histogram-equalises the resized image, so every image reaches the network with
    the same intensity distribution whatever its exposure, contrast or the pipeline that copied it.
    A bundle records whether it was trained that way (``BundleSpec.equalize``).
    """
    if image.size != (size, size):
        image = image.resize((size, size), Image.Resampling.BILINEAR, reducing_gap=3.0)
    if equalize:
        image = ImageOps.equalize(image)
    return torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).unsqueeze(0)


def normalize(batch: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 ``(..., 1, H, W)`` -> float ``(..., 3, H, W)`` in the backbone's normalisation."""
    x = batch.float().div_(255.0)
    x = x.expand(*x.shape[:-3], 3, *x.shape[-2:])
    mean_t = torch.tensor(mean, dtype=x.dtype).view(3, 1, 1)
    std_t = torch.tensor(std, dtype=x.dtype).view(3, 1, 1)
    return (x - mean_t) / std_t


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
            f"expected {root}/{split}/NORMAL and {root}/{split}/PNEUMONIA"
        )
    samples: list[Sample] = []
    for label, class_name in enumerate(CLASS_NAMES):
        class_dir = split_dir / class_name
        if not class_dir.is_dir():
            raise DatasetError(f"{split_dir} has no {class_name}/ class folder")
        files = sorted(p for p in class_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise DatasetError(f"{class_dir} holds no .jpeg/.jpg/.png image")
        samples.extend(Sample(p, label, patient_id_from_name(p.name, label)) for p in files)
    return samples


def file_sha256(path: Path) -> str:
    """Hex SHA-256 of a file's bytes."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


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
# Augmentation and the dataset


@dataclass(frozen=True)
class Augmentation:
    """The seed's training augmentation; every part can be switched off or resized."""

    rotation_degrees: float = 30.0
    translate: float = 0.2
    scale_min: float = 0.8
    scale_max: float = 1.2
    shear_degrees: float = 10.0
    brightness: float = 0.2
    horizontal_flip: bool = True
    # Beyond the seed: exposure and sharpness differ between X-ray machines and copies.
    contrast: float = 0.0  # ColorJitter contrast factor range
    blur_sigma: float = 0.0  # Gaussian blur up to this sigma (pixels), applied to half the images

    def transform(self) -> Callable[[torch.Tensor], torch.Tensor]:
        """A transforms-v2 pipeline on uint8 ``1 x H x W`` tensors."""
        steps: list[torch.nn.Module] = []
        if self.rotation_degrees or self.translate or self.shear_degrees or (self.scale_min, self.scale_max) != (1.0, 1.0):
            steps.append(v2.RandomAffine(
                degrees=self.rotation_degrees,
                translate=(self.translate, self.translate) if self.translate else None,
                scale=(self.scale_min, self.scale_max),
                shear=self.shear_degrees or None,
                interpolation=v2.InterpolationMode.BILINEAR,
            ))
        if self.brightness or self.contrast:
            steps.append(v2.ColorJitter(brightness=self.brightness or None, contrast=self.contrast or None))
        if self.blur_sigma:
            steps.append(v2.RandomApply([v2.GaussianBlur(5, sigma=(0.1, self.blur_sigma))], p=0.5))
        if self.horizontal_flip:
            steps.append(v2.RandomHorizontalFlip())
        return v2.Compose(steps) if steps else v2.Identity()

    @classmethod
    def none(cls) -> "Augmentation":
        """No augmentation at all."""
        return cls(0.0, 0.0, 1.0, 1.0, 0.0, 0.0, False, 0.0, 0.0)


@dataclass
class XrayDataset(Dataset):
    """Labelled images -> ``(uint8 1 x S x S tensor, label)``; normalisation happens in the model.

    With ``cache=True`` each image is decoded and resized once and kept in memory (5,856 images at
    224 px are ~300 MB), which matters on a 2-core machine where JPEG decoding would otherwise
    compete with the network for the CPU every epoch.
    """

    samples: Sequence[Sample]
    size: int = 224
    augment: Callable[[torch.Tensor], torch.Tensor] | None = None
    cache: bool = True
    equalize: bool = False  # histogram equalisation after the resize (see square_resize)
    _cache: dict[int, torch.Tensor] = field(default_factory=dict, repr=False)

    def __len__(self) -> int:
        return len(self.samples)

    def image(self, index: int) -> torch.Tensor:
        """The resized uint8 image at ``index``, before augmentation."""
        cached = self._cache.get(index)
        if cached is not None:
            return cached
        pixels = square_resize(load_image(self.samples[index].path, draft_size=self.size), self.size,
                               equalize=self.equalize)
        if self.cache:
            self._cache[index] = pixels
        return pixels

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        pixels = self.image(index)
        if self.augment is not None:
            pixels = self.augment(pixels)
        return pixels, self.samples[index].label


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
