"""Decoding bombs: small files that pass the 64-megapixel limit but cost seconds or gigabytes.

Each generator builds its file in memory, cheaply (no full-size array is allocated), so that
``bench/soak.py`` and the hostile-input tests can both use them:

- :func:`png16` -- a 16-bit greyscale PNG of ``side`` x ``side`` (8000: 64 MP, 128 MB decoded,
  about 140 kB on disk);
- :func:`progressive_jpeg` -- a greyscale progressive JPEG with thousands of (empty) scans, each of
  which makes libjpeg walk the whole coefficient buffer again;
- :func:`multiframe_dicom` -- a multi-frame JPEG-LS DICOM of ``side`` x ``side`` 16-bit frames
  (pydicom decodes every frame for ``pixel_array``); needs ``pyjpegls`` to be built;
- :func:`dicom_frame_claiming` -- a 64 x 64 DICOM whose compressed frame (JPEG baseline or
  JPEG-LS) declares ``side`` x ``side`` in its own SOF: the codec allocates what the frame says;
- :func:`rle_dicom_overflowing` -- a 64 x 64 RLE DICOM whose one segment expands to ``megabytes``;
- :func:`deflated_dicom` -- a Deflated Explicit VR Little Endian DICOM of ``side`` x ``side``
  zeros, ``bits`` per sample (pydicom inflated the whole data set before any check);
- :func:`tall_png` -- a ``1`` x ``height`` greyscale PNG (Pillow keeps a pointer per row);
- :func:`palette_png` -- a ``side`` x ``side`` palette PNG with a transparent entry.

:func:`catalogue` lists them with the answer each must get: refused from a header, or (the most
expensive files that still fit the budget) decoded and predicted.
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


def _dicom_dataset(rows: int, columns: int, bits: int, syntax, extra: dict | None = None) -> "object":
    """A DX data set header (no pixel data) for the generators below; ``extra``: more attributes
    by keyword (a study and patient, say, to send it to a DICOM node)."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import DigitalXRayImageStorageForPresentation, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = DigitalXRayImageStorageForPresentation
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = syntax
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality = "DX"
    ds.Rows, ds.Columns = rows, columns
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = bits, bits, bits - 1, 0
    for keyword, value in (extra or {}).items():
        setattr(ds, keyword, value)
    return ds


def _saved(ds) -> bytes:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def dicom_frame_claiming(side: int = 30000, codec: str = "jpeg", extra: dict | None = None) -> bytes:
    """A 64 x 64 DICOM whose one compressed frame declares ``side`` x ``side`` in its own SOF
    (``codec`` "jpeg": baseline, 8 bit; "jpegls": JPEG-LS lossless, 16 bit, needs pyjpegls).

    Raises:
        RuntimeError: "jpegls" without pyjpegls.
    """
    from pydicom.encaps import encapsulate
    from pydicom.uid import JPEGBaseline8Bit, JPEGLSLossless

    ramp = (np.arange(64 * 64).reshape(64, 64) % 251).astype(np.uint8)
    if codec == "jpegls":
        try:
            import jpeg_ls
        except ImportError:
            raise RuntimeError("making a JPEG-LS DICOM needs pyjpegls: pip install pyjpegls") from None
        frame, syntax, bits = bytearray(jpeg_ls.encode_array(ramp.astype(np.uint16) * 16)), JPEGLSLossless, 16
        sof = frame.index(b"\xff\xf7")
    else:
        buffer = io.BytesIO()
        Image.fromarray(ramp).save(buffer, format="JPEG", quality=90)
        frame, syntax, bits = bytearray(buffer.getvalue()), JPEGBaseline8Bit, 8
        sof = frame.index(b"\xff\xc0")
    frame[sof + 5:sof + 9] = struct.pack(">HH", side, side)
    ds = _dicom_dataset(64, 64, bits, syntax, extra)
    ds.PixelData = encapsulate([bytes(frame)])
    ds["PixelData"].VR = "OB"
    return _saved(ds)


def rle_dicom_overflowing(megabytes: int = 256) -> bytes:
    """A 64 x 64 8-bit RLE Lossless DICOM whose one segment is replicate runs expanding to
    ``megabytes`` (2 bytes -> 128): 4 kB of pixels declared, 1/64 of the expansion on disk."""
    from pydicom.encaps import encapsulate
    from pydicom.uid import RLELossless

    runs = (megabytes * 1_000_000) // 128
    segment = b"\x81\x00" * runs  # control 0x81: the next byte 128 times
    header = struct.pack("<16I", 1, 64, *([0] * 14))
    ds = _dicom_dataset(64, 64, 8, RLELossless)
    ds.PixelData = encapsulate([header + segment])
    ds["PixelData"].VR = "OB"
    return _saved(ds)


def deflated_dicom(side: int = 10000, bits: int = 8, extra: dict | None = None) -> bytes:
    """A Deflated Explicit VR Little Endian DICOM of ``side`` x ``side`` zero samples (a faint ramp
    in the first row), built as a stream: nothing of full size is held in memory."""
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_dataset, write_file_meta_info
    from pydicom.uid import DeflatedExplicitVRLittleEndian

    ds = _dicom_dataset(side, side, bits, DeflatedExplicitVRLittleEndian, extra)
    body = DicomBytesIO()
    body.is_little_endian, body.is_implicit_VR = True, False
    write_dataset(body, ds)
    length = side * side * (bits // 8)
    dtype = np.dtype(f"<u{bits // 8}")
    first_row = (np.arange(side) % 200).astype(dtype).tobytes()
    deflater = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    parts = [deflater.compress(body.getvalue()),
             deflater.compress(b"\xe0\x7f\x10\x00OB\x00\x00" + struct.pack("<I", length + length % 2)),
             deflater.compress(first_row)]
    zeros = b"\x00" * (1 << 22)
    remaining = length + length % 2 - len(first_row)
    while remaining > 0:
        parts.append(deflater.compress(zeros[: min(len(zeros), remaining)]))
        remaining -= len(zeros)
    parts.append(deflater.flush())
    head = DicomBytesIO()
    head.is_little_endian, head.is_implicit_VR = True, False
    head.write(b"\x00" * 128 + b"DICM")
    write_file_meta_info(head, ds.file_meta, enforce_standard=True)
    return head.getvalue() + b"".join(parts)


def tall_png(height: int = 60_000_000) -> bytes:
    """A 1 x ``height`` 8-bit greyscale PNG (about 117 kB for 60,000,000 rows)."""
    compressor = zlib.compressobj(9)
    block = b"\x00\x80" * 1_000_000  # filter byte + one mid-grey sample, a million rows at a time
    parts, remaining = [], height
    while remaining > 0:
        parts.append(compressor.compress(block[: 2 * min(1_000_000, remaining)]))
        remaining -= 1_000_000
    parts.append(compressor.flush())
    ihdr = struct.pack(">IIBBBBB", 1, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", b"".join(parts)) + _chunk(b"IEND", b"")


def palette_png(side: int = 8000) -> bytes:
    """A ``side`` x ``side`` palette PNG, a grey ramp palette with entry 0 transparent (tRNS)."""
    compressor = zlib.compressobj(9)
    row = b"\x00" + (np.arange(side) % 256).astype(np.uint8).tobytes()
    parts = [compressor.compress(row * 64) for _ in range(side // 64)]
    parts += [compressor.compress(row * (side % 64)), compressor.flush()]
    ihdr = struct.pack(">IIBBBBB", side, side, 8, 3, 0, 0, 0)
    palette = bytes(np.repeat(np.arange(256, dtype=np.uint8), 3))
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"PLTE", palette) + _chunk(b"tRNS", b"\x00")
            + _chunk(b"IDAT", b"".join(parts)) + _chunk(b"IEND", b""))


def catalogue() -> list[tuple[str, str, bytes, int]]:
    """``(label, file name, file, expected HTTP status)``: the bombs refused from their headers,
    then the most expensive files that still fit the decoding budget (200)."""
    ramp = Image.linear_gradient("L")

    def png(image: Image.Image) -> bytes:
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        return buffer.getvalue()

    return [
        ("png16-8000", "bomb.png", png16(8000), 413),
        ("progressive-3000-scans", "bomb.jpg", progressive_jpeg(8000, 3000), 413),
        ("dicom-8-frames-8000", "bomb.dcm", multiframe_dicom(8000, 8), 413),
        ("jpeg-frame-claims-30000", "claims.dcm", dicom_frame_claiming(30000, "jpeg"), 422),
        ("jpegls-frame-claims-30000", "claims-ls.dcm", dicom_frame_claiming(30000, "jpegls"), 422),
        ("rle-expands-256MB", "rle.dcm", rle_dicom_overflowing(256), 422),
        ("deflate-10000", "deflated.dcm", deflated_dicom(10000, 8), 413),
        ("png-1x60M", "tall.png", tall_png(60_000_000), 413),
        ("palette-8000", "palette.png", palette_png(8000), 413),
        ("png16-5600", "big.png", png16(5600), 200),
        ("progressive-5600-100-scans", "big.jpg", progressive_jpeg(5600, 100), 200),
        ("dicom-8-frames-5600", "big.dcm", multiframe_dicom(5600, 8), 200),
        # 8000^2 8-bit and 4000^2 RGBA are just over the budget once Pillow's row tables count
        ("rgba-3950", "big-rgba.png", png(ramp.resize((3950, 3950)).convert("RGBA")), 200),
        ("grey-7950", "big-grey.png", png(ramp.resize((7950, 7950))), 200),
        ("palette-5600", "big-palette.png", palette_png(5600), 200),
        ("deflate-5600-16bit", "big-deflated.dcm", deflated_dicom(5600, 16), 200),
        ("deflate-4000-32bit", "big-deflated32.dcm", deflated_dicom(4000, 32), 200),
    ]
