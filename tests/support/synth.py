"""Synthetic DICOM datasets for the plugin tests: CR/DX/SC images of every pixel kind."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    ExplicitVRLittleEndian,
    JPEGBaseline8Bit,
    generate_uid,
)

CR = "1.2.840.10008.5.1.4.1.1.1"
DX = "1.2.840.10008.5.1.4.1.1.1.1"
SC = "1.2.840.10008.5.1.4.1.1.7"
STUDY_UID = "1.2.826.0.1.3680043.8.498.1"


def gradient(rows: int = 64, cols: int = 48, top: int = 4095) -> np.ndarray:
    """A left-to-right ramp 0..top (so 'air dark' is easy to check: left dark in MONOCHROME2)."""
    ramp = np.linspace(0, top, cols)
    return np.tile(ramp, (rows, 1)).round().astype(np.int64)


def image(
    values: np.ndarray | None = None,
    *,
    sop_class: str = CR,
    modality: str = "CR",
    bits: int = 12,
    signed: bool = False,
    photometric: str = "MONOCHROME2",
    body_part: str | None = "CHEST",
    view_position: str | None = "PA",
    study_uid: str = STUDY_UID,
    **attrs: object,
) -> Dataset:
    """An uncompressed grayscale image dataset with file meta (Explicit VR Little Endian)."""
    if values is None:
        values = gradient(top=2**bits - 1 if not signed else 2 ** (bits - 1) - 1)
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds.SOPClassUID = sop_class
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = modality
    ds.PatientName = "Test^Patient"
    ds.PatientID = "P1"
    ds.PatientBirthDate = "19550820"
    ds.PatientSex = "M"
    ds.AccessionNumber = "A1"
    ds.StudyID = "1"
    ds.StudyDate = "20110328"
    ds.StudyTime = "090650"
    ds.ReferringPhysicianName = ""
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    if body_part is not None:
        ds.BodyPartExamined = body_part
    if view_position is not None:
        ds.ViewPosition = view_position
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.Rows, ds.Columns = int(values.shape[0]), int(values.shape[1])
    alloc = 8 if bits <= 8 else 16
    ds.BitsAllocated = alloc
    ds.BitsStored = bits
    ds.HighBit = bits - 1
    ds.PixelRepresentation = 1 if signed else 0
    dtype = {(8, False): np.uint8, (16, False): np.uint16, (8, True): np.int8, (16, True): np.int16}[(alloc, signed)]
    ds.PixelData = values.astype(dtype).tobytes()
    for k, v in attrs.items():
        setattr(ds, k, v)
    return ds


def jpeg_baseline(values8: np.ndarray, **kw: object) -> Dataset:
    """An 8-bit image compressed with JPEG Baseline (Pillow encoder), like the SIIM sample."""
    ds = image(values8, bits=8, **kw)  # type: ignore[arg-type]
    buf = io.BytesIO()
    Image.fromarray(values8.astype(np.uint8), mode="L").save(buf, format="JPEG", quality=95)
    ds.PixelData = encapsulate([buf.getvalue()])
    ds["PixelData"].VR = "OB"
    ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    ds.LossyImageCompression = "01"
    return ds


def non_image(sop_class: str, modality: str) -> Dataset:
    ds = Dataset()
    ds.SOPInstanceUID = generate_uid()
    ds.SOPClassUID = sop_class
    ds.Modality = modality
    ds.StudyInstanceUID = STUDY_UID
    return ds
