"""DICOM input: Rescale -> VOI LUT -> MONOCHROME1 inversion, compressed syntaxes, and privacy."""

from __future__ import annotations

import io
import logging

import numpy as np
import pytest
from PIL import Image

from pneumoscan.imaging import decode_image
from pneumoscan.errors import InvalidImageError

pydicom = pytest.importorskip("pydicom")
from pydicom.dataset import Dataset, FileMetaDataset  # noqa: E402
from pydicom.uid import (  # noqa: E402
    ExplicitVRLittleEndian,
    JPEGBaseline8Bit,
    RLELossless,
    SecondaryCaptureImageStorage,
    generate_uid,
)

PATIENT = "Doe^Jane"
PATIENT_ID = "PID-99871"


def _gradient(bits: int = 16) -> np.ndarray:
    top = 4095 if bits == 16 else 255
    ramp = np.linspace(0, top, 96 * 80).reshape(96, 80)
    return ramp.astype(np.uint16 if bits == 16 else np.uint8)


def make_dicom(pixels: np.ndarray | None, *, photometric: str = "MONOCHROME2", syntax=ExplicitVRLittleEndian,
               extra: dict | None = None) -> bytes:
    """A DICOM Part 10 file built in memory, with a patient name that must never leak."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.PatientName = PATIENT
    ds.PatientID = PATIENT_ID
    ds.Modality = "CR"
    if pixels is not None:
        bits = pixels.dtype.itemsize * 8
        ds.Rows, ds.Columns = pixels.shape
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = photometric
        ds.BitsAllocated = bits
        ds.BitsStored = 12 if bits == 16 else 8
        ds.HighBit = ds.BitsStored - 1
        ds.PixelRepresentation = 0
        ds.PixelData = pixels.tobytes()
    for key, value in (extra or {}).items():
        setattr(ds, key, value)
    if pixels is not None and syntax == RLELossless:
        ds.compress(RLELossless, pixels)
    elif pixels is not None and syntax == JPEGBaseline8Bit:
        from pydicom.encaps import encapsulate

        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="JPEG", quality=95)
        ds.PixelData = encapsulate([buffer.getvalue()])
        ds["PixelData"].VR = "OB"
        ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


def _stretch(values: np.ndarray) -> np.ndarray:
    values = values.astype(np.float64)
    return (values - values.min()) * 255.0 / (values.max() - values.min())


def test_monochrome2_16bit_is_stretched_to_8bit() -> None:
    pixels = _gradient()
    image = decode_image(make_dicom(pixels))
    assert image.mode == "L" and image.size == (80, 96)
    assert np.abs(np.asarray(image, float) - _stretch(pixels)).max() <= 1


def test_monochrome1_is_inverted() -> None:
    pixels = _gradient()
    normal = np.asarray(decode_image(make_dicom(pixels)), float)
    inverted = np.asarray(decode_image(make_dicom(pixels, photometric="MONOCHROME1")), float)
    assert np.abs(inverted - (255 - normal)).max() <= 1


def test_rescale_then_window_in_that_order() -> None:
    pixels = _gradient()
    # Rescale maps 0..4095 to -1000..7190; the window (in rescaled units) keeps 0..2000.
    extra = {"RescaleSlope": 2, "RescaleIntercept": -1000, "WindowCenter": 1000, "WindowWidth": 2000}
    image = np.asarray(decode_image(make_dicom(pixels, extra=extra)), float)
    rescaled = pixels.astype(float) * 2 - 1000
    assert image[rescaled <= 0].max() <= 1  # below the window: black
    assert image[rescaled >= 2000].min() >= 254  # above the window: white
    inside = (rescaled > 100) & (rescaled < 1900)
    expected = (rescaled[inside] - 0) / 2000 * 255
    assert np.abs(image[inside] - expected).max() <= 3


def test_rle_compressed_matches_uncompressed() -> None:
    pixels = _gradient()
    plain = np.asarray(decode_image(make_dicom(pixels)))
    rle = np.asarray(decode_image(make_dicom(pixels, syntax=RLELossless)))
    assert np.array_equal(plain, rle)


def test_jpeg_compressed_decodes() -> None:
    pixels = _gradient(8)
    image = np.asarray(decode_image(make_dicom(pixels, syntax=JPEGBaseline8Bit)), float)
    assert np.abs(image - _stretch(pixels)).mean() < 4


def test_dicom_without_pixels_and_truncated() -> None:
    with pytest.raises(InvalidImageError) as no_pixels:
        decode_image(make_dicom(None), name="scan.dcm")
    assert no_pixels.value.code == "dicom_no_pixels"
    truncated = make_dicom(_gradient())[:-1000]  # cut inside the pixel data
    with pytest.raises(InvalidImageError, match="corrupt or truncated|cannot decode"):
        decode_image(truncated)


def test_patient_identifiers_never_leak(client, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    files = [(io.BytesIO(make_dicom(_gradient())), "a.dcm"), (io.BytesIO(make_dicom(None)), "b.dcm"),
             (io.BytesIO(make_dicom(_gradient())[:600]), "c.dcm")]
    response = client.post("/api/v1/predict", data={"file": files}, content_type="multipart/form-data")
    body = response.get_data(as_text=True)
    statuses = [r["status"] for r in response.get_json()["results"]]
    assert statuses == ["ok", "error", "error"]
    page = client.post("/", data={"file": [(io.BytesIO(make_dicom(_gradient())), "a.dcm")]},
                       content_type="multipart/form-data").get_data(as_text=True)
    for text in (body, page, caplog.text):
        assert "Doe" not in text and "Jane" not in text and PATIENT_ID not in text


@pytest.mark.parametrize(("extra", "reason"), [
    ({"Modality": "CT"}, "dicom_modality_not_radiograph"),
    ({"Modality": "OT"}, "dicom_modality_not_radiograph"),
    ({"ViewPosition": "LL"}, "lateral_view"),
    ({"Modality": "DX", "ViewPosition": "LATERAL"}, "lateral_view"),
])
def test_gate_refuses_non_radiograph_modalities_and_lateral_views(extra: dict, reason: str) -> None:
    from pneumoscan.gate import image_reasons

    assert reason in image_reasons(decode_image(make_dicom(_gradient(), extra=extra), name="scan.dcm"))


def test_gate_accepts_frontal_cr_and_dx() -> None:
    from pneumoscan.gate import image_reasons

    for extra in ({"Modality": "CR", "ViewPosition": "AP"}, {"Modality": "DX", "ViewPosition": "PA"}):
        assert image_reasons(decode_image(make_dicom(_gradient(), extra=extra), name="scan.dcm")) == []


def test_api_reports_a_lateral_dicom_as_rejected(client) -> None:
    lateral = make_dicom(_gradient(), extra={"ViewPosition": "LL"})
    response = client.post("/api/v1/predict", data={"file": [(io.BytesIO(lateral), "lat.dcm")]},
                           content_type="multipart/form-data")
    assert response.status_code == 200
    result = response.get_json()["results"][0]
    assert result["status"] == "rejected" and result["reasons"] == ["lateral_view"]
    assert "Doe" not in response.get_data(as_text=True)


def test_a_bad_character_set_value_never_reaches_a_log_or_warning(client, caplog: pytest.LogCaptureFixture,
                                                                   recwarn: pytest.WarningsRecorder) -> None:
    """pydicom warns "Unknown encoding 'VALUE'": a tag value, which must not be logged."""
    import warnings

    odd = make_dicom(_gradient(), extra={"SpecificCharacterSet": "Doe^Jane-PID-99871"})  # warns itself
    caplog.clear()
    recwarn.clear()
    caplog.set_level(logging.DEBUG)
    warnings.simplefilter("always")
    response = client.post("/api/v1/predict", data={"file": [(io.BytesIO(odd), "odd.dcm")]},
                           content_type="multipart/form-data")
    assert response.status_code == 200 and response.get_json()["results"][0]["status"] == "ok"
    shown = caplog.text + " ".join(str(w.message) for w in recwarn.list)
    assert "Doe" not in shown and PATIENT_ID not in shown


def test_only_the_first_frame_of_a_multi_frame_file_is_decoded() -> None:
    """pydicom's pixel_array decodes every frame (8 frames of 8000 x 8000 cost +2.6 GB before)."""
    import tracemalloc

    pytest.importorskip("jpeg_ls")
    from pneumoscan.imaging import MAX_DECODE_BYTES

    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("bench_bombs", Path(__file__).parents[1] / "bench" / "bombs.py")
    bombs = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bombs)
    side, frames = 2000, 8  # 8 MB a frame
    data = bombs.multiframe_dicom(side, frames)
    tracemalloc.start()
    image = decode_image(data, name="frames.dcm")
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert image.size == (side, side)
    assert peak < 3 * side * side * 2 < frames * side * side * 2  # one frame and its 8-bit copy, not eight
    with pytest.raises(InvalidImageError, match="limit is 64 MB") as caught:
        decode_image(bombs.multiframe_dicom(5700, 2), name="big.dcm")  # 65 MB a frame
    assert caught.value.code == "decode_budget_exceeded" and 5700 * 5700 * 2 > MAX_DECODE_BYTES


