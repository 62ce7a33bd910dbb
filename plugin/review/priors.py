"""The prior a draft is compared with, for the reviewer (typed, no ORM rows leave this module).

:func:`prior_for_draft` answers :meth:`plugin.review.service.ReviewService.prior`: the prior study
linked to the draft by the drafting job (``draft_priors``), its images (paths in the node's
store, under ``priors/``), its date and its report text; or, when there is none, why
(``token_info["prior"]``: none found, PACS unavailable, pruned, or priors off). Priors are
read-only: nothing here changes them.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from dicom_node.db import Draft, DraftPrior, PriorInstance, PriorStudy
from dicom_node.store import Store
from plugin.token_info import TokenInfo

NO_PRIOR = "No prior chest radiographs found"
REPORT_MODALITIES = ("SR", "DOC")


@dataclass(frozen=True)
class PriorImage:
    """One image of a prior study, for the prior panel.

    Attributes
    ----------
    sop_instance_uid:
        The image.
    view:
        ViewPosition as sent (PA, AP, LL, ...), not re-checked.
    path:
        Its file under ``storage_dir/priors/``.
    """
    sop_instance_uid: str
    view: str  # ViewPosition as sent (PA, AP, LL, ...), not re-checked
    path: Path


@dataclass(frozen=True)
class PriorDetail:
    """The prior study shown beside a draft (``ReviewService.prior``).

    Attributes
    ----------
    outcome:
        ``found`` (the rest filled in), ``none``, ``unavailable``, ``pruned`` or ``off``.
    message:
        One plain sentence for the reviewer.
    study_instance_uid, study_date, study_description, accession_number:
        The prior study (``study_date``: DA, YYYYMMDD).
    images:
        Its images.
    report_kind, report_text:
        Its report: ``sr``, ``pdf`` or ``text`` (``""`` or ``"none"``: no report found) and the text.
    source:
        Where the report came from.
    """

    outcome: str
    message: str
    study_instance_uid: str = ""
    study_date: str = ""  # DA, YYYYMMDD
    study_description: str = ""
    accession_number: str = ""
    images: tuple[PriorImage, ...] = ()
    report_kind: str = ""  # sr, pdf, text; "" or "none": no report found
    report_text: str = ""
    source: str = ""

    @property
    def found(self) -> bool:
        return self.outcome == "found"



def _detail(s: Session, store: Store, prior: PriorStudy) -> PriorDetail:
    rows = s.scalars(select(PriorInstance).where(PriorInstance.prior_id == prior.id).order_by(PriorInstance.id)).all()
    images = tuple(PriorImage(r.sop_instance_uid, r.view_position or "", store.abspath(r.path))
                   for r in rows if r.modality not in REPORT_MODALITIES)
    kind = prior.report_kind if prior.report_kind != "none" else ""
    return PriorDetail(
        outcome="found", message=f"Prior of {format_date(prior.study_date)}: read-only",
        study_instance_uid=prior.study_instance_uid, study_date=prior.study_date,
        study_description=prior.study_description, accession_number=prior.accession_number, images=images,
        report_kind=kind, report_text=prior.report_text if kind else "No report was found with the prior study.",
        source=prior.source)


def format_date(da: str) -> str:
    return f"{da[:4]}-{da[4:6]}-{da[6:8]}" if len(da) == 8 and da.isdigit() else (da or "undated")


def prior_for_draft(sessions: sessionmaker[Session], store: Store, draft_id: int) -> PriorDetail:
    """The prior ``draft_id`` is compared with (see the module docstring)."""
    with sessions() as s:
        d = s.get(Draft, draft_id)
        if d is None:
            return PriorDetail("off", f"draft {draft_id} does not exist")
        prior = s.scalars(select(PriorStudy).join(DraftPrior, DraftPrior.prior_id == PriorStudy.id)
                          .where(DraftPrior.draft_id == draft_id)
                          .order_by(PriorStudy.study_date.desc(), PriorStudy.study_time.desc())).first()
        if prior is not None:
            return _detail(s, store, prior)
        info = TokenInfo.parse(d.token_info).prior or {}
    outcome = info.get("outcome", "")
    if outcome == "none":
        return PriorDetail("none", NO_PRIOR + " in the PACS for this patient.")
    if outcome == "unavailable":
        return PriorDetail("unavailable", f"Priors could not be fetched: {info.get('reason', 'unknown reason')}")
    if outcome == "found":
        return PriorDetail("pruned", f"The prior of {format_date(info.get('study_date', ''))} is no longer kept "
                                     "on this node (retention); open it in the PACS.")
    return PriorDetail("off", "Priors are not fetched for this draft ([priors] enabled = false when it was drafted).")


def age_days(prior_date: str, current_date: str) -> int | None:
    """Days between the prior and the current study (None when a date is missing)."""
    try:
        a = dt.datetime.strptime(prior_date, "%Y%m%d").date()
        b = dt.datetime.strptime(current_date, "%Y%m%d").date()
    except ValueError:
        return None
    return (b - a).days
