"""DICOM (Part 10) bytes -> 8-bit grey, within the decoding budget of every header involved.

The data set's Rows x Columns x BitsAllocated is checked against
:data:`pneumoscan.imaging.MAX_DECODE_BYTES`, and so is what the pixel data itself declares: a
compressed frame's own codestream header (:mod:`pneumoscan.dicom.codestreams`) must agree with
Rows x Columns, and a Deflated data set is inflated in a bounded stream. Error messages never quote
the data set, so patient identifiers cannot leak through them.
"""

from __future__ import annotations

import io
import logging
import warnings
import zlib
from typing import Any

import numpy as np
from PIL import Image

from pneumoscan.dicom import codestreams
from pneumoscan.errors import InvalidImageError
from pneumoscan.gate import DICOM_MODALITY_KEY, DICOM_VIEW_KEY
from pneumoscan.imaging import MAX_DECODE_BYTES, MAX_PIXELS, refuse_over_budget, stretch_to_uint8

#: A Deflated Explicit VR Little Endian data set is inflated in a bounded stream: beyond this it is
#: refused. The largest data set the decoding budget can use, plus room for its other elements
#: (a 20 MB upload could otherwise inflate to ~20 GB: zlib reaches 1032:1).
MAX_INFLATED_BYTES: int = MAX_DECODE_BYTES + 16_000_000
#: What :func:`read_header` inflates of a Deflated data set to find the elements before its pixels.
MAX_HEADER_BYTES: int = 8_000_000


def decode_dicom(data: bytes, *, name: str = "image", max_pixels: int = MAX_PIXELS) -> Image.Image:
    """DICOM (Part 10) bytes -> 8-bit grey: Rescale (modality LUT), then VOI LUT / windowing,
    then MONOCHROME1 inverted, then stretched to 0..255. All in memory.

    Error messages never quote the data set, so patient identifiers cannot leak through them.

    Raises:
        InvalidImageError: unreadable DICOM, no pixel data, too many pixels, or a compressed
            transfer syntax no installed decoder handles.
    """
    from pydicom.pixels import apply_modality_lut, apply_voi_lut, pixel_array

    _quiet_pydicom()
    dataset = _read_dicom(data, name)
    if "PixelData" not in dataset:
        raise InvalidImageError(f"{name}: the DICOM file has no pixel data", code="dicom_no_pixels")
    try:
        rows, columns = int(dataset.get("Rows", 0) or 0), int(dataset.get("Columns", 0) or 0)
        bytes_per_sample = -(-int(dataset.get("BitsAllocated", 16) or 16) // 8)
        samples = int(dataset.get("SamplesPerPixel", 1) or 1)
    except Exception:  # pydicom raises many types on a malformed element (NotImplementedError for a bad VR)
        raise InvalidImageError(f"{name}: the DICOM image attributes (Rows, Columns, BitsAllocated) are invalid") from None
    if rows * columns > max_pixels:
        raise InvalidImageError(f"{name}: {columns}x{rows} pixels is more than the limit of {max_pixels}",
                                code="too_many_pixels", http_status=413)
    if samples != 1:
        raise InvalidImageError(f"{name}: only single-channel (greyscale) DICOM images are supported",
                                code="unsupported_media_type", http_status=415)
    # One frame is decoded, whatever NumberOfFrames says (a multi-frame file cost every frame before).
    refuse_over_budget(rows * columns * bytes_per_sample, f"{columns}x{rows} {8 * bytes_per_sample}-bit DICOM", name)
    _check_compressed_frame(dataset, rows, columns, bytes_per_sample, name)
    try:
        pixels = pixel_array(dataset, index=0)
    except Exception as exc:  # pydicom and its decoders raise many types on broken pixel data
        raise InvalidImageError(f"{name}: cannot decode the DICOM pixel data{_transfer_syntax(dataset)}: "
                                f"{type(exc).__name__}", code="dicom_undecodable") from None
    if pixels.ndim != 2:
        raise InvalidImageError(f"{name}: only single-channel (greyscale) DICOM images are supported",
                                code="unsupported_media_type", http_status=415)

    def rescale_and_window(stored: np.ndarray) -> np.ndarray:
        return apply_voi_lut(apply_modality_lut(stored, dataset), dataset)

    invert = str(dataset.get("PhotometricInterpretation", "")).upper() == "MONOCHROME1"
    try:
        grey = stretch_to_uint8(pixels, rescale_and_window, invert=invert)
    except FloatingPointError:
        raise InvalidImageError(f"{name}: the DICOM rescale or window gives non-finite pixel values") from None
    except Exception:  # a malformed Rescale or VOI LUT / window attribute
        raise InvalidImageError(f"{name}: the DICOM rescale or window (VOI LUT) attributes are invalid") from None
    image = Image.fromarray(grey)
    # Only these two acquisition tags travel on, for the input gate; no other tag leaves here.
    image.info[DICOM_MODALITY_KEY] = str(dataset.get("Modality", "") or "").strip().upper()
    image.info[DICOM_VIEW_KEY] = str(dataset.get("ViewPosition", "") or "").strip().upper()
    return image


def read_header(data: bytes, *, name: str = "image") -> Any:
    """The data set up to its pixel data (the pixels are not read or decoded), within budget:
    a Deflated data set is inflated only as far as :data:`MAX_HEADER_BYTES` (pydicom's own
    ``stop_before_pixels`` inflates the whole data set first: a 2 KB file could cost gigabytes).

    Raises:
        InvalidImageError: not a readable DICOM data set (the message never quotes it).
    """
    import pydicom
    from pydicom.filebase import DicomBytesIO
    from pydicom.filereader import _at_pixel_data, _read_file_meta_info, read_dataset, read_preamble
    from pydicom.uid import DeflatedExplicitVRLittleEndian

    _quiet_pydicom()
    unreadable = InvalidImageError(f"{name}: the file is not a readable DICOM data set", code="dicom_undecodable")
    try:
        stream = io.BytesIO(data)
        read_preamble(stream, False)
        meta = _read_file_meta_info(stream)
        if meta.get("TransferSyntaxUID") != DeflatedExplicitVRLittleEndian:
            return pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)
        inflater = zlib.decompressobj(-zlib.MAX_WBITS)
        prefix = inflater.decompress(memoryview(data)[stream.tell():], MAX_HEADER_BYTES)
        dataset = read_dataset(DicomBytesIO(prefix), is_implicit_VR=False, is_little_endian=True,
                               stop_when=_at_pixel_data)
    except Exception:  # pydicom and zlib raise many types; the message could quote the data set
        raise unreadable from None
    dataset.file_meta = meta
    return dataset


