"""The shipped sample study (used by ``cxrnode demo``, the end-to-end tests and the benchmark).

``study653/``: two CR views (PA and left lateral), MONOCHROME1, 12 bits stored, with the
indication "History of testicular cancer, evaluate for metastatic disease" in the Request
Attributes Sequence. Built by :mod:`plugin.drafting.samples.build` from IU X-ray study 653 (validation
split; report text CC BY-NC-ND 4.0; the views are renderings of a report-conditioned thorax
phantom, not images of a patient). The patient is synthetic.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import UID

from plugin.drafting.sr import deterministic_uid

SAMPLE_DIR = Path(__file__).resolve().parent / "study653"


def sample_files() -> list[Path]:
    files = sorted(SAMPLE_DIR.glob("*.dcm"))
    if not files:
        raise FileNotFoundError(f"the sample study is missing from {SAMPLE_DIR} (broken installation?)")
    return files


def load_sample() -> list[Dataset]:
    """The sample study's instances, as shipped."""
    return [dcmread(p) for p in sample_files()]


def reference_report() -> dict[str, Any]:
    """The study's real report (indication, findings, impression) for comparison."""
    data: dict[str, Any] = json.loads((SAMPLE_DIR / "report.json").read_text(encoding="utf-8"))
    return data


def make_study(number: int, *, prefix: str = "copy", indication: str | None = None) -> list[Dataset]:
    """A copy of the sample with its own (deterministic) study, series and SOP Instance UIDs.

    ``number`` and ``prefix`` pick the UIDs and the accession number, so benchmarks and tests
    can send many distinct 2-view studies. ``indication`` replaces the sample's if given.
    """
    out = []
    study_uid = deterministic_uid("sample", prefix, str(number))
    for ds in load_sample():
        new = copy.deepcopy(ds)
        new.StudyInstanceUID = study_uid
        new.SeriesInstanceUID = deterministic_uid("sample", prefix, str(number), str(ds.SeriesInstanceUID))
        new.SOPInstanceUID = deterministic_uid("sample", prefix, str(number), str(ds.SOPInstanceUID))
        new.file_meta.MediaStorageSOPInstanceUID = UID(new.SOPInstanceUID)
        new.AccessionNumber = f"D{number:07d}"[:16]
        new.PatientID = f"DEMO-{prefix[:6]}-{number}"[:64]
        if indication is not None:
            new.RequestAttributesSequence[0].ReasonForTheRequestedProcedure = indication
        out.append(new)
    return out
