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
from support.synth import SC, gradient, image, jpeg_baseline

from plugin.drafting.pixels import PixelError, PixelOptions, prepare, voi, window

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


def test_native_size_the_runtime_alone_resizes() -> None:
    out = prepare(roundtrip(image(gradient(rows=300, cols=200), WindowCenter=2048, WindowWidth=4096)))
    assert out.array.shape == (300, 200) and out.original_shape == (300, 200)
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
    ds = dcmread(path)
    out = prepare(ds)
    assert out.array.shape == (ds.Rows, ds.Columns)
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
    out = prepare(ds)
    assert out.array.shape == (ds.Rows, ds.Columns) and out.array.dtype == np.float32
    assert 0.0 <= float(out.array.min()) and float(out.array.max()) <= 1.0 and float(out.array.std()) > 0.01
    if name in LOSSLESS_OF_MR_SMALL:
        ref = prepare(dcmread(get_testdata_file("MR_small.dcm"))).array
        assert np.array_equal(out.array, ref)


# --- the LUT stage is pydicom's; these pin it to PS3.3 C.11 and cover what pydicom lacks --------

def reference_window(x: np.ndarray, c: float, w: float, function: str) -> np.ndarray:
    """PS3.3 C.11.2.1.2 / C.11.2.1.3, written out, output in [0, 1]."""
    if function == "SIGMOID":
        return 1.0 / (1.0 + np.exp(-4.0 * (x - c) / w))
    if function == "LINEAR_EXACT":
        return np.clip((x - (c - w / 2)) / w, 0.0, 1.0)
    if w == 1:
        return (x > c - 0.5).astype(np.float64)
    return np.clip((x - (c - 0.5)) / (w - 1) + 0.5, 0.0, 1.0)


@pytest.mark.parametrize("function", ["LINEAR", "LINEAR_EXACT", "SIGMOID"])
@pytest.mark.parametrize(("center", "width"), [(2048, 4096), (1000, 400), (2040.5, 4081), (100, 1)])
def test_windows_follow_the_standard(function: str, center: float, width: float) -> None:
    stored = np.random.default_rng(0).integers(0, 4096, size=(40, 30))
    ds = roundtrip(image(stored, bits=12, WindowCenter=center, WindowWidth=width, VOILUTFunction=function))
    out = prepare(ds)
    np.testing.assert_array_equal(out.array, reference_window(stored, center, width, function).astype(np.float32))
    assert f"window 0 center {center:g} width {width:g} {function}" in out.steps


def test_unusable_window_falls_back_to_the_data_range() -> None:
    out = prepare(roundtrip(image(gradient(top=1000) + 500, bits=12, WindowCenter=800, WindowWidth=0)))
    assert out.array.min() == 0.0 and out.array.max() == 1.0
    assert any("full range 500..1500" in s for s in out.steps)


def lut_item(n: int, first: int, bits: int, data: list[int], vr: str, big_endian: bool = False) -> Dataset:
    item = Dataset()
    item.LUTDescriptor = [n, first, bits]
    item["LUTDescriptor"].VR = "US"
    if vr == "OW":
        item.add_new(0x00283006, "OW", np.asarray(data, dtype=">u2" if big_endian else "<u2").tobytes())
    else:
        item.LUTData = data
        item["LUTData"].VR = "US"
    return item


def saved(ds: Dataset, big_endian: bool) -> Dataset:
    """Write in Explicit VR Little or Big Endian (pixel words in that byte order) and read back."""
    from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian

    if big_endian:
        ds.PixelData = np.frombuffer(ds.PixelData, dtype="<u2").astype(">u2").tobytes()
    ds.file_meta.TransferSyntaxUID = ExplicitVRBigEndian if big_endian else ExplicitVRLittleEndian
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True, little_endian=not big_endian, implicit_vr=False)
    buf.seek(0)
    return dcmread(buf)


