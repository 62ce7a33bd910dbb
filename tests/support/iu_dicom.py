"""IU X-ray studies as the DICOM a site would send: for the node-vs-eval test and benchmark.

Two pixel encodings, both mapping back exactly to the eval image (``onnx_models.data.read_image``,
``value / 255``) through the node's pixel path (``plugin.drafting.pixels.prepare``):

- ``"8bit"``: the 8-bit image as stored, MONOCHROME2, no window (the nominal-range path);
- ``"cr12"``: CR as real archives send it: upsampled ``scale`` times by pixel replication,
  MONOCHROME1, 12 bits stored (``stored = 16 * (255 - v)``), a LINEAR window (centre 2040.5,
  width 4081) that maps the stored values back to ``v / 255``, and headers modelled on the
  collection's own CR headers (``nlmcxr_dicom_metadata.csv.gz``: manufacturer, patient
  orientation, pixel spacing, kVp) when the image is in it.

Every study is one series, instances numbered in the study's file order (the node reads them in
series / instance-number order, eval in file order), with the study's ViewPosition tags as
``studies.jsonl`` has them (often wrong or empty, as in the original archive) and its indication
in the Request Attributes Sequence (ReasonForTheRequestedProcedure, LO, up to 64 characters) or,
when longer, in AdditionalPatientHistory (LT), where the node looks for it
(``plugin.drafting.indication``). Patient data and UIDs are synthetic and deterministic.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, UID, ExplicitVRLittleEndian

CR_IMAGE = "1.2.840.10008.5.1.4.1.1.1"
IU_XRAY = Path(__file__).resolve().parents[3] / "shared" / "data" / "iu_xray"
CR12_STEP = 16  # stored = 16 * (255 - v): 0..4080 in 12 bits
CR12_WINDOW = (2040.5, 4081.0)  # LINEAR: y = (s - 2040) / 4080 + 0.5 = s / 4080, so 1 - y = v / 255


def uid(*parts: str) -> str:
    """A deterministic UID (``2.25.`` + 128 bits of a hash of the parts)."""
    digest = hashlib.sha256("\x1f".join(("cxrnode-iu-dicom",) + parts).encode()).digest()
    return "2.25." + str(int.from_bytes(digest[:16], "big"))


def load_metadata(root: Path = IU_XRAY) -> dict[str, dict[str, str]]:
    """The original CR headers by image id (``CXR<n>_IM-...``), or {} when the dump is absent."""
    path = root / "nlmcxr_dicom_metadata.csv.gz"
    if not path.exists():
        return {}
    with gzip.open(path, "rt", newline="", encoding="utf-8") as fh:
        return {row["imageid"]: row for row in csv.DictReader(fh)}


def _list(value: str) -> list[str]:
    """A value of the metadata dump: ``"['L', 'F']"`` -> ``['L', 'F']``."""
    value = (value or "").strip()
    if value.startswith("["):
        try:
            return [str(v) for v in json.loads(value.replace("'", '"'))]
        except ValueError:
            return []
    return [value] if value else []


def read_pixels(path: Path) -> np.ndarray:
    """The 8-bit pixels of an eval image, decoded as ``onnx_models.data.read_image`` decodes them."""
    with Image.open(path) as im:
        return np.asarray(im.convert("L"))


def image_dataset(pixels8: np.ndarray, *, study_id: str, number: int, view_position: str, indication: str,
                  kind: str = "8bit", scale: int = 1, header: dict[str, str] | None = None) -> Dataset:
    """One CR instance of study ``study_id`` (``number`` = 1-based position in the study)."""
    if kind not in ("8bit", "cr12"):
        raise ValueError(f"kind must be '8bit' or 'cr12', got {kind!r}")
    header = header or {}
    sop_uid = uid("instance", study_id, str(number))
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = UID(CR_IMAGE)
    ds.file_meta.MediaStorageSOPInstanceUID = UID(sop_uid)
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["DERIVED", "PRIMARY"]
    ds.SOPClassUID = CR_IMAGE
    ds.SOPInstanceUID = sop_uid
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = "20110328"
    ds.StudyTime = ds.SeriesTime = "090650"
    ds.ContentTime = f"0907{number:02d}"
    ds.AccessionNumber = f"IU{study_id}"[:16]
    ds.Modality = "CR"
    ds.Manufacturer = header.get("Manufacturer") or "CARESTREAM"
    ds.InstitutionName = "cxrnode parity"
    ds.ReferringPhysicianName = ""
    ds.StudyDescription = "XR CHEST"
    ds.PatientName = f"Parity^{study_id}"
    ds.PatientID = f"IU-{study_id}"
    ds.PatientBirthDate = ""
    ds.PatientSex = ""
    ds.BodyPartExamined = "CHEST"
    if view_position:
        ds.ViewPosition = view_position
    orientation = _list(header.get("Patient Orientation", ""))
    if len(orientation) == 2:
        ds.PatientOrientation = orientation
    if header.get("KVP"):
        ds.KVP = header["KVP"]
    ds.StudyInstanceUID = uid("study", study_id)
    ds.SeriesInstanceUID = uid("series", study_id)
    ds.StudyID = study_id[:16]
    ds.SeriesNumber = 1
    ds.InstanceNumber = number
    req = Dataset()
    req.RequestedProcedureID = f"RP{study_id}"[:16]
    req.ScheduledProcedureStepID = f"SPS{study_id}"[:16]
    # no RequestedProcedureDescription: the node takes it as the indication when there is no
    # reason (pipeline.indication_sources), and eval has no such text for those studies
    if indication and len(indication) <= 64:
        req.ReasonForTheRequestedProcedure = indication
    elif indication:
        ds.AdditionalPatientHistory = indication
    ds.RequestAttributesSequence = [req]
    ds.SamplesPerPixel = 1
    ds.PixelRepresentation = 0
    if kind == "8bit":
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated = ds.BitsStored = 8
        ds.HighBit = 7
        data = np.ascontiguousarray(pixels8, dtype=np.uint8)
    else:
        big = np.repeat(np.repeat(pixels8, scale, axis=0), scale, axis=1) if scale > 1 else pixels8
        ds.PhotometricInterpretation = "MONOCHROME1"
        ds.BitsAllocated = 16
        ds.BitsStored = 12
        ds.HighBit = 11
        ds.RescaleIntercept = 0
        ds.RescaleSlope = 1
        ds.RescaleType = "US"
        ds.WindowCenter, ds.WindowWidth = CR12_WINDOW
        ds.WindowCenterWidthExplanation = "NORMAL"
        spacing = _list(header.get("Imager Pixel Spacing", ""))
        cols = int(header.get("Columns") or 0)
        if len(spacing) == 2 and cols:  # the detector's field of view, resampled to this size
            fov = float(spacing[1]) * cols
            ds.ImagerPixelSpacing = [f"{fov / big.shape[1]:.4f}"] * 2
        data = (CR12_STEP * (255 - big.astype(np.uint16))).astype(np.uint16)
    ds.Rows, ds.Columns = int(data.shape[0]), int(data.shape[1])
    ds.PixelData = data.tobytes()
    ds.preamble = b"\x00" * 128
    return ds


def study_datasets(study: Any, kind: str = "8bit", scale: int = 1,
                   metadata: dict[str, dict[str, str]] | None = None) -> list[Dataset]:
    """The instances of one ``onnx_models.data.Study`` (see the module docstring)."""
    return [
        image_dataset(read_pixels(im.path), study_id=study.study_id, number=i + 1,
                      view_position=im.view_position, indication=study.indication, kind=kind, scale=scale,
                      header=(metadata or {}).get(im.image_id))
        for i, im in enumerate(study.images)
    ]


def write_study(study: Any, folder: Path, **kwargs: Any) -> list[Path]:
    """Write the study's instances to ``folder``; returns the files in instance order."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for ds in study_datasets(study, **kwargs):
        path = folder / f"{ds.InstanceNumber:02d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths
