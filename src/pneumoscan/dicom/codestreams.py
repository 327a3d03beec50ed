"""What a compressed DICOM frame says about its own size, read from its codestream header.

A DICOM file states Rows x Columns, but the codec that decodes an encapsulated frame allocates
what the frame's *own* header declares: a 1.3 kB JPEG-LS frame patched to 30000 x 30000 took a
worker to 5.2 GB while Rows x Columns said 512 x 512. Each function here reads one codestream's
header (JPEG SOF, JPEG-LS SOF55, JPEG 2000 SIZ, the RLE segment table) without decoding
anything, so :mod:`pneumoscan.dicom.pixels` can refuse a frame that disagrees with the data set
before any decoder runs.

Pure functions over bytes: no pydicom, no numpy.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

#: JPEG start-of-frame markers (baseline, extended, progressive, lossless; arithmetic too) and
#: JPEG-LS's SOF55: all are followed by length, precision, height, width, components.
_SOF_MARKERS = frozenset({0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF, 0xF7})
#: Markers without a length field (RSTn, SOI, EOI, TEM).
_STANDALONE = frozenset({*range(0xD0, 0xD8), 0xD8, 0xD9, 0x01})
_JP2_SIGNATURE = b"\x00\x00\x00\x0cjP  \r\n\x87\n"
#: How far into a frame its size header may sit (JPEG application segments, a JP2 wrapper).
_HEADER_SEARCH = 1 << 20


class CodestreamError(ValueError):
    """The frame's header is missing, truncated or malformed."""


@dataclass(frozen=True)
class FrameHeader:
    """What a frame's codestream declares: the decoder will allocate by these numbers."""

    columns: int
    rows: int
    components: int
    precision: int = 0  # bits per sample, where the header says (0: not stated)


def jpeg_header(frame: bytes) -> FrameHeader:
    """The SOF (or JPEG-LS SOF55) of a JPEG codestream.

    Raises:
        CodestreamError: no SOI, no SOF before the first scan, or a truncated segment.
    """
    if not frame.startswith(b"\xff\xd8"):
        raise CodestreamError("the frame does not start with a JPEG SOI marker")
    at, end = 2, min(len(frame), _HEADER_SEARCH)
    while at + 4 <= end:
        if frame[at] != 0xFF:
            raise CodestreamError(f"expected a JPEG marker at byte {at}")
        marker = frame[at + 1]
        if marker == 0xFF:  # fill byte
            at += 1
            continue
        if marker in _STANDALONE:
            at += 2
            continue
        (length,) = struct.unpack(">H", frame[at + 2:at + 4])
        if marker in _SOF_MARKERS:
            if at + 10 > len(frame) or length < 8:
                raise CodestreamError("the JPEG frame header (SOF) is truncated")
            precision, rows, columns, components = struct.unpack(">BHHB", frame[at + 4:at + 10])
            return FrameHeader(columns, rows, components, precision)
        if marker == 0xDA:  # a scan before any frame header
            break
        if length < 2:
            raise CodestreamError(f"a JPEG segment at byte {at} has length {length}")
        at += 2 + length
    raise CodestreamError("no JPEG frame header (SOF) before the image data")


def j2k_header(frame: bytes) -> FrameHeader:
    """The SIZ segment of a JPEG 2000 codestream (raw, or inside a JP2 wrapper).

    Raises:
        CodestreamError: no SOC + SIZ, or a truncated SIZ.
    """
    start = 0
    if frame.startswith(_JP2_SIGNATURE):  # not allowed by DICOM, written by some encoders anyway
        start = frame.find(b"\xff\x4f\xff\x51", 0, _HEADER_SEARCH)
        if start < 0:
            raise CodestreamError("the JP2 frame holds no JPEG 2000 codestream")
    if frame[start:start + 4] != b"\xff\x4f\xff\x51":
        raise CodestreamError("the frame does not start with a JPEG 2000 SOC and SIZ marker")
    siz = frame[start + 4:start + 4 + 40]
    if len(siz) < 40:
        raise CodestreamError("the JPEG 2000 size header (SIZ) is truncated")
    _, _, x_size, y_size, x_offset, y_offset = struct.unpack(">HHIIII", siz[:20])
    (components,) = struct.unpack(">H", siz[36:38])
    if x_offset > x_size or y_offset > y_size:
        raise CodestreamError("the JPEG 2000 image offset lies outside the image")
    precision = (siz[38] & 0x7F) + 1  # Ssiz of the first component
    return FrameHeader(x_size - x_offset, y_size - y_offset, components, precision)


def rle_segments(frame: bytes) -> list[bytes]:
    """The segments of a DICOM RLE Lossless frame (PS3.5 annex G), from its 64-byte header.

    Raises:
        CodestreamError: a truncated header, more than 15 segments, or offsets out of order.
    """
    if len(frame) < 64:
        raise CodestreamError("the RLE frame header is truncated")
    count, *offsets = struct.unpack("<16I", frame[:64])
    if not 1 <= count <= 15:
        raise CodestreamError(f"the RLE frame declares {count} segments (1 to 15 are possible)")
    starts = offsets[:count]
    if starts[0] != 64 or any(b < a for a, b in zip(starts, starts[1:])) or starts[-1] > len(frame):
        raise CodestreamError("the RLE segment offsets are out of order or past the end of the frame")
    ends = [*starts[1:], len(frame)]
    return [frame[a:b] for a, b in zip(starts, ends)]


def rle_decoded_length(segment: bytes, limit: int) -> int:
    """How many bytes a PackBits segment decodes to, counting no further than just past ``limit``.

    A replicate run turns 2 bytes into 128, so a segment can declare 64 times its own size; the
    runs are walked (nothing is written) and the walk stops as soon as ``limit`` is passed.
    """
    at, produced, end = 0, 0, len(segment)
    while at < end and produced <= limit:
        control = segment[at]
        if control < 128:  # a literal run of control + 1 bytes
            produced += control + 1
            at += control + 2
        elif control > 128:  # one byte repeated 257 - control times
            produced += 257 - control
            at += 2
        else:  # 128: no operation
            at += 1
    return produced
