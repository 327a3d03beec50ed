"""Image files to the network's input: decode any supported file, then the one square resize.

Every image, in training and in serving, goes through :func:`decode_image` (JPEG, PNG or DICOM
-> 8-bit greyscale) and :meth:`Preprocessing.pixels` (-> uint8 ``1 x size x size``, aspect ratio
not kept). The test split of the Kermany set only exists as squashed 224x224 copies, so squashing
everything the same way keeps train, test and served images alike. numpy and Pillow only.
"""

from __future__ import annotations

import io
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from pneumoscan.errors import InvalidImageError
from pneumoscan.gate import COLOURFULNESS_KEY, colourfulness

IMAGE_SUFFIXES: frozenset[str] = frozenset({".jpg", ".jpeg", ".png", ".dcm"})
#: Decoding more pixels than this is refused before the pixel data is read (decompression bombs).
MAX_PIXELS: int = 64_000_000
#: The most memory one image may take to decode: pixels (at the scale decoded) x bytes per pixel
#: x frames decoded, plus a progressive JPEG's full-size coefficients. Checked from the header,
#: before any pixel data is read. 64 MB is a 64-megapixel 8-bit film or a 32-megapixel 16-bit
#: one; a detector-sized radiograph (4300 x 4300 x 16 bit) takes 37 MB. A small file can declare
#: far more (a 140 kB 16-bit PNG of 8000 x 8000 decodes to 128 MB and cost 1.7 GB before).
MAX_DECODE_BYTES: int = 64_000_000
#: libjpeg decodes a progressive JPEG scan by scan, each a pass over every coefficient block, so
#: thousands of empty scans cost tens of seconds of CPU. Encoders write about 6 (grey) to 10
#: (colour); libjpeg-turbo's documentation suggests limits of a few hundred.
MAX_JPEG_SCANS: int = 100
#: Bytes per pixel of Pillow's own storage for each mode (RGB is stored as 4 bytes); a palette
#: image costs its indices plus the grey image its palette is mapped to (no RGBA copy is made).
_BYTES_PER_PIXEL: dict[str, int] = {"1": 1, "L": 1, "P": 2, "I;16": 2, "I;16B": 2, "I;16L": 2}
#: Pillow keeps a pointer per row for every full-size image (the decoded one and the resize's
#: reduced copy): a 1 x 60,000,000 PNG is 60 MB of pixels but cost +1 GB in row tables.
ROW_BYTES: int = 16
_SOS = b"\xff\xda"  # JPEG start-of-scan; entropy-coded data never contains it (0xFF is stuffed)
JPEG_SIGNATURE = b"\xff\xd8\xff"
_SIGNATURES: tuple[bytes, ...] = (JPEG_SIGNATURE, b"\x89PNG\r\n\x1a\n")  # JPEG, PNG
#: Pillow's formats decoded here. MPO (phone cameras, Ultra HDR) is a JPEG followed by more
#: images: its first frame is the picture, and only that frame is decoded.
_FORMATS = ("JPEG", "MPO", "PNG")

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
        from pneumoscan.dicom.pixels import decode_dicom

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
    if image.format not in _FORMATS:
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
        if draft_size is not None and image.format in ("JPEG", "MPO"):
            # keep the source's own mode: the input gate needs to know whether it was colour
            image.draft(image.mode, (draft_size, draft_size))
    except Exception as exc:
        raise InvalidImageError(f"{name}: cannot read the image header ({exc})") from None
    _check_budget(image, (width, height), data, name)
    try:
        image.load()
        # A phone or scanner JPEG stored sideways says so in its EXIF Orientation: turn it
        # upright here, once, for every caller (API, page, CLI, evaluation, training).
        image = ImageOps.exif_transpose(image)
        grey = _to_grey(image)
    except Exception as exc:
        raise InvalidImageError(f"{name}: the image data is corrupt or truncated ({exc})") from None
    grey.info[COLOURFULNESS_KEY] = colourfulness(image)
    return grey


