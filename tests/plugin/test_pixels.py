"""Pixel preparation on synthetic datasets of every kind the node accepts (and the real samples)."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLSLossless,
    RLELossless,
)
from synth import SC, gradient, image, jpeg_baseline

from plugin.pixels import PixelError, PixelOptions, prepare, window

SAMPLES = Path(__file__).resolve().parents[3] / "shared" / "data" / "dicom_samples"


def roundtrip(ds: Dataset) -> Dataset:
    """Write and read back, as the node's store does."""
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    buf.seek(0)
    return dcmread(buf)


def assert_air_dark_on_left(img: np.ndarray) -> None:
    assert img.dtype == np.float32 and img.ndim == 2
    assert 0.0 <= img.min() and img.max() <= 1.0
    assert img[:, :3].mean() < 0.1 and img[:, -3:].mean() > 0.9


def test_monochrome2_12bit_window_maps_to_unit_range() -> None:
    ds = image(bits=12, WindowCenter=2048, WindowWidth=4096)
    out = prepare(roundtrip(ds))
    assert_air_dark_on_left(out.array)
    assert any("window 0" in s for s in out.steps)


def test_monochrome1_is_inverted() -> None:
    ramp = gradient(top=4095)
    ds = image(ramp[:, ::-1].copy(), bits=12, photometric="MONOCHROME1", WindowCenter=2048, WindowWidth=4096)
    out = prepare(roundtrip(ds))
    assert_air_dark_on_left(out.array)  # high stored values on the left = dark after inversion
    assert any("inverted (MONOCHROME1" in s for s in out.steps)


def test_presentation_lut_shape_inverse_on_monochrome2() -> None:
    ds = image(gradient(top=4095)[:, ::-1].copy(), PresentationLUTShape="INVERSE", WindowCenter=2048, WindowWidth=4096)
    assert_air_dark_on_left(prepare(roundtrip(ds)).array)