def _bombs():
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("bench_bombs", Path(__file__).parents[1] / "bench" / "bombs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("codec", ["jpeg", "jpegls"])
def test_a_frame_whose_own_header_agrees_decodes_and_one_that_lies_is_refused_naming_both_sizes(codec: str) -> None:
    if codec == "jpegls":
        pytest.importorskip("jpeg_ls")
    bombs = _bombs()
    assert decode_image(bombs.dicom_frame_claiming(64, codec), name="honest.dcm").size == (64, 64)
    with pytest.raises(InvalidImageError, match="declares 30000x30000 .* DICOM header says 64x64") as caught:
        decode_image(bombs.dicom_frame_claiming(30000, codec), name="liar.dcm")
    assert caught.value.code == "dicom_frame_mismatch" and caught.value.http_status == 422


def test_rle_segments_are_measured_before_pydicom_expands_them() -> None:
    bombs = _bombs()
    with pytest.raises(InvalidImageError, match="RLE segment 1 decodes to more than the 64x64") as caught:
        decode_image(bombs.rle_dicom_overflowing(16), name="rle.dcm")
    assert caught.value.code == "dicom_frame_mismatch"
    wrong_count = bytearray(make_dicom(_gradient(), syntax=RLELossless))  # 16-bit: 2 segments
    at = wrong_count.index(b"\x02\x00\x00\x00\x40\x00\x00\x00")
    wrong_count[at] = 1
    with pytest.raises(InvalidImageError, match="1 segment\\(s\\); .* needs 2"):
        decode_image(bytes(wrong_count), name="rle.dcm")


def test_deflated_data_sets_inflate_in_a_bounded_stream() -> None:
    """pydicom inflates a Deflated data set whole: 98 kB became 100 MB before any check."""
    import tracemalloc

    from pneumoscan.dicom.pixels import MAX_INFLATED_BYTES

    bombs = _bombs()
    small = decode_image(bombs.deflated_dicom(96, 16), name="deflated.dcm")
    first_row = np.asarray(small)[0]
    assert small.size == (96, 96) and first_row[1] > first_row[0] and np.asarray(small)[1:].max() == 0
    bomb = bombs.deflated_dicom(10000)  # 100 MB of samples
    assert len(bomb) < 200_000
    tracemalloc.start()
    with pytest.raises(InvalidImageError, match="inflates to more than 80 MB") as caught:
        decode_image(bomb, name="bomb.dcm")
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert caught.value.code == "decode_budget_exceeded" and peak < 1.25 * MAX_INFLATED_BYTES  # the limit, plus a bytearray's headroom


def test_a_32_bit_film_is_rescaled_a_band_at_a_time() -> None:
    """The rescale and window made full-size float64 copies (+505 MB for a 32-bit 4000^2 film)."""
    import tracemalloc

    side = 1500
    pixels = (np.arange(side * side, dtype=np.uint32).reshape(side, side) * 97) % 100_000
    data = make_dicom(pixels, extra={"BitsStored": 32, "HighBit": 31, "RescaleSlope": "0.5",
                                     "RescaleIntercept": "-10", "WindowCenter": "20000", "WindowWidth": "30000"})
    tracemalloc.start()
    image = decode_image(data, name="32bit.dcm")
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    grey = np.asarray(image)
    assert image.size == (side, side) and grey.min() == 0 and grey.max() == 255
    # the file's pixel data, its array and the 8-bit output (9 bytes a pixel), plus a band's copies;
    # one float64 copy of the film alone would be 8 bytes a pixel more
    assert peak < 16 * side * side  # full-size float64 copies took over 30 bytes a pixel


def test_codestream_headers_are_read_without_decoding() -> None:
    import struct

    from pneumoscan.dicom import codestreams

    jpeg = io.BytesIO()
    Image.fromarray(_gradient(8)).save(jpeg, format="JPEG")
    header = codestreams.jpeg_header(jpeg.getvalue())
    assert (header.columns, header.rows, header.components, header.precision) == (80, 96, 1, 8)
    siz = struct.pack(">HHIIIIIIIIH", 41, 0, 300, 200, 10, 20, 300, 200, 0, 0, 1) + bytes([11, 1, 1])
    header = codestreams.j2k_header(b"\xff\x4f\xff\x51" + siz)
    assert (header.columns, header.rows, header.components, header.precision) == (290, 180, 1, 12)
    for broken in (b"", b"\xff\xd8", b"\xff\xd8\xff\xda\x00\x02", jpeg.getvalue()[:40]):
        with pytest.raises(codestreams.CodestreamError):
            codestreams.jpeg_header(broken)
    with pytest.raises(codestreams.CodestreamError):
        codestreams.j2k_header(b"\xff\x4f\xff\x51" + siz[:10])
    assert codestreams.rle_decoded_length(b"\x81\x07" * 1000, limit=300) <= 300 + 128
    assert codestreams.rle_decoded_length(b"\x02abc\xfe\x00\x80", limit=100) == 6
