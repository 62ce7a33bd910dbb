"""Priors in the drafting job: fetch the patient's prior chest radiograph beside the drafting,
read its report, and say in the draft SR which prior the radiologist will compare with.

Why inside the ``draft`` job and not a separate ``priors`` job kind: the draft SR records the
compared prior (TID 2000 "Prior Procedure Descriptions", :mod:`plugin.drafting.sr`), so the prior
must be known when the SR is built, and one job per study keeps the queue's ordering, retries
and supersession unchanged. :func:`start` runs :func:`dicom_node.priors.fetch_priors` in a thread
as soon as the job knows it has images to read, so the Query/Retrieve overlaps pixel decoding and
the model; :meth:`PriorFetch.comparison` waits for it (bounded: every Q/R call has
``priors.timeout_s``, and the wait itself is capped) just before the SR is built. Whatever
happens there (PACS down, nothing found, a bug) the draft is made: the outcome goes into the job
log, ``token_info["prior"]`` and the SR's comparison section.

The model does not use priors yet: the draft text is generated from the current images only,
and the SR says so.

The prior's report text (:func:`report_text`): from an SR (Basic Text / Enhanced / Comprehensive;
the content tree's TEXT items under their section headings: Findings, Impression, ...) or an
Encapsulated PDF (its text when the ``pypdf`` library is installed, else an honest "open it in
the PACS").
"""

from __future__ import annotations

import importlib
import io
import logging
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import pydicom
from sqlalchemy import select

from dicom_node import priors as node_priors
from dicom_node.db import PriorInstance, PriorStudy
from dicom_node.jobs import JobContext
from plugin.drafting import sr as sr_mod

log = logging.getLogger(__name__)

SR_CLASSES = {"1.2.840.10008.5.1.4.1.1.88.11", "1.2.840.10008.5.1.4.1.1.88.22", "1.2.840.10008.5.1.4.1.1.88.33",
              "1.2.840.10008.5.1.4.1.1.88.34"}
PDF_CLASS = "1.2.840.10008.5.1.4.1.1.104.1"
PDF_NO_EXTRACTOR = "PDF report: open it in the PACS (no PDF text extractor is installed on this node)."
NOT_USED_BY_MODEL = ("Shown to the radiologist for comparison; the AI draft was generated from the current images "
                     "only (the model does not use prior studies yet).")
#: sections of an SR that are not the prior's report text (our own comparison and device notes)
SKIPPED_CODES = {("121066", "DCM"), ("121106", "DCM")}


# -- the prior's report text ------------------------------------------------------------------


def _code(item: Any) -> tuple[str, str, str]:
    seq = item.get("ConceptNameCodeSequence", None)
    if not seq:
        return "", "", ""
    c = seq[0]
    return str(c.get("CodeValue", "")), str(c.get("CodingSchemeDesignator", "")), str(c.get("CodeMeaning", ""))


def _texts(items: Iterable[Any], heading: str, out: list[tuple[str, str]]) -> None:
    for item in items:
        value, scheme, meaning = _code(item)
        if (value, scheme) in SKIPPED_CODES:
            continue
        if item.get("ValueType", "") == "CONTAINER":
            _texts(item.get("ContentSequence", None) or (), meaning or heading, out)
        elif item.get("ValueType", "") == "TEXT" and str(item.get("RelationshipType", "")) == "CONTAINS":
            text = str(item.get("TextValue", "")).strip()
            if text:
                out.append((heading or meaning, text))


def sr_text(ds: pydicom.Dataset) -> str:
    """The narrative of an SR: its TEXT content items grouped under their section headings
    ("FINDINGS: ...", "IMPRESSIONS: ..."), in document order; comments and comparison left out."""
    parts: list[tuple[str, str]] = []
    _texts(ds.get("ContentSequence", None) or (), "", parts)
    lines: list[str] = []
    last = None
    for heading, text in parts:
        if heading != last:
            lines.append(f"{heading.upper()}: {text}" if heading else text)
            last = heading
        else:
            lines[-1] += f" {text}"
    return "\n".join(lines)