@pytest.mark.parametrize("big_endian", [False, True])
@pytest.mark.parametrize("vr", ["US", "OW"])
@pytest.mark.parametrize("bits", [16, 12, 8])
def test_voi_lut_sequence_in_either_byte_order(vr: str, big_endian: bool, bits: int) -> None:
    """OW LUT Data is read in the dataset's byte order (the hand-written code assumed little
    endian); an 8-bit LUT with 4,096 entries does not wrap (pydicom indexes with its entries' width)."""
    stored = np.random.default_rng(1).integers(0, 4096, size=(40, 30))
    top = 2**bits - 1
    table = [round(top * (i / 4095) ** 0.5) for i in range(4096)]
    ds = saved(image(stored, bits=12, VOILUTSequence=[lut_item(4096, 0, bits, table, vr, big_endian)]), big_endian)
    expected = (np.asarray(table, dtype=np.float64)[stored] / top).astype(np.float32)
    np.testing.assert_array_equal(prepare(ds).array, expected)


@pytest.mark.parametrize("big_endian", [False, True])
@pytest.mark.parametrize("vr", ["US", "OW"])
def test_modality_lut_sequence_in_either_byte_order(vr: str, big_endian: bool) -> None:
    stored = np.random.default_rng(2).integers(0, 4096, size=(40, 30))
    table = [3 * i for i in range(3000)]  # first mapped value 500: below clamps to entry 0
    ds = saved(image(stored, bits=12, ModalityLUTSequence=[lut_item(3000, 500, 16, table, vr, big_endian)]),
               big_endian)
    modality = np.asarray(table, dtype=np.float64)[np.clip(stored - 500, 0, 2999)]
    expected = (modality - modality.min()) / (modality.max() - modality.min())
    np.testing.assert_array_equal(prepare(ds).array, expected.astype(np.float32))


def test_lut_quirks_pydicom_lacks() -> None:
    """A 12-bit-entry Modality LUT (PS3.3 allows 8 or 16; archives send 12) and a signed image's
    LUT whose first mapped value is written as US (63536 = -2000) are read as meant."""
    stored = np.random.default_rng(3).integers(0, 4096, size=(40, 30))
    table = [4095 - i for i in range(4096)]
    out = prepare(roundtrip(image(stored, bits=12, ModalityLUTSequence=[lut_item(4096, 0, 12, table, "US")])))
    np.testing.assert_array_equal(out.array, ((4095 - stored - (4095 - stored).min())
                                              / np.ptp(4095 - stored)).astype(np.float32))
    signed = np.random.default_rng(4).integers(-2000, 2000, size=(40, 30))
    voi = [16 * i for i in range(4000)]
    ds = roundtrip(image(signed, bits=16, signed=True, VOILUTSequence=[lut_item(4000, 63536, 16, voi, "US")]))
    np.testing.assert_array_equal(prepare(ds).array, ((signed + 2000) * 16 / (16 * 3999)).astype(np.float32))


def test_voi_on_a_header_copied_without_file_meta() -> None:
    """The reviewer windows a header copied without its file meta (gui.imaging): OW LUT Data is
    then taken as little endian, as the node stores it."""
    ds = roundtrip(image(gradient(top=4095), VOILUTSequence=[lut_item(4096, 0, 16, [4095 - i for i in range(4096)], "OW")]))
    header = Dataset()
    for elem in ds:
        if elem.tag != 0x7FE00010:
            header.add(elem)
    display, how = voi(np.array([0.0, 4095.0]), header)
    assert how == "VOI LUT 0" and display.tolist() == [1.0, 0.0]


def test_8bit_monochrome2_equals_what_eval_reads(tmp_path: Path) -> None:
    """An 8-bit MONOCHROME2 image without a window gives exactly ``onnx_models.data.read_image``
    of an image file with the same pixels (value / 255): eval measures what the node reads."""
    from PIL import Image

    from onnx_models.data import read_image

    pixels = np.arange(256, dtype=np.uint8).reshape(16, 16)
    Image.fromarray(pixels, mode="L").save(tmp_path / "a.png")
    out = prepare(roundtrip(image(pixels, bits=8)))
    np.testing.assert_array_equal(out.array, read_image(tmp_path / "a.png"))
    assert out.array.dtype == np.float32 and "nominal range 0..255 (no window)" in out.steps
