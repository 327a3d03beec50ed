"""Hostile uploads, made in memory: each is ``(name, bytes, expected)``.

``expected`` is the set of per-file outcomes that are acceptable: an error code (the file is
refused with that code), ``"rejected"`` (the input gate refuses it) or ``"ok"`` (a strange but
valid image that may be predicted).
"""

from __future__ import annotations

import importlib.util
import io
import struct
import zipfile
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

from conftest import image_bytes, make_xray


def _png_with_header(width: int, height: int) -> bytes:
    """A PNG whose IHDR declares ``width x height`` followed by a tiny IDAT: a decompression bomb's header."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b"")


def _jpeg_claiming(width: int, height: int) -> bytes:
    """A real JPEG whose SOF0 marker is patched to declare ``width x height``."""
    data = bytearray(image_bytes(make_xray(1), "JPEG"))
    at = data.index(b"\xff\xc0")
    data[at + 5:at + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def _bench_module(name: str):
    """bench/NAME.py, imported by path (bench/ is scripts, not a package)."""
    spec = importlib.util.spec_from_file_location(f"bench_{name}", Path(__file__).parents[1] / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _bench_bombs():
    """bench/bombs.py, the decoding bombs bench/soak.py sends too."""
    return _bench_module("bombs")


def _progressive_claiming(width: int, height: int) -> bytes:
    """A real progressive JPEG whose SOF2 marker is patched to declare ``width x height``."""
    data = bytearray(_encoded(make_xray(6), "JPEG", progressive=True))
    at = data.index(b"\xff\xc2")
    data[at + 5:at + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def _decoding_bombs() -> list[tuple[str, bytes, set[str]]]:
    """Files under the 64-megapixel limit that cost seconds or gigabytes to decode before."""
    bombs = _bench_bombs()
    budget = {"decode_budget_exceeded"}
    cases = [
        ("png16-8000.png", bombs.png16(8000), budget),  # 140 kB -> 128 MB of 16-bit samples
        ("progressive-3000-scans.jpg", bombs.progressive_jpeg(256, 3000), budget),
        ("progressive-6000.jpg", _progressive_claiming(6000, 6000), budget),  # full-size coefficients
    ]
    mismatch = {"dicom_frame_mismatch"}
    cases += [
        # a frame's own header decides what its codec allocates (a 2 kB file took 4.5 GB before)
        ("dicom-jpeg-frame-claims-30000.dcm", bombs.dicom_frame_claiming(30000, "jpeg"), mismatch),
        ("dicom-j2k-frame-claims-40000.dcm", _j2k_dicom_claiming(40000), mismatch),
        ("dicom-rle-segment-64mb.dcm", bombs.rle_dicom_overflowing(64), mismatch),
        ("dicom-deflate-10000.dcm", bombs.deflated_dicom(10000), budget),  # 98 kB -> 100 MB inflated
        ("tall-1x60000000.png", bombs.tall_png(60_000_000), budget),  # 117 kB, a pointer per row
        ("palette-8000.png", bombs.palette_png(8000), budget),
    ]
    try:
        cases.append(("multiframe-jpegls-8000.dcm", bombs.multiframe_dicom(8000, 8), budget))
        cases.append(("dicom-jpegls-frame-claims-30000.dcm", bombs.dicom_frame_claiming(30000, "jpegls"), mismatch))
    except RuntimeError:  # pyjpegls (the encoder, a test extra) is not installed
        pass
    return cases


def _j2k_dicom_claiming(side: int) -> bytes:
    """A 64 x 64 JPEG 2000 DICOM whose frame is a bare SIZ header declaring ``side`` x ``side``."""
    from pydicom.encaps import encapsulate
    from pydicom.uid import JPEG2000Lossless

    bombs = _bench_bombs()
    siz = struct.pack(">HHIIIIIIIIH", 41, 0, side, side, 0, 0, side, side, 0, 0, 1) + bytes([15, 1, 1])
    ds = bombs._dicom_dataset(64, 64, 16, JPEG2000Lossless)
    ds.PixelData = encapsulate([b"\xff\x4f\xff\x51" + siz + b"\xff\xd9"])
    ds["PixelData"].VR = "OB"
    return bombs._saved(ds)


def _mpo() -> bytes:
    """A two-frame MPO (what phone cameras and Ultra HDR write): a JPEG with a second image after it."""
    xray = make_xray(11, size=(160, 144))
    buffer = io.BytesIO()
    xray.save(buffer, format="MPO", save_all=True, append_images=[xray.resize((80, 72))])
    return buffer.getvalue()


def _png_text_bomb() -> bytes:
    """A valid small PNG with a 20 MB-when-inflated zTXt chunk (Pillow refuses huge text chunks)."""
    png = image_bytes(make_xray(2))
    payload = b"Comment\x00\x00" + zlib.compress(b"A" * 20_000_000, 9)
    chunk = struct.pack(">I", len(payload)) + b"zTXt" + payload + struct.pack(">I", zlib.crc32(b"zTXt" + payload) & 0xFFFFFFFF)
    return png[:33] + chunk + png[33:]


def _bad_crc_png() -> bytes:
    data = bytearray(image_bytes(make_xray(3)))
    data[29] ^= 0xFF  # inside IHDR's CRC
    return bytes(data)


def _animated_gif() -> bytes:
    frames = [Image.fromarray(np.full((64, 64), v, np.uint8)) for v in (0, 128, 255)]
    buffer = io.BytesIO()
    frames[0].save(buffer, format="GIF", save_all=True, append_images=frames[1:], loop=0)
    return buffer.getvalue()


def _zip() -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("xray.jpg", image_bytes(make_xray(4), "JPEG"))
    return buffer.getvalue()


def _encoded(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def _dicoms() -> list[tuple[str, bytes, set[str]]]:
    from pydicom.uid import UID

    from test_dicom import _gradient, make_dicom

    good = make_dicom(_gradient())
    huge = make_dicom(_gradient(), extra={"Rows": 65535, "Columns": 65535})
    bad_syntax = bytearray(make_dicom(_gradient()))
    marker = bytes(str(UID("1.2.840.10008.1.2.1")), "ascii")
    at = bad_syntax.index(marker)
    bad_syntax[at:at + len(marker)] = b"1.2.840.99999.9.9.9"[:len(marker)].ljust(len(marker), b"9")
    return [
        ("no-pixels.dcm", make_dicom(None), {"dicom_no_pixels"}),
        ("huge-declared.dcm", huge, {"too_many_pixels"}),
        ("bad-transfer-syntax.dcm", bytes(bad_syntax), {"dicom_undecodable", "invalid_image"}),
        ("truncated.dcm", good[: len(good) // 2], {"invalid_image", "dicom_undecodable"}),
        ("preamble-only.dcm", b"\x00" * 128 + b"DICM", {"invalid_image", "dicom_no_pixels"}),
        ("ct.dcm", make_dicom(_gradient(), extra={"Modality": "CT"}), {"rejected"}),
        ("lateral.dcm", make_dicom(_gradient(), extra={"ViewPosition": "RL"}), {"rejected"}),
    ]


def hostile_files() -> list[tuple[str, bytes, set[str]]]:
    xray = make_xray(9, size=(160, 144))
    jpeg, png = image_bytes(xray, "JPEG"), image_bytes(xray)
    rng = np.random.default_rng(0)
    not_image = {"unsupported_media_type"}
    corrupt = {"invalid_image"}
    strange_but_valid = {"ok", "rejected"}
    cases = [
        ("empty.jpg", b"", {"empty_file"}),
        ("one-byte.jpg", b"\xff", not_image),
        ("one-byte.png", b"\x89", not_image),
        ("truncated.jpg", jpeg[: len(jpeg) // 2], corrupt),
        ("truncated.png", png[: len(png) // 2], corrupt),
        ("header-only.jpg", jpeg[:20], corrupt),
        ("png-bomb.png", _png_with_header(50_000, 50_000), {"too_many_pixels"}),
        ("png-over-limit.png", _png_with_header(9_000, 9_000), {"too_many_pixels"}),
        ("jpeg-65535.jpg", _jpeg_claiming(65_535, 65_535), {"too_many_pixels"}),
        ("png-text-bomb.png", _png_text_bomb(), corrupt),
        ("bad-crc.png", _bad_crc_png(), corrupt),
        ("cmyk.jpg", _encoded(xray.convert("CMYK"), "JPEG"), strange_but_valid),
        ("16-bit.png", _encoded(Image.fromarray(np.asarray(xray, np.uint16) * 257), "PNG"), strange_but_valid),
        ("palette.png", _encoded(xray.convert("P"), "PNG"), strange_but_valid),
        ("alpha.png", _encoded(xray.convert("RGBA"), "PNG"), strange_but_valid),
        ("grey-alpha.png", _encoded(xray.convert("LA"), "PNG"), strange_but_valid),
        ("progressive.jpg", _encoded(xray, "JPEG", progressive=True), strange_but_valid),
        ("trailing-garbage.jpg", jpeg + b"<script>alert(1)</script>" * 10, strange_but_valid),
        ("animated.gif", _animated_gif(), not_image),
        ("script.svg", b'<svg xmlns="http://www.w3.org/2000/svg"><script>alert(1)</script></svg>', not_image),
        ("page.jpg", b"<!doctype html><html><body><script>alert(1)</script></body></html>", not_image),
        ("data.jpg", b'{"image": "not really", "pixels": [1, 2, 3]}', not_image),
        ("archive.jpg", _zip(), not_image),
        ("document.jpg", b"%PDF-1.7\n1 0 obj << /Type /Catalog >> endobj\ntrailer << /Root 1 0 R >>\n%%EOF", not_image),
        ("bitmap.jpg", _encoded(xray, "BMP"), not_image),
        ("tiff.png", _encoded(xray, "TIFF"), not_image),
        ("webp.jpg", _encoded(xray, "WEBP"), not_image),
        ("random.jpg", rng.integers(0, 256, 200_000, dtype=np.uint8).tobytes(), not_image),
        ("jpeg-magic-then-html.jpg", b"\xff\xd8\xff\xe0" + b"<html>" * 100, corrupt),
        ("png-magic-only.png", b"\x89PNG\r\n\x1a\n", corrupt),
        ("fake-dicm.dcm", b"\x00" * 128 + b"DICM" + b"\xde\xad\xbe\xef" * 50, {"invalid_image", "dicom_no_pixels"}),
        ("tiny.png", image_bytes(Image.new("L", (1, 1), 100)), {"rejected"}),
        ("sliver.png", image_bytes(make_xray(5, size=(2000, 40))), {"rejected"}),
        ("blank.png", image_bytes(Image.new("L", (256, 256), 0)), {"rejected"}),
        ("photo.jpg", _encoded(Image.fromarray(rng.integers(0, 255, (128, 128, 3), dtype=np.uint8)), "JPEG"), {"rejected"}),
        ("camera.mpo.jpg", _mpo(), strange_but_valid),
        ("deflated.dcm", _bench_bombs().deflated_dicom(96, 16), strange_but_valid),
    ]
    return cases + _dicoms() + _decoding_bombs()
