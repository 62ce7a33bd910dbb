"""A rendering of a report SR for viewers that show no SR (``[pipeline] render_report``).

- ``"sc"``: a Secondary Capture Image (PS3.3 A.8.1, built with highdicom ``SCImage``),
  8-bit MONOCHROME2, the report text drawn on it, burned-in annotation YES;
- ``"pdf"``: an Encapsulated PDF (PS3.3 A.45.1) whose single page is the same image.

Same patient and study as the SR, a series of its own; the UID is uuid5 of the SR's UID and
the kind, so rendering twice gives the same object. The text says when the report is an
unverified AI draft.
"""

from __future__ import annotations

import datetime as dt
import io
import textwrap

import highdicom as hd
import numpy as np
from PIL import Image, ImageDraw, ImageFont
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, UID, ExplicitVRLittleEndian

from plugin.drafting import sr as sr_mod

ENCAPSULATED_PDF = "1.2.840.10008.5.1.4.1.1.104.1"
RENDER_SERIES_NUMBER = {"sc": 9903, "pdf": 9904}
WIDTH, MARGIN, FONT_SIZE = 1024, 40, 22


class RenderError(ValueError):
    pass


def report_lines(ds: Dataset) -> list[str]:
    """The report as wrapped lines: banner (draft/verified), indication, findings, impression."""
    rep = sr_mod.read_report(ds)
    if rep.verification_flag == "VERIFIED":
        banner = f"VERIFIED REPORT - signed by {rep.verifying_observer.replace('^', ' ').strip()}"
    else:
        banner = "AI-GENERATED DRAFT - UNVERIFIED - NOT FOR CLINICAL USE"
    paragraphs = [banner, ""]
    if rep.indication:
        paragraphs += [f"INDICATION: {rep.indication}", ""]
    paragraphs += [f"FINDINGS: {rep.findings or '(none)'}", "", f"IMPRESSION: {rep.impression or '(none)'}", ""]
    paragraphs += list(rep.comments)
    lines: list[str] = []
    for p in paragraphs:
        lines.extend(textwrap.wrap(p, width=80) or [""])
    return lines


def render_image(lines: list[str]) -> np.ndarray:
    """White text on black (MONOCHROME2), 8-bit, WIDTH pixels wide."""
    font = ImageFont.load_default(size=FONT_SIZE)
    line_h = int(FONT_SIZE * 1.4)
    height = max(256, 2 * MARGIN + line_h * len(lines))
    height += height % 2
    img = Image.new("L", (WIDTH, height), 0)
    draw = ImageDraw.Draw(img)
    for i, line in enumerate(lines):
        draw.text((MARGIN, MARGIN + i * line_h), line, fill=255, font=font)
    return np.asarray(img, dtype=np.uint8)


def render(ds: Dataset, kind: str) -> Dataset:
    """A Secondary Capture (``"sc"``) or Encapsulated PDF (``"pdf"``) rendering of the SR ``ds``."""
    if kind not in RENDER_SERIES_NUMBER:
        raise RenderError(f'rendering kind must be "sc" or "pdf", got {kind!r}')
    pixels = render_image(report_lines(ds))
    uid = sr_mod.deterministic_uid("render", kind, str(ds.SOPInstanceUID))
    series_uid = sr_mod.deterministic_uid("render-series", kind, str(ds.StudyInstanceUID))
    if kind == "sc":
        sc = hd.sc.SCImage.from_ref_dataset(
            ref_dataset=ds,
            pixel_array=pixels,
            photometric_interpretation="MONOCHROME2",
            bits_allocated=8,
            coordinate_system="PATIENT",
            series_instance_uid=series_uid,
            series_number=RENDER_SERIES_NUMBER[kind],
            sop_instance_uid=uid,
            instance_number=1,
            manufacturer=sr_mod.MANUFACTURER,
            patient_orientation=("L", "F"),
            transfer_syntax_uid=ExplicitVRLittleEndian,
            series_description=f"{ds.get('SeriesDescription', 'report')} (rendered)"[:64],
        )
        sc.BurnedInAnnotation = "YES"
        sc.Laterality = ""  # Type 2C (General Series); a chest is not a paired structure: empty
        return sr_mod._finish(sc)
    return _pdf(ds, pixels, uid, series_uid)


def _pdf(ds: Dataset, pixels: np.ndarray, uid: str, series_uid: str) -> Dataset:
    buf = io.BytesIO()
    Image.fromarray(255 - pixels, mode="L").save(buf, format="PDF", resolution=120.0)
    doc = buf.getvalue()
    if len(doc) % 2:
        doc += b"\x00"
    out = Dataset()
    out.file_meta = FileMetaDataset()
    out.file_meta.MediaStorageSOPClassUID = UID(ENCAPSULATED_PDF)
    out.file_meta.MediaStorageSOPInstanceUID = UID(uid)
    out.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    out.file_meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    out.SpecificCharacterSet = "ISO_IR 192"
    now = dt.datetime.now()
    out.InstanceCreationDate = now.strftime("%Y%m%d")
    out.InstanceCreationTime = now.strftime("%H%M%S")
    out.SOPClassUID = ENCAPSULATED_PDF
    out.SOPInstanceUID = uid
    for kw in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyInstanceUID", "StudyDate",
               "StudyTime", "ReferringPhysicianName", "StudyID", "AccessionNumber"):
        setattr(out, kw, ds.get(kw, "") or "")
    out.Modality = "DOC"
    out.SeriesInstanceUID = series_uid
    out.SeriesNumber = RENDER_SERIES_NUMBER["pdf"]
    out.SeriesDescription = f"{ds.get('SeriesDescription', 'report')} (PDF)"[:64]
    out.Manufacturer = sr_mod.MANUFACTURER
    out.ConversionType = "SYN"
    out.InstanceNumber = 1
    out.ContentDate = ds.get("ContentDate", now.strftime("%Y%m%d"))
    out.ContentTime = ds.get("ContentTime", now.strftime("%H%M%S"))
    out.AcquisitionDateTime = f"{out.ContentDate}{str(out.ContentTime).split('.')[0]}"
    out.BurnedInAnnotation = "YES"
    out.DocumentTitle = "Chest X-ray report" + (" (AI draft, unverified)" if ds.get("VerificationFlag") != "VERIFIED" else "")
    out.ConceptNameCodeSequence = []
    out.MIMETypeOfEncapsulatedDocument = "application/pdf"
    out.EncapsulatedDocument = doc
    out.EncapsulatedDocumentLength = len(buf.getvalue())
    out.preamble = b"\x00" * 128
    return out