def test_signed_16bit_with_rescale_and_second_window() -> None:
    stored = gradient(top=30000) - 15000  # -15000..15000
    ds = image(stored, bits=16, signed=True, RescaleSlope=2, RescaleIntercept=-100,
               WindowCenter=[0, -100], WindowWidth=[100, 60000])
    out0 = prepare(roundtrip(ds), PixelOptions(voi_window_index=0))
    out1 = prepare(roundtrip(ds), PixelOptions(voi_window_index=1))
    # window 0 is narrow: most pixels saturate; window 1 covers the range: a smooth ramp
    assert (out0.array < 0.01).mean() > 0.4 and (out0.array > 0.99).mean() > 0.4
    assert_air_dark_on_left(out1.array)
    assert 0.4 < out1.array[:, out1.array.shape[1] // 2].mean() < 0.6
    assert any("rescale slope 2" in s for s in out1.steps)
    # an index past the end falls back to the last window instead of failing
    assert np.allclose(prepare(roundtrip(ds), PixelOptions(voi_window_index=5)).array, out1.array)


def test_voi_lut_sequence_wins_over_window() -> None:
    lut = Dataset()
    lut.LUTDescriptor = [4096, 0, 12]
    lut.LUTData = [4095 - i for i in range(4096)]  # an inverting LUT, to prove it is used
    lut.LUTExplanation = "INVERT"
    ds = image(gradient(top=4095)[:, ::-1].copy(), WindowCenter=2048, WindowWidth=4096, VOILUTSequence=[lut])
    ds["VOILUTSequence"][0]["LUTData"].VR = "US"
    ds["VOILUTSequence"][0]["LUTDescriptor"].VR = "US"
    out = prepare(roundtrip(ds))
    assert_air_dark_on_left(out.array)
    assert "VOI LUT 0 (INVERT)" in out.steps


def test_modality_lut_sequence() -> None:
    lut = Dataset()
    lut.LUTDescriptor = [4096, 0, 16]
    lut.LUTData = [i * 10 for i in range(4096)]
    lut.ModalityLUTType = "US"
    ds = image(gradient(top=4095), ModalityLUTSequence=[lut])
    ds["ModalityLUTSequence"][0]["LUTData"].VR = "US"
    ds["ModalityLUTSequence"][0]["LUTDescriptor"].VR = "US"
    out = prepare(roundtrip(ds))
    assert "Modality LUT Sequence" in out.steps
    assert_air_dark_on_left(out.array)


def test_sigmoid_window() -> None:
    vals = np.array([0.0, 1000.0, 2000.0])
    out = window(vals, 1000, 400, "SIGMOID")
    assert out[0] < 0.01 and abs(out[1] - 0.5) < 1e-9 and out[2] > 0.99
    with pytest.raises(PixelError, match="not LINEAR"):
        window(vals, 1000, 400, "LOG")


def test_no_window_uses_data_range_and_8bit_nominal_range() -> None:
    out = prepare(roundtrip(image(gradient(top=1000) + 500, bits=12)))
    assert out.array.min() == 0.0 and out.array.max() == 1.0
    eight = prepare(roundtrip(image(gradient(top=127), bits=8)))
    assert abs(float(eight.array.max()) - 127 / 255) < 1e-6


@pytest.mark.parametrize("syntax", [RLELossless, JPEGLSLossless, JPEG2000Lossless])
def test_lossless_compressed_12bit_equals_uncompressed(syntax: str) -> None:
    ds = image(bits=12, photometric="MONOCHROME1", WindowCenter=2048, WindowWidth=4096)
    ref = prepare(roundtrip(ds)).array
    ds.compress(syntax)
    back = roundtrip(ds)
    assert back.file_meta.TransferSyntaxUID == syntax
    out = prepare(back)
    assert np.array_equal(out.array, ref)
    assert syntax in out.steps[0]


def test_jpeg_baseline_8bit() -> None:
    ramp = gradient(rows=64, cols=64, top=255)
    out = prepare(roundtrip(jpeg_baseline(ramp, sop_class=SC, modality="DX")))
    assert_air_dark_on_left(out.array)


def test_implicit_and_deflated_transfer_syntaxes() -> None:
    for syntax in (ImplicitVRLittleEndian, DeflatedExplicitVRLittleEndian):
        ds = image(WindowCenter=2048, WindowWidth=4096)
        ds.file_meta.TransferSyntaxUID = syntax
        buf = io.BytesIO()
        ds.save_as(buf, enforce_file_format=True, implicit_vr=syntax == ImplicitVRLittleEndian)
        buf.seek(0)
        back = dcmread(buf)
        assert back.file_meta.TransferSyntaxUID == syntax
        assert_air_dark_on_left(prepare(back).array)


def test_rgb_secondary_capture_becomes_luminance() -> None:
    ramp = gradient(rows=32, cols=32, top=255).astype(np.uint8)
    rgb = np.stack([ramp, ramp, ramp], axis=-1)
    ds = image(ramp, sop_class=SC, modality="DX", bits=8)
    ds.SamplesPerPixel = 3
    ds.PhotometricInterpretation = "RGB"
    ds.PlanarConfiguration = 0
    ds.PixelData = rgb.tobytes()
    assert_air_dark_on_left(prepare(roundtrip(ds)).array)


def test_resize_to_bundle_input() -> None:
    out = prepare(roundtrip(image(gradient(rows=300, cols=200), WindowCenter=2048, WindowWidth=4096)),
                  PixelOptions(size=64))
    assert out.array.shape == (64, 64) and out.original_shape == (300, 200)
    assert_air_dark_on_left(out.array)


def test_bad_input_raises_a_clear_error() -> None:
    ds = image()
    del ds.PixelData
    with pytest.raises(PixelError, match="no Pixel Data"):
        prepare(ds)
    broken = jpeg_baseline(gradient(rows=16, cols=16, top=255))
    broken.PixelData = broken.PixelData[:40] + b"\x00" * 8 + broken.PixelData[-8:]
    with pytest.raises(PixelError, match="cannot decode"):
        prepare(roundtrip(broken))
    pal = image()
    pal.PhotometricInterpretation = "PALETTE COLOR"
    with pytest.raises(PixelError, match="PALETTE"):
        prepare(pal)


@pytest.mark.parametrize("name", ["siim_chestxray14_pa_jpeg_baseline.dcm", "nih_chestxray_dx_implicit_le.dcm"])
def test_real_samples(name: str) -> None:
    path = SAMPLES / name
    if not path.exists():
        pytest.skip(f"{path} not available")
    out = prepare(dcmread(path), PixelOptions(size=224))
    assert out.array.shape == (224, 224)
    assert 0.1 < float(out.array.mean()) < 0.9 and float(out.array.std()) > 0.05


# Files shipped inside pydicom, one or more per transfer syntax the node accepts (the SCP offers
# all of pynetdicom's); lossless ones must decode to exactly the uncompressed reference.
PYDICOM_FILES = {
    "1.2.840.10008.1.2": "MR_small_implicit.dcm",
    "1.2.840.10008.1.2.2": "MR_small_bigendian.dcm",
    "1.2.840.10008.1.2.1.99": "image_dfl.dcm",
    "1.2.840.10008.1.2.5": "MR_small_RLE.dcm",
    "1.2.840.10008.1.2.4.50": "SC_rgb_dcmtk_+eb+cy+n1.dcm",
    "1.2.840.10008.1.2.4.51": "JPGExtended.dcm",
    "1.2.840.10008.1.2.4.70": "SC_rgb_jpeg_gdcm.dcm",
    "1.2.840.10008.1.2.4.80": "MR_small_jpeg_ls_lossless.dcm",
    "1.2.840.10008.1.2.4.81": "JPEGLSNearLossless_16.dcm",
    "1.2.840.10008.1.2.4.90": "MR_small_jp2klossless.dcm",
    "1.2.840.10008.1.2.4.91": "693_J2KI.dcm",
}
LOSSLESS_OF_MR_SMALL = ("MR_small_implicit.dcm", "MR_small_bigendian.dcm", "MR_small_RLE.dcm",
                        "MR_small_jpeg_ls_lossless.dcm", "MR_small_jp2klossless.dcm")


@pytest.mark.parametrize(("syntax", "name"), sorted(PYDICOM_FILES.items()))
def test_every_accepted_transfer_syntax_decodes(syntax: str, name: str) -> None:
    from pydicom.data import get_testdata_file

    path = get_testdata_file(name)
    if path is None:
        pytest.skip(f"{name} not shipped with this pydicom")
    ds = dcmread(path)
    assert ds.file_meta.TransferSyntaxUID == syntax
    out = prepare(ds, PixelOptions(size=32))
    assert out.array.shape == (32, 32) and out.array.dtype == np.float32
    assert 0.0 <= float(out.array.min()) and float(out.array.max()) <= 1.0 and float(out.array.std()) > 0.01
    if name in LOSSLESS_OF_MR_SMALL:
        ref = prepare(dcmread(get_testdata_file("MR_small.dcm")), PixelOptions(size=32)).array
        assert np.array_equal(out.array, ref)