def pdf_text(ds: pydicom.Dataset) -> str:
    """The text of an Encapsulated PDF if ``pypdf`` is installed; else :data:`PDF_NO_EXTRACTOR`."""
    try:
        pypdf = importlib.import_module("pypdf")
    except ImportError:
        return PDF_NO_EXTRACTOR
    try:
        reader = pypdf.PdfReader(io.BytesIO(bytes(ds.EncapsulatedDocument)))
        text = "\n".join((page.extract_text() or "").strip() for page in reader.pages).strip()
    except Exception as exc:  # a damaged PDF: say so, the PACS can still show it
        return f"PDF report could not be read ({type(exc).__name__}): open it in the PACS."
    return text or PDF_NO_EXTRACTOR


def _rank(ds: pydicom.Dataset) -> tuple[int, str]:
    """Verified and complete SRs first, then other SRs, then PDFs; newest content first."""
    when = f"{ds.get('ContentDate', '')}{ds.get('ContentTime', '')}"
    if str(ds.get("SOPClassUID", "")) in SR_CLASSES:
        verified = str(ds.get("VerificationFlag", "")) == "VERIFIED" and str(ds.get("CompletionFlag", "")) == "COMPLETE"
        return (2 if verified else 1, when)
    return (0, when)


def report_text(datasets: Sequence[pydicom.Dataset]) -> tuple[str, str, str]:
    """``(kind, sop_instance_uid, text)`` of the best report among a prior's objects: ``sr``
    (a verified one preferred), ``pdf`` or ``text`` (a Basic Text SR); ``("", "", "")`` if none."""
    reports = [ds for ds in datasets if str(ds.get("SOPClassUID", "")) in SR_CLASSES | {PDF_CLASS}]
    for ds in sorted(reports, key=_rank, reverse=True):
        if str(ds.SOPClassUID) == PDF_CLASS:
            return "pdf", str(ds.SOPInstanceUID), pdf_text(ds)
        text = sr_text(ds)
        if text:
            kind = "text" if str(ds.SOPClassUID) == "1.2.840.10008.5.1.4.1.1.88.11" else "sr"
            return kind, str(ds.SOPInstanceUID), text
    return "", "", ""


# -- the fetch beside the drafting --------------------------------------------------------------


def _text(ds: Any, keyword: str) -> str:
    return str(ds.get(keyword, "") or "").strip() if ds is not None else ""


def _fmt_date(da: str) -> str:
    return f"{da[:4]}-{da[4:6]}-{da[6:8]}" if len(da) == 8 and da.isdigit() else (da or "undated")


@dataclass(frozen=True)
class Fetched:
    """What the job records: ``info`` goes into ``token_info["prior"]``; ``comparison`` into the SR."""

    info: dict[str, Any]
    comparison: sr_mod.PriorComparison | None
    prior_id: int | None = None