def _read_dicom(data: bytes, name: str) -> Any:
    """Parse a Part 10 file. A Deflated data set is inflated here, in a bounded stream, before
    pydicom sees it: pydicom inflates it whole (a 1 MB upload cost 2 GB).

    Raises:
        InvalidImageError: unreadable, or a Deflated data set larger than MAX_INFLATED_BYTES.
    """
    import pydicom
    from pydicom.filebase import DicomBytesIO
    from pydicom.filereader import _read_file_meta_info, read_dataset, read_preamble
    from pydicom.uid import DeflatedExplicitVRLittleEndian

    try:
        stream = io.BytesIO(data)
        read_preamble(stream, False)
        meta = _read_file_meta_info(stream)
        if meta.get("TransferSyntaxUID") != DeflatedExplicitVRLittleEndian:
            return pydicom.dcmread(io.BytesIO(data))
    except Exception:
        raise InvalidImageError(f"{name}: the DICOM file is corrupt or truncated") from None
    inflated = _inflate(memoryview(data)[stream.tell():], name)
    try:
        dataset = read_dataset(DicomBytesIO(inflated), is_implicit_VR=False, is_little_endian=True)
    except Exception:
        raise InvalidImageError(f"{name}: the DICOM file is corrupt or truncated") from None
    dataset.file_meta = meta
    return dataset


def _inflate(deflated: memoryview, name: str) -> bytearray:
    """Raw Deflate -> bytes, a megabyte of output at a time, refused once past MAX_INFLATED_BYTES
    (so a bomb costs the limit, not what it inflates to).

    Raises:
        InvalidImageError: corrupt, or larger than the limit.
    """
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    inflated = bytearray()
    pending: bytes | memoryview = deflated
    try:
        while pending and not inflater.eof:
            inflated += inflater.decompress(pending, 1 << 20)
            pending = inflater.unconsumed_tail
            if len(inflated) > MAX_INFLATED_BYTES:
                raise InvalidImageError(
                    f"{name}: the Deflated DICOM data set inflates to more than {MAX_INFLATED_BYTES / 1e6:.0f} MB, "
                    "the limit", code="decode_budget_exceeded", http_status=413)
        inflated += inflater.flush()
    except zlib.error:
        raise InvalidImageError(f"{name}: the Deflated DICOM data set is corrupt") from None
    return inflated


def _check_compressed_frame(dataset: Any, rows: int, columns: int, bytes_per_sample: int, name: str) -> None:
    """The first frame's own codestream header must agree with Rows x Columns: its codec allocates
    what the frame declares, whatever the data set says (:mod:`pneumoscan.codestreams`).

    Raises:
        InvalidImageError: ``dicom_frame_mismatch`` (naming both sizes), or an unreadable frame.
    """
    from pydicom import uid
    from pydicom.encaps import get_frame

    syntax = getattr(getattr(dataset, "file_meta", None), "TransferSyntaxUID", None)
    try:
        if syntax is None or not syntax.is_compressed:
            return
    except ValueError:  # not a transfer syntax at all: pixel_array refuses it
        return
    try:
        frames = int(dataset.get("NumberOfFrames", 1) or 1)
        frame = get_frame(dataset.PixelData, 0, number_of_frames=max(frames, 1))
        if syntax in uid.JPEGTransferSyntaxes or syntax in uid.JPEGLSTransferSyntaxes:
            header = codestreams.jpeg_header(frame)
        elif syntax in uid.JPEG2000TransferSyntaxes or syntax in (uid.HTJ2K, uid.HTJ2KLossless, uid.HTJ2KLosslessRPCL):
            header = codestreams.j2k_header(frame)
        elif syntax == uid.RLELossless:
            _check_rle_frame(frame, rows, columns, bytes_per_sample, name)
            return
        else:
            return  # no decoder for it is installed: pixel_array refuses it
    except codestreams.CodestreamError as exc:
        raise InvalidImageError(f"{name}: the compressed DICOM frame is malformed ({exc})",
                                code="dicom_undecodable") from None
    except InvalidImageError:
        raise
    except Exception:
        raise InvalidImageError(f"{name}: the encapsulated DICOM pixel data is malformed",
                                code="dicom_undecodable") from None
    if (header.columns, header.rows, header.components) != (columns, rows, 1):
        raise InvalidImageError(
            f"{name}: the compressed frame declares {header.columns}x{header.rows} pixels with "
            f"{header.components} component(s), but the DICOM header says {columns}x{rows} with 1; "
            "refusing to decode it", code="dicom_frame_mismatch")


def _check_rle_frame(frame: bytes, rows: int, columns: int, bytes_per_sample: int, name: str) -> None:
    """One segment per byte of a sample, none decoding to more than Rows x Columns bytes (pydicom's
    RLE decoder expands a segment whole before checking its length: 64 x its size)."""
    segments = codestreams.rle_segments(frame)
    if len(segments) != bytes_per_sample:
        raise InvalidImageError(f"{name}: the RLE frame has {len(segments)} segment(s); the DICOM header "
                                f"(BitsAllocated {8 * bytes_per_sample}, 1 sample) needs {bytes_per_sample}",
                                code="dicom_frame_mismatch")
    pixels = rows * columns
    for index, segment in enumerate(segments):
        length = codestreams.rle_decoded_length(segment, pixels + 1)
        if length > pixels + 1:  # + the pad byte an encoder may add to an odd length
            raise InvalidImageError(
                f"{name}: RLE segment {index + 1} decodes to more than the {columns}x{rows} pixels the DICOM "
                "header declares; refusing to decode it", code="dicom_frame_mismatch")


def _withhold_values(record: logging.LogRecord) -> bool:
    record.msg, record.args = "pydicom: a DICOM attribute could not be read as written (value withheld)", ()
    return True


def _quiet_pydicom() -> None:
    """pydicom's warnings quote attribute values ("Unknown encoding 'Doe^Jane'"): tag values must
    never reach a log, so its warnings are dropped and its log records lose their arguments.
    Installed on every call (both are idempotent): code that resets the warning filters (pytest,
    ``warnings.catch_warnings``) must not let them through again."""
    warnings.filterwarnings("ignore", module=r"pydicom(\.|$)")
    logging.getLogger("pydicom").addFilter(_withhold_values)


def _transfer_syntax(dataset: Any) -> str:
    """`` (transfer syntax NAME)`` for error messages, or "" when the file's own value is unusable."""
    try:
        return f" (transfer syntax {dataset.file_meta.TransferSyntaxUID.name})"
    except Exception:
        return ""
