"""Fuzzing the decode -> gate -> preprocess path with hypothesis: random bytes and mutated JPEG,
PNG and DICOM files may only ever raise InvalidImageError, and memory stays bounded.

CI runs a bounded number of cases; a longer run:

    PNEUMOSCAN_FUZZ_EXAMPLES=100000 .venv/bin/python -m pytest tests/test_fuzz.py
"""

from __future__ import annotations

import os
import resource

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from conftest import image_bytes, make_xray
from pneumoscan.imaging import decode_image, square_resize
from pneumoscan.errors import InvalidImageError
from pneumoscan.gate import image_reasons

EXAMPLES = int(os.environ.get("PNEUMOSCAN_FUZZ_EXAMPLES", "1500"))
MEMORY_GROWTH_LIMIT_MB = 1024


def _seeds() -> list[bytes]:
    from test_dicom import _gradient, make_dicom

    xray = make_xray(3, size=(96, 80))
    wide = Image.fromarray((np.asarray(xray, np.uint16) * 257))
    return [image_bytes(xray, "JPEG"), image_bytes(xray), image_bytes(wide), image_bytes(xray.convert("RGBA")),
            make_dicom(_gradient()), make_dicom(_gradient(), photometric="MONOCHROME1",
                                                extra={"WindowCenter": 2000, "WindowWidth": 1500})]


SEEDS = _seeds()


@st.composite
def mutated_files(draw) -> bytes:
    data = bytearray(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(1, 6))):
        kind = draw(st.sampled_from(["flip", "overwrite", "insert", "delete", "truncate"]))
        at = draw(st.integers(0, max(len(data) - 1, 0)))
        if kind == "flip" and data:
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif kind == "overwrite":
            chunk = draw(st.binary(min_size=1, max_size=8))
            data[at:at + len(chunk)] = chunk
        elif kind == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=32))
        elif kind == "delete":
            del data[at:at + draw(st.integers(1, 64))]
        else:
            del data[at:]
    return bytes(data)


@pytest.mark.slow
def test_decode_gate_and_preprocess_raise_nothing_but_invalid_image() -> None:
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    outcomes = {"decoded": 0, "refused": 0}

    @settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(st.one_of(st.binary(max_size=2048), mutated_files()))
    def check(data: bytes) -> None:
        try:
            image = decode_image(data, name="fuzz", draft_size=224)
        except InvalidImageError as exc:
            assert str(exc).startswith("fuzz:")
            outcomes["refused"] += 1
            return
        outcomes["decoded"] += 1
        assert image.mode == "L"
        assert isinstance(image_reasons(image), list)
        pixels = square_resize(image, 64)
        assert pixels.dtype == np.uint8 and tuple(pixels.shape) == (1, 64, 64)

    check()
    growth_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert growth_mb < MEMORY_GROWTH_LIMIT_MB, f"peak memory grew by {growth_mb:.0f} MB"
    assert outcomes["decoded"] > 0 and outcomes["refused"] > 0  # both paths were exercised