class PriorFetch:
    """A fetch running beside the drafting job (see the module docstring)."""

    def __init__(self, ctx: JobContext, header: Any) -> None:
        self.ctx = ctx
        self.header = header
        self._result: Fetched | None = None
        self._lines: list[str] = []
        self._thread = threading.Thread(target=self._run, name=f"priors-{ctx.job_id}", daemon=True)
        self._t0 = time.monotonic()

    def start(self) -> PriorFetch:
        self._thread.start()
        return self

    def _run(self) -> None:
        try:
            self._result = self._fetch()
        except Exception as exc:  # never let priors fail the draft
            log.exception("priors for study %r failed", self.ctx.study_instance_uid)
            self._result = _unavailable(f"{type(exc).__name__}: {exc}")

    def _fetch(self) -> Fetched:
        cfg, h = self.ctx.config, self.header
        out = node_priors.fetch_priors(
            cfg, self.ctx.sessions, self.ctx.store, current_study_uid=self.ctx.study_instance_uid,
            patient_id=_text(h, "PatientID"), issuer_of_patient_id=_text(h, "IssuerOfPatientID"),
            study_date=_text(h, "StudyDate"), study_time=_text(h, "StudyTime"), log_line=self._lines.append)
        if out.outcome == "unavailable":
            return _unavailable(out.reason)
        if out.outcome == "none":
            return Fetched({"outcome": "none", "reason": out.reason},
                           sr_mod.PriorComparison(description="No prior chest radiograph of this patient was found "
                                                              f"in the PACS. {NOT_USED_BY_MODEL}"))
        prior_id = out.prior_ids[0]
        with self.ctx.sessions() as s:
            prior = s.get(PriorStudy, prior_id)
            assert prior is not None
            rows = s.scalars(select(PriorInstance).where(PriorInstance.prior_id == prior_id)).all()
            study_uid, date, accession = prior.study_instance_uid, prior.study_date, prior.accession_number
            paths = [(r.modality, r.path) for r in rows]
            kind = prior.report_kind
        if not kind:
            reports = []
            for modality, relpath in paths:
                if modality in ("SR", "DOC"):
                    try:
                        reports.append(self.ctx.store.read_dataset(relpath))
                    except Exception as exc:
                        self._lines.append(f"priors: cannot read report {relpath}: {type(exc).__name__}")
            kind, sop_uid, text = report_text(reports)
            node_priors.set_report(self.ctx.sessions, prior_id, kind or "none", sop_uid, text)
        images = sum(1 for m, _ in paths if m not in ("SR", "DOC"))
        report = {"sr": "verified SR" if kind == "sr" else "SR", "pdf": "PDF", "text": "Basic Text SR"}.get(
            kind, "no report found")
        description = (f"Compared with the prior chest radiograph of {_fmt_date(date)} ({images} image(s); "
                       f"prior report: {report}). {NOT_USED_BY_MODEL}")
        return Fetched({"outcome": "found", "study_instance_uid": study_uid, "study_date": date,
                        "reason": out.reason}, sr_mod.PriorComparison(study_instance_uid=study_uid, study_date=date,
                                                                      accession_number=accession,
                                                                      description=description), prior_id)

    def comparison(self, timeout_s: float | None = None) -> Fetched:
        """Wait for the fetch (at most ``timeout_s``; default: six Q/R timeouts from the start)."""
        if timeout_s is None:
            timeout_s = max(0.0, 6 * self.ctx.config.priors.timeout_s - (time.monotonic() - self._t0))
        self._thread.join(timeout_s)
        for line in self._lines:
            self.ctx.log(line)
        self._lines = []
        if self._result is None:
            self.ctx.log(f"priors: still fetching after {time.monotonic() - self._t0:.0f} s; drafted without them")
            return _unavailable("the PACS took too long")
        r = self._result
        self.ctx.log(f"priors: {r.info['outcome']}" + (f" ({r.info['reason']})" if r.info.get("reason") else ""))
        return r

    def link(self, draft_id: int, fetched: Fetched) -> None:
        """Record that ``draft_id`` compares with the prior (keeps it from pruning while open)."""
        if fetched.prior_id is None:
            return
        try:
            with self.ctx.sessions() as s, s.begin():
                node_priors.link_draft(s, draft_id, fetched.prior_id)
        except Exception as exc:  # the draft stands; the prior may be pruned earlier than wanted
            self.ctx.log(f"priors: could not link draft {draft_id} to its prior: {type(exc).__name__}: {exc}")


def _unavailable(reason: str) -> Fetched:
    return Fetched({"outcome": "unavailable", "reason": reason},
                   sr_mod.PriorComparison(description=f"Prior studies could not be retrieved from the PACS "
                                                      f"({reason.rstrip('.')}). {NOT_USED_BY_MODEL}"))


def start(ctx: JobContext, datasets: Sequence[Any]) -> PriorFetch | None:
    """Start fetching priors for the job's study (``None`` when ``priors.enabled`` is off)."""
    if not ctx.config.priors.enabled:
        return None
    header = next((ds for ds in datasets if ds is not None), None)
    return PriorFetch(ctx, header).start()

