"""Rebuild the shipped sample study from the shared IU X-ray data (developer tool, not run time).

    python -m plugin.drafting.samples.build /path/to/shared/data/iu_xray

Takes IU X-ray study 653 (validation split): its real indication, and its two rendered views
(256 x 256, 8-bit), and writes them as CR Image Storage, MONOCHROME1, 12 bits stored, with a
linear window that maps back exactly to the rendered image, and headers modelled on the
collection's real CR headers (nlmcxr_dicom_metadata.csv.gz): PA frontal (PatientOrientation
L\\F) and left lateral (A\\F), the indication in ReasonForTheRequestedProcedure inside the
Request Attributes Sequence. Patient and UIDs are synthetic and fixed, so the files are
reproducible byte for byte.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, UID, ExplicitVRLittleEndian

from plugin.drafting.sr import deterministic_uid

HERE = Path(__file__).resolve().parent
STUDY_ID = "653"
BASE, STEP = 500, 12  # stored = BASE + (255 - v) * STEP, MONOCHROME1


def to_dataset(pixels8: np.ndarray, view: str, number: int, indication: str) -> Dataset:
    study_uid = deterministic_uid("sample-study", STUDY_ID)
    series_uid = deterministic_uid("sample-series", STUDY_ID, str(number))
    sop_uid = deterministic_uid("sample-instance", STUDY_ID, str(number))
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = UID("1.2.840.10008.5.1.4.1.1.1")
    ds.file_meta.MediaStorageSOPInstanceUID = UID(sop_uid)
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["DERIVED", "PRIMARY"]
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.1"
    ds.SOPInstanceUID = sop_uid
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = "20110324"
    ds.StudyTime = "111950"
    ds.SeriesTime = ds.ContentTime = f"11{20 + number:02d}05"
    ds.AccessionNumber = "DEMO0653"
    ds.Modality = "CR"
    ds.Manufacturer = "SIEMENS"
    ds.InstitutionName = "cxrnode demo"
    ds.ReferringPhysicianName = "Referrer^Demo"
    ds.StudyDescription = "XR CHEST 2 VIEWS"
    ds.SeriesDescription = {"PA": "Chest PA", "LL": "Chest Lateral"}[view]
    ds.PatientName = "Demo^Patient"
    ds.PatientID = "DEMO-0653"
    ds.PatientBirthDate = "19670620"
    ds.PatientSex = "M"
    ds.BodyPartExamined = "CHEST"
    ds.KVP = "117" if view == "PA" else "121"
    ds.DistanceSourceToDetector = "1830"
    ds.ExposureTime = "12" if view == "PA" else "102"
    ds.ImagerPixelSpacing = [1.67, 1.67]  # 2992 px at 0.143 mm resampled to 256 px
    ds.ViewPosition = view
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.StudyID = "653"
    ds.SeriesNumber = number
    ds.InstanceNumber = 1
    ds.PatientOrientation = ["L", "F"] if view == "PA" else ["A", "F"]
    req = Dataset()
    req.RequestedProcedureID = "RP0653"
    req.ScheduledProcedureStepID = "SPS0653"
    req.RequestedProcedureDescription = "XR CHEST PA AND LATERAL"
    req.ReasonForTheRequestedProcedure = indication
    ds.RequestAttributesSequence = [req]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME1"
    ds.Rows, ds.Columns = pixels8.shape
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    ds.RescaleIntercept = 0
    ds.RescaleSlope = 1
    ds.RescaleType = "US"
    ds.WindowCenter = BASE + 127.5 * STEP + 0.5
    ds.WindowWidth = 255 * STEP + 1
    ds.WindowCenterWidthExplanation = "NORMAL"
    ds.PresentationLUTShape = "INVERSE"
    ds.LossyImageCompression = "01"  # the rendered views went through JPEG once
    stored = (BASE + (255 - pixels8.astype(np.int64)) * STEP).astype(np.uint16)
    ds.PixelData = stored.tobytes()
    ds.preamble = b"\x00" * 128
    return ds


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    iu = Path(argv[0] if argv else HERE.parents[2] / "shared" / "data" / "iu_xray")
    study = next(s for s in map(json.loads, (iu / "studies.jsonl").read_text().splitlines())
                 if s["study_id"] == STUDY_ID)
    views = {"Frontal": ("PA", 1), "Lateral": ("LL", 2)}
    out = HERE / "study653"
    out.mkdir(exist_ok=True)
    for img in study["images"]:
        view, number = views[img["projection"]]
        pixels = np.asarray(Image.open(iu / img["file"]).convert("L"))
        ds = to_dataset(pixels, view, number, study["indication"])
        ds.save_as(out / f"{number}_{view}.dcm", enforce_file_format=True)
    (out / "report.json").write_text(json.dumps({
        "source": f"IU X-ray (Open-i) study {STUDY_ID}, validation split; report licence CC BY-NC-ND 4.0; "
                  "views rendered from a report-conditioned thorax phantom (not a real patient)",
        "indication": study["indication"],
        "findings": study["findings"],
        "impression": study["impression"],
    }, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
