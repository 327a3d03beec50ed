"""Decoding bombs: small files that pass the 64-megapixel limit but cost seconds or gigabytes.

Each generator builds its file in memory, cheaply (no full-size array is allocated), so that
``bench/soak.py`` and the hostile-input tests can both use them:

- :func:`png16` -- a 16-bit greyscale PNG of ``side`` x ``side`` (8000: 64 MP, 128 MB decoded,
  about 140 kB on disk);
- :func:`progressive_jpeg` -- a greyscale progressive JPEG with thousands of (empty) scans, each of
  which makes libjpeg walk the whole coefficient buffer again;
- :func:`multiframe_dicom` -- a multi-frame JPEG-LS DICOM of ``side`` x ``side`` 16-bit frames
  (pydicom decodes every frame for ``pixel_array``); needs ``pyjpegls`` to be built.
"""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
from PIL import Image


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png16(side: int = 8000) -> bytes:
    """A 16-bit greyscale PNG, ``side`` x ``side``: a faint ramp in the first row, zeros after."""
    compressor = zlib.compressobj(9)
    row_bytes = 1 + 2 * side  # filter byte + big-endian samples
    first = b"\x00" + (np.arange(side, dtype=">u2") * 7).tobytes()
    parts = [compressor.compress(first)]
    zero_rows = b"\x00" * (row_bytes * 256)
    remaining = side - 1
    while remaining > 0:
        count = min(256, remaining)
        parts.append(compressor.compress(zero_rows[: row_bytes * count]))
        remaining -= count
    parts.append(compressor.flush())
    ihdr = struct.pack(">IIBBBBB", side, side, 16, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", b"".join(parts)) + _chunk(b"IEND", b"")


def progressive_jpeg(side: int = 8000, scans: int = 3000) -> bytes:
    """A greyscale progressive JPEG padded with empty copies of its last scan up to ``scans`` scans.

    libjpeg warns about the bogus progression and goes on decoding: every repeated scan is another
    pass over all ``(side / 8)^2`` coefficient blocks.
    """
    buffer = io.BytesIO()
    Image.linear_gradient("L").resize((side, side)).save(buffer, format="JPEG", progressive=True, quality=50)
    data = buffer.getvalue()
    last_scan = data.rindex(b"\xff\xda")
    (length,) = struct.unpack(">H", data[last_scan + 2:last_scan + 4])
    empty_scan = data[last_scan:last_scan + 2 + length]  # the SOS header alone: a scan with no data
    return data[:-2] + empty_scan * max(0, scans - data.count(b"\xff\xda")) + b"\xff\xd9"


def multiframe_dicom(side: int = 8000, frames: int = 8) -> bytes:
    """A JPEG-LS lossless DICOM with ``frames`` 16-bit frames of ``side`` x ``side`` (mostly zeros).

    Raises:
        RuntimeError: pyjpegls (the JPEG-LS encoder) is not installed.
    """
    try:
        import jpeg_ls
    except ImportError:
        raise RuntimeError("making a JPEG-LS DICOM needs pyjpegls: pip install pyjpegls") from None
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.encaps import encapsulate
    from pydicom.uid import JPEGLSLossless, SecondaryCaptureImageStorage, generate_uid

    frame = np.zeros((side, side), np.uint16)
    frame[0, : min(side, 4096)] = np.arange(min(side, 4096))
    encoded = bytes(jpeg_ls.encode_array(frame))
    del frame
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = JPEGLSLossless
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality = "DX"
    ds.Rows = ds.Columns = side
    ds.NumberOfFrames = frames
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.PixelData = encapsulate([encoded] * frames)
    ds["PixelData"].VR = "OB"
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()
