"""One patient's prior chest radiograph study and its reports, and a current study of the same
patient (for the priors tests and the screenshot scene).

``patient_history(tag)`` -> :class:`History`: the prior study (two CR views, dated 2010-01-15,
same Patient ID and issuer as the current one), its verified Comprehensive SR (written by
``plugin.drafting.sr`` as a radiologist would sign it), an Encapsulated PDF report, and the current
study (the shipped sample, dated 2011-03-24). Every UID is derived from ``tag``.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any

from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import UID, ExplicitVRLittleEndian

from plugin.drafting import samples, sr

PRIOR_FINDINGS = "Small left pleural effusion. Heart size is normal. No pneumothorax."
PRIOR_IMPRESSION = "Small left pleural effusion."
ISSUER = "GENHOSP"


@dataclass(frozen=True)
class History:
    patient_id: str
    prior_images: list[Dataset]
    prior_sr: Dataset
    prior_pdf: Dataset
    current: list[Dataset]

    @property
    def prior_study_uid(self) -> str:
        return str(self.prior_images[0].StudyInstanceUID)


def with_patient(datasets: list[Dataset], patient_id: str, study_date: str, study_time: str) -> list[Dataset]:
    for ds in datasets:
        ds.PatientID = patient_id
        ds.IssuerOfPatientID = ISSUER
        ds.PatientName = "PRIOR^PATIENT"
        ds.StudyDate = study_date
        ds.StudyTime = study_time
    return datasets


def encapsulated_pdf(prior: Dataset, text: str) -> Dataset:
    """A minimal Encapsulated PDF (PS3.3 A.45.1) of ``text`` in the prior's study."""
    body = f"BT /F1 12 Tf 72 720 Td ({text}) Tj ET".encode("latin-1")
    pdf = (b"%PDF-1.4\n1 0 obj<</Type/Catalog/Pages 2 0 R>>endobj\n2 0 obj<</Type/Pages/Kids[3 0 R]/Count 1>>endobj\n"
           b"3 0 obj<</Type/Page/Parent 2 0 R/MediaBox[0 0 612 792]/Contents 4 0 R>>endobj\n"
           b"4 0 obj<</Length " + str(len(body)).encode() + b">>stream\n" + body + b"\nendstream endobj\ntrailer<</Root 1 0 R>>\n%%EOF\n")
    if len(pdf) % 2:
        pdf += b"\n"
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.104.1"
    ds.SOPInstanceUID = sr.deterministic_uid("prior-pdf", str(prior.StudyInstanceUID))
    ds.file_meta.MediaStorageSOPClassUID = UID(ds.SOPClassUID)
    ds.file_meta.MediaStorageSOPInstanceUID = UID(ds.SOPInstanceUID)
    for kw in ("PatientName", "PatientID", "IssuerOfPatientID", "PatientBirthDate", "PatientSex", "StudyInstanceUID",
               "StudyDate", "StudyTime", "AccessionNumber", "ReferringPhysicianName", "StudyID"):
        setattr(ds, kw, prior.get(kw, ""))
    ds.Modality = "DOC"
    ds.SeriesInstanceUID = sr.deterministic_uid("prior-pdf-series", str(prior.StudyInstanceUID))
    ds.SeriesNumber = 9903
    ds.InstanceNumber = 1
    ds.ConversionType = "WSD"
    ds.ContentDate = prior.StudyDate
    ds.ContentTime = "120000"
    ds.AcquisitionDateTime = f"{prior.StudyDate}120000"
    ds.BurnedInAnnotation = "YES"
    ds.DocumentTitle = "Chest radiograph report"
    ds.ConceptNameCodeSequence = []
    ds.MIMETypeOfEncapsulatedDocument = "application/pdf"
    ds.EncapsulatedDocument = pdf
    ds.EncapsulatedDocumentLength = len(pdf)
    ds.Manufacturer = "test"
    return ds


def patient_history(tag: str, number: int = 1) -> History:
    patient_id = f"PRI-{tag}-{number}"[:64]
    prior = with_patient(samples.make_study(number, prefix=f"prior-{tag}"), patient_id, "20100115", "093000")
    current = with_patient(samples.make_study(number, prefix=f"current-{tag}"), patient_id, "20110324", "111950")
    draft = sr.build_draft_sr(prior, sr.DraftContent(findings="Lungs are clear.", impression="Normal.",
                                                     model_name="test", model_version="0"))
    signed = sr.build_signed_sr(draft, PRIOR_FINDINGS, PRIOR_IMPRESSION, "Roe^Richard", "General Hospital Radiology",
                                dt.datetime(2010, 1, 15, 10, 0, tzinfo=dt.UTC))
    pdf = encapsulated_pdf(prior[0], f"PRIOR REPORT: {PRIOR_IMPRESSION}")
    return History(patient_id, prior, signed, pdf, current)


def attach_prior(sessions: Any, store: Any, draft_id: int, images: list[Dataset], report: str,
                 study_date: str = "20100115", report_kind: str = "sr") -> int:
    """Keep ``images`` as a fetched prior of ``draft_id`` (as the drafting job would after a
    C-GET: files under ``priors/``, rows in prior_studies / prior_instances / draft_priors) with
    ``report`` as its report text; return the prior's id. For reviewer tests without a PACS."""
    from dicom_node.db import DraftPrior, PriorInstance, PriorStudy
    from dicom_node.priors import prior_relpath

    study_uid = str(images[0].StudyInstanceUID)
    with sessions() as s, s.begin():
        prior = PriorStudy(study_instance_uid=study_uid, patient_id=str(images[0].PatientID), study_date=study_date,
                           study_time="093000", study_description="XR CHEST PA AND LATERAL", modalities="CR",
                           source="test", report_kind=report_kind, report_sop_instance_uid="", report_text=report)
        s.add(prior)
        s.flush()
        for ds in images:
            relpath = prior_relpath(study_uid, str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID))
            store.write_dataset(ds, relpath)
            s.add(PriorInstance(prior_id=prior.id, sop_instance_uid=str(ds.SOPInstanceUID),
                                sop_class_uid=str(ds.SOPClassUID), series_instance_uid=str(ds.SeriesInstanceUID),
                                modality=str(ds.get("Modality", "CR")), view_position=str(ds.get("ViewPosition", "")),
                                path=relpath))
        s.add(DraftPrior(draft_id=draft_id, prior_id=prior.id))
        s.flush()
        return int(prior.id)