def _check_budget(image: Image.Image, full_size: tuple[int, int], data: bytes, name: str) -> None:
    """Refuse, from the header alone, an image that would cost more than the decoding budget.

    Raises:
        InvalidImageError: ``decode_budget_exceeded`` (413).
    """
    width, height = image.size  # after a JPEG draft: the reduced size actually decoded
    cost = width * height * _BYTES_PER_PIXEL.get(image.mode, 4) + height * ROW_BYTES
    if image.format in ("JPEG", "MPO") and ("progressive" in image.info or "progression" in image.info):
        # libjpeg holds every DCT coefficient (2 bytes) of a progressive image at full size,
        # whatever the draft scale, and walks all of them once per scan.
        cost = max(cost, full_size[0] * full_size[1] * 2 * len(image.getbands()))
        scans = data.count(_SOS)
        if scans > MAX_JPEG_SCANS:
            raise InvalidImageError(f"{name}: the progressive JPEG has {scans} scans; the limit is {MAX_JPEG_SCANS}",
                                    code="decode_budget_exceeded", http_status=413)
    refuse_over_budget(cost, f"{full_size[0]}x{full_size[1]} {image.mode}", name)


def refuse_over_budget(cost: int, what: str, name: str) -> None:
    """Raises InvalidImageError (``decode_budget_exceeded``) when ``cost`` bytes exceed the budget."""
    if cost > MAX_DECODE_BYTES:
        raise InvalidImageError(
            f"{name}: decoding this {what} image would take {cost / 1e6:.0f} MB of memory; "
            f"the limit is {MAX_DECODE_BYTES / 1e6:.0f} MB", code="decode_budget_exceeded", http_status=413)


_ROWS_PER_CHUNK = 256


def stretch_to_uint8(stored: np.ndarray, transform: Callable[[np.ndarray], np.ndarray] | None = None, *,
                     invert: bool = False) -> np.ndarray:
    """Samples -> uint8, their (transformed) values stretched linearly over 0..255.

    ``transform`` maps stored values elementwise (a DICOM rescale and window). 8- and 16-bit
    samples go through a lookup table over every possible code, applied a band of rows at a
    time, so no float (or index) copy of the full image is ever made: a 64-megapixel 16-bit film
    takes its own 128 MB plus 64 MB of output, where float64 copies took 1.7 GB.

    Raises:
        FloatingPointError: the transform gives a non-finite value for a sample in the image.
    """
    transform = transform or (lambda values: values)
    if stored.dtype.kind in "ui" and stored.dtype.itemsize <= 2:
        unsigned = np.dtype(f"u{stored.dtype.itemsize}")
        codes = stored.view(unsigned)  # signed samples by their bit pattern
        present = np.zeros(1 << (8 * unsigned.itemsize), dtype=bool)
        for start in range(0, codes.shape[0], _ROWS_PER_CHUNK):
            present[codes[start:start + _ROWS_PER_CHUNK]] = True
        values = np.asarray(transform(np.arange(present.size, dtype=unsigned).view(stored.dtype)), dtype=np.float64)
        low, high = _finite_range(values[present])
        lut = _stretched(values, low, high, invert)
        out = np.empty(codes.shape, dtype=np.uint8)
        for start in range(0, codes.shape[0], _ROWS_PER_CHUNK):
            out[start:start + _ROWS_PER_CHUNK] = lut[codes[start:start + _ROWS_PER_CHUNK]]
        return out
    # 32-bit or float samples: transformed a band of rows at a time, twice (range, then output), so
    # the float64 copies a rescale and window make are a band's, not the film's (+505 MB before).
    bands = [slice(start, start + _ROWS_PER_CHUNK) for start in range(0, stored.shape[0], _ROWS_PER_CHUNK)]
    ranges = [_finite_range(np.asarray(transform(stored[band]), dtype=np.float64)) for band in bands]
    low, high = min(r[0] for r in ranges), max(r[1] for r in ranges)
    out = np.empty(stored.shape, dtype=np.uint8)
    for band in bands:
        out[band] = _stretched(np.asarray(transform(stored[band]), dtype=np.float64), low, high, invert)
    return out


def _finite_range(values: np.ndarray) -> tuple[float, float]:
    low, high = float(values.min()), float(values.max())
    if not (np.isfinite(low) and np.isfinite(high)):
        raise FloatingPointError("non-finite sample values")
    return low, high


def _stretched(values: np.ndarray, low: float, high: float, invert: bool) -> np.ndarray:
    scale = 255.0 / (high - low) if high > low else 0.0
    out = np.clip((values - low) * scale, 0, 255).round().astype(np.uint8)
    return 255 - out if invert else out  # MONOCHROME1: low values are white


def _to_grey(image: Image.Image) -> Image.Image:
    """Any Pillow mode -> "L"."""
    if image.mode == "L":
        return image
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        return Image.fromarray(stretch_to_uint8(np.asarray(image)))
    if image.mode == "P":
        return _palette_to_grey(image)
    if image.mode in ("RGBA", "LA", "PA"):
        # On white, as a viewer shows a transparent PNG: on black, a semi-transparent film
        # darkens and reads as another exposure (P(pneumonia) 0.34 -> 0.80 in one case).
        # Grey first, then composited (the same up to rounding: both are linear), so no second
        # full-size colour copy is made.
        grey = Image.new("L", image.size, 255)
        grey.paste(image.convert("L"), mask=image.getchannel("A"))
        return grey
    return image.convert("L")


def _palette_to_grey(image: Image.Image) -> Image.Image:
    """A palette image -> "L" through its palette: each entry turned grey (ITU-R 601, as Pillow's
    "L" conversion) and composited on white by its own alpha, then the indices mapped once. An
    8000^2 palette PNG took +490 MB through a full-size RGBA copy; this takes its 64 MB."""
    rgb = np.zeros((256, 3), dtype=np.float64)
    palette = np.asarray(image.getpalette("RGB") or [], dtype=np.float64).reshape(-1, 3)[:256]
    rgb[: len(palette)] = palette
    alpha = np.full(256, 255.0)
    if image.palette is not None and image.palette.mode == "RGBA":
        alpha[: len(palette)] = np.asarray(image.getpalette("RGBA"), dtype=np.float64).reshape(-1, 4)[:256, 3]
    transparency = image.info.get("transparency")
    if isinstance(transparency, int) and 0 <= transparency < 256:
        alpha[transparency] = 0.0
    elif isinstance(transparency, bytes):
        alpha[: min(len(transparency), 256)] = np.frombuffer(transparency[:256], dtype=np.uint8)
    grey = rgb @ np.array([0.299, 0.587, 0.114])
    composited = np.clip(np.round(grey * alpha / 255.0 + 255.0 * (1.0 - alpha / 255.0)), 0, 255).astype(np.uint8)
    # The decoded image is this function's own: its palette is replaced in place, no pixel copied.
    image.info.pop("transparency", None)
    image.putpalette(np.repeat(composited, 3).tobytes(), "RGB")
    return image.convert("L")


def load_image(path: str | Path, *, draft_size: int | None = None) -> Image.Image:
    """Read an image file from disk as 8-bit greyscale.

    Raises:
        InvalidImageError: the file cannot be read or decoded.
    """
    path = Path(path)
    return decode_image(read_file(path), name=str(path), draft_size=draft_size)


#: The largest image file read from disk: the most pixel data the decoding budget admits, plus
#: room for headers. Nothing larger can decode within the budget, so it is refused unread (a 3 GB
#: sparse file took 3.4 GB, and /dev/zero named x.jpeg ran to a MemoryError).
MAX_FILE_BYTES: int = MAX_DECODE_BYTES + 16_000_000
_FILE_KINDS = {stat.S_IFIFO: "a FIFO (named pipe)", stat.S_IFCHR: "a character device",
               stat.S_IFBLK: "a block device", stat.S_IFSOCK: "a socket", stat.S_IFDIR: "a folder"}


def read_file(path: Path) -> bytes:
    """A regular file's bytes, looked at before it is read: opened without blocking (a FIFO would
    wait for a writer for ever), checked to be a regular file no larger than MAX_FILE_BYTES.

    Raises:
        InvalidImageError: not a regular file, too large, or unreadable.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOCTTY", 0))
    except OSError as exc:
        raise InvalidImageError(f"{path}: cannot read the file ({exc.strerror})") from None
    try:
        info = os.fstat(fd)
        kind = stat.S_IFMT(info.st_mode)
        if kind != stat.S_IFREG:
            raise InvalidImageError(f"{path}: is {_FILE_KINDS.get(kind, 'not a regular file')}, not an image file",
                                    code="not_a_file")
        if info.st_size > MAX_FILE_BYTES:
            raise InvalidImageError(f"{path}: the file is {info.st_size / 1e6:.0f} MB; the limit is "
                                    f"{MAX_FILE_BYTES / 1e6:.0f} MB", code="payload_too_large", http_status=413)
        with os.fdopen(os.dup(fd), "rb") as handle:
            data = handle.read(MAX_FILE_BYTES + 1)  # a file that grows meanwhile is still bounded
    except OSError as exc:
        raise InvalidImageError(f"{path}: cannot read the file ({exc.strerror})") from None
    finally:
        os.close(fd)
    if len(data) > MAX_FILE_BYTES:
        raise InvalidImageError(f"{path}: the file is larger than the limit of {MAX_FILE_BYTES / 1e6:.0f} MB",
                                code="payload_too_large", http_status=413)
    return data


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
