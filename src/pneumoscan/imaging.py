"""Image files to the network's input: decode any supported file, then the one square resize.

Every image, in training and in serving, goes through :func:`decode_image` (JPEG, PNG or DICOM
-> 8-bit greyscale) and :meth:`Preprocessing.pixels` (-> uint8 ``1 x size x size``, aspect ratio
not kept). The test split of the Kermany set only exists as squashed 224x224 copies, so squashing
everything the same way keeps train, test and served images alike. numpy and Pillow only.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from pneumoscan.errors import InvalidImageError
from pneumoscan.gate import COLOURFULNESS_KEY, DICOM_MODALITY_KEY, DICOM_VIEW_KEY, colourfulness

IMAGE_SUFFIXES: frozenset[str] = frozenset({".jpg", ".jpeg", ".png", ".dcm"})
#: Decoding more pixels than this is refused before the pixel data is read (decompression bombs).
MAX_PIXELS: int = 64_000_000
_SIGNATURES: tuple[bytes, ...] = (b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n")  # JPEG, PNG

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
        # A phone or scanner JPEG stored sideways says so in its EXIF Orientation: turn it
        # upright here, once, for every caller (API, page, CLI, evaluation, training).
        image = ImageOps.exif_transpose(image)
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
    except Exception:  # pydicom raises many types on a malformed element (NotImplementedError for a bad VR)
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
        # On white, as a viewer shows a transparent PNG: on black, a semi-transparent film
        # darkens and reads as another exposure (P(pneumonia) 0.34 -> 0.80 in one case).
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
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


def square_resize(image: Image.Image, size: int, *, equalize: bool = False) -> np.ndarray:
    """Greyscale PIL image -> uint8 array ``1 x size x size`` (aspect ratio not kept).

    ``equalize`` histogram-equalises the resized image, so every image reaches the network with
    the same intensity distribution whatever its exposure, contrast or the pipeline that copied it.
    """
    if image.mode != "L":
        image = image.convert("L")
    if image.size != (size, size):
        image = image.resize((size, size), Image.Resampling.BILINEAR, reducing_gap=3.0)
    if equalize:
        image = ImageOps.equalize(image)
    return np.asarray(image, dtype=np.uint8)[None].copy()


@dataclass(frozen=True)
class Preprocessing:
    """A network's input transform: the square resize to ``size``, and equalisation if trained so.

    The one owner of "image -> network input": training's dataset, serving, the input gate,
    Grad-CAM, the ONNX export's parity images and the benchmarks all call it. A bundle's is
    ``BundleSpec.preprocessing``.
    """

    size: int
    equalize: bool = False

    def pixels(self, image: Image.Image) -> np.ndarray:
        """A decoded image -> uint8 ``1 x size x size``."""
        return square_resize(image, self.size, equalize=self.equalize)

    def decode(self, data: bytes, *, name: str = "image") -> Image.Image:
        """Bytes -> greyscale image (JPEG decoded at no more resolution than ``size`` needs).

        Raises:
            InvalidImageError: the bytes are not a readable image.
        """
        return decode_image(data, name=name, draft_size=self.size)

    def load(self, path: str | Path) -> Image.Image:
        """A file -> greyscale image, decoded as :meth:`decode` does.

        Raises:
            InvalidImageError: the file cannot be read or decoded.
        """
        return load_image(path, draft_size=self.size)

    def read(self, path: str | Path) -> np.ndarray:
        """A file -> :meth:`pixels`.

        Raises:
            InvalidImageError: the file cannot be read or decoded.
        """
        return self.pixels(self.load(path))
