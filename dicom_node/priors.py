"""Prior studies for comparison: fetch (Query/Retrieve), keep apart, read-only, prune.

Design (issue 17). Priors are fetched *by the drafting job itself*, not by a separate job
kind: the draft SR must name the prior it was compared with (TID 2000 "Prior Procedure
Descriptions"), so the prior has to be known when the SR is built, and one job per study keeps
ordering, retries and supersession as they are. The ``draft`` handler starts
:func:`fetch_priors` in a thread at the start of the job (it overlaps pixel decoding and the
model) and waits for it, bounded by the Q/R timeouts, only before building the SR. A fetch that
fails (PACS down, rejected, timed out) returns outcome ``unavailable`` with a plain reason: the
job log and the draft say so and the draft is made anyway. Priors never block drafting.

What is kept, and where:

- files under ``storage_dir/priors/<StudyUID>/<SeriesUID>/<SOPUID>.dcm`` (never under
  ``instances/``), written durably by the :class:`~dicom_node.store.Store` and made read-only
  (0440); they never become :class:`~dicom_node.db.Study` rows, so they are never drafted,
  listed in the worklist or sent anywhere;
- rows in ``prior_studies`` / ``prior_instances`` (migration 0003), the report's text included
  (the drafting plugin reads it from the SR or PDF and calls :func:`set_report`);
- ``draft_priors``: which prior each draft was compared with.

Retention: :func:`prune` deletes priors whose ``fetched_at`` (the last fetch or comparison) is
older than ``priors.retention_days`` and that no open draft (new / in review) compares with;
:class:`PriorPruner` runs it in ``cxrnode serve`` every ``priors.prune_interval_s``.

Logs carry UIDs and counts, never patient names or IDs.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import os
import shutil
import threading
from collections.abc import Callable
from dataclasses import dataclass

from pydicom.dataset import Dataset
from sqlalchemy import exists, func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import sessionmaker

from dicom_node.config import Config
from dicom_node.db import (
    Draft,
    DraftPrior,
    DraftState,
    Job,
    JobState,
    PriorInstance,
    PriorStudy,
    db_utcnow,
)
from dicom_node.qr import REPORT_MODALITIES, QRError, QRSession, SeriesMatch, StudyMatch
from dicom_node.store import Store, _safe_component

log = logging.getLogger(__name__)

PRIORS_DIR = "priors"
READ_ONLY = 0o440
#: how many of the patient's most recent other studies are looked at (series query each)
MAX_CANDIDATES = 10
CHEST_BODY_PARTS = ("", "CHEST", "THORAX", "LUNG")


@dataclass(frozen=True)
class FetchOutcome:
    """What :func:`fetch_priors` found.

    Attributes
    ----------
    outcome:
        ``found`` (``prior_ids``, most recent first), ``none`` (the PACS has no prior chest
        radiograph of this patient), ``unavailable`` (the query or retrieval failed: ``reason``)
        or ``disabled`` (``priors.enabled`` is false).
    reason:
        A plain sentence for the log and the reviewer.
    prior_ids:
        ``prior_studies`` row ids.
    """

    outcome: str
    reason: str = ""
    prior_ids: tuple[int, ...] = ()


def prior_relpath(study_uid: str, series_uid: str, sop_uid: str) -> str:
    return "/".join((PRIORS_DIR, _safe_component(study_uid), _safe_component(series_uid),
                     _safe_component(sop_uid) + ".dcm"))


def _is_before(candidate: StudyMatch, study_date: str, study_time: str) -> bool:
    """Strictly earlier than the current study (by date and time); undated studies count as prior."""
    if not study_date or not candidate.study_date:
        return True
    now = StudyMatch("", study_date, study_time).sort_key
    return candidate.sort_key < now


def _chest_image_series(series: list[SeriesMatch], modalities: tuple[str, ...]) -> list[SeriesMatch]:
    return [s for s in series if s.modality in modalities and s.body_part_examined in CHEST_BODY_PARTS]


def fetch_priors(config: Config, sessions: sessionmaker, store: Store, *, current_study_uid: str, patient_id: str,
                 issuer_of_patient_id: str = "", study_date: str = "", study_time: str = "",
                 log_line: Callable[[str], None] = lambda _m: None) -> FetchOutcome:
    """Find and fetch the patient's most recent prior chest radiograph studies (see the module
    docstring) into ``storage_dir/priors/`` and the ``prior_studies`` tables. Never raises for
    a network or PACS problem: that is outcome ``unavailable``.

    Parameters
    ----------
    config, sessions, store:
        The node's configuration, session factory and store.
    current_study_uid:
        The study being drafted (never its own prior).
    patient_id, issuer_of_patient_id:
        Whose priors (the query keys).
    study_date, study_time:
        The current study's date and time: only earlier studies count.
    log_line:
        Called with one line per step (the job's log).

    Returns
    -------
    FetchOutcome
        The outcome, with a reason and the prior rows' ids.
    """
    pc = config.priors
    if not pc.enabled:
        return FetchOutcome("disabled")
    if not patient_id:
        return FetchOutcome("unavailable", "the study has no Patient ID: priors not queried")
    try:
        with QRSession(config) as qr:
            studies = [m for m in qr.find_studies(patient_id, issuer_of_patient_id)
                       if m.study_instance_uid != current_study_uid and _is_before(m, study_date, study_time)]
            log_line(f"priors: {len(studies)} earlier study(ies) of the patient at {qr.peer}")
            chosen: list[tuple[StudyMatch, list[SeriesMatch]]] = []
            for m in studies[:MAX_CANDIDATES]:
                if m.modalities and not set(m.modalities) & set(pc.modalities):
                    continue
                series = qr.find_series(m.study_instance_uid)
                if _chest_image_series(series, pc.modalities):
                    chosen.append((m, series))
                if len(chosen) >= pc.max_priors:
                    break
            if not chosen:
                return FetchOutcome("none", f"no prior chest radiograph ({'/'.join(pc.modalities)}) at {qr.peer}")
            ids: list[int] = []
            problems: list[str] = []
            for m, series in chosen:
                try:
                    ids.append(_fetch_one(config, sessions, store, qr, m, series, patient_id, issuer_of_patient_id,
                                          log_line))
                except QRError as exc:  # this prior failed; the others still count
                    if not qr.assoc or not qr.assoc.is_established:
                        raise
                    problems.append(str(exc))
                    log_line(f"priors: {exc}")
            if not ids:
                raise QRError("; ".join(problems))
            return FetchOutcome("found", f"{len(ids)} prior study(ies) from {qr.peer}", tuple(ids))
    except QRError as exc:
        log.warning("priors for study %r not fetched: %s", current_study_uid, exc)
        return FetchOutcome("unavailable", str(exc))
    except OSError as exc:  # the store (disk full, permissions): the draft goes on without priors
        log.warning("priors for study %r not stored: %s", current_study_uid, exc)
        return FetchOutcome("unavailable", f"the prior could not be stored: {type(exc).__name__}: {exc}")


def _fetch_one(config: Config, sessions: sessionmaker, store: Store, qr: QRSession, m: StudyMatch,
               series: list[SeriesMatch], patient_id: str, issuer: str, log_line: Callable[[str], None]) -> int:
    uid = m.study_instance_uid
    with sessions() as s:
        existing = s.scalars(select(PriorStudy).where(PriorStudy.study_instance_uid == uid)).one_or_none()
        if existing is not None and existing.instances:
            # already here: it is being compared again, so it is kept for another retention period
            s.execute(update(PriorStudy).where(PriorStudy.id == existing.id).values(fetched_at=db_utcnow(s)))
            s.commit()
            log_line(f"priors: study {uid} ({m.study_date or 'undated'}) already fetched; reused")
            return existing.id
    wanted = _chest_image_series(series, config.priors.modalities) + [s for s in series
                                                                     if s.modality in REPORT_MODALITIES]
    got: list[tuple[Dataset, str]] = []

    def keep(ds: Dataset) -> str | None:
        relpath = prior_relpath(uid, str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID))
        store.write_dataset(ds, relpath)
        with contextlib.suppress(OSError):
            os.chmod(store.abspath(relpath), READ_ONLY)
        got.append((ds, relpath))
        return None

    failed = 0
    for sm in wanted:
        outcome = qr.get_series(uid, sm.series_instance_uid, patient_id, issuer, keep)
        failed += outcome.failed + len(outcome.refused)
        for why in outcome.refused:
            log_line(f"priors: refused {why}")
    images = [(ds, p) for ds, p in got if str(ds.get("Modality", "")).upper() in config.priors.modalities]
    if not images:
        raise QRError(f"C-GET of prior study {uid} brought no image ({failed} sub-operation(s) failed)")
    log_line(f"priors: fetched study {uid} ({m.study_date or 'undated'}): {len(images)} image(s), "
             f"{len(got) - len(images)} report object(s)" + (f", {failed} failed" if failed else ""))
    return _record(sessions, m, got, qr.peer, patient_id, issuer)


def _record(sessions: sessionmaker, m: StudyMatch, got: list[tuple[Dataset, str]], source: str, patient_id: str,
            issuer: str) -> int:
    try:
        with sessions() as s, s.begin():
            prior = s.scalars(select(PriorStudy).where(PriorStudy.study_instance_uid == m.study_instance_uid)
                              ).one_or_none()
            if prior is None:
                prior = PriorStudy(study_instance_uid=m.study_instance_uid)
                s.add(prior)
            prior.patient_id = patient_id[:64]
            prior.issuer_of_patient_id = issuer[:64]
            prior.study_date = m.study_date[:8]
            prior.study_time = m.study_time[:16]
            prior.study_description = m.study_description[:64]
            prior.accession_number = m.accession_number[:16]
            prior.modalities = "\\".join(sorted({str(ds.get("Modality", "")) for ds, _ in got} - {""}))[:64]
            prior.source = source[:128]
            prior.fetched_at = db_utcnow(s)
            s.flush()
            known = set(s.scalars(select(PriorInstance.sop_instance_uid).where(PriorInstance.prior_id == prior.id)))
            for ds, relpath in got:
                if str(ds.SOPInstanceUID) in known:
                    continue
                s.add(PriorInstance(prior_id=prior.id, sop_instance_uid=str(ds.SOPInstanceUID),
                                    sop_class_uid=str(ds.SOPClassUID), series_instance_uid=str(ds.SeriesInstanceUID),
                                    modality=str(ds.get("Modality", ""))[:16],
                                    view_position=str(ds.get("ViewPosition", "") or "")[:16], path=relpath))
            s.flush()
            return prior.id
    except IntegrityError:  # another worker recorded the same prior at the same moment
        with sessions() as s:
            return int(s.scalars(select(PriorStudy.id).where(PriorStudy.study_instance_uid == m.study_instance_uid)
                                 ).one())


def set_report(sessions: sessionmaker, prior_id: int, kind: str, sop_instance_uid: str, text: str) -> None:
    """Record the prior's report (``kind`` ``sr`` / ``pdf`` / ``text``; ``""`` = none found)."""
    with sessions() as s, s.begin():
        s.execute(update(PriorStudy).where(PriorStudy.id == prior_id).values(
            report_kind=kind[:8], report_sop_instance_uid=sop_instance_uid[:64], report_text=text))


def link_draft(session: object, draft_id: int, prior_id: int) -> None:
    """Record (in the caller's transaction) that ``draft_id`` was compared with ``prior_id``."""
    from sqlalchemy.orm import Session

    assert isinstance(session, Session)
    if session.get(DraftPrior, (draft_id, prior_id)) is None:
        session.add(DraftPrior(draft_id=draft_id, prior_id=prior_id))


def prune(config: Config, sessions: sessionmaker, store: Store, now: dt.datetime | None = None) -> int:
    """Delete priors fetched more than ``priors.retention_days`` ago that no open draft compares
    with and no running job may still link (rows, then files and their folder); return how many."""
    with sessions() as s:
        now = now or db_utcnow(s)
        cutoff = now - dt.timedelta(days=config.priors.retention_days)
        in_use = exists().where(DraftPrior.prior_id == PriorStudy.id, DraftPrior.draft_id == Draft.id,
                                Draft.state.in_((DraftState.NEW, DraftState.IN_REVIEW)))
        # a job still running may have fetched a prior it has not linked to its draft yet
        running_since = s.scalar(select(func.min(Job.updated_at)).where(Job.state == JobState.RUNNING))
        if running_since is not None:
            cutoff = min(cutoff, running_since)
        expired = s.execute(select(PriorStudy.id, PriorStudy.study_instance_uid)
                            .where(PriorStudy.fetched_at < cutoff, ~in_use)).all()
    n = 0
    for prior_id, study_uid in expired:
        with sessions() as s, s.begin():
            prior = s.get(PriorStudy, prior_id)
            if prior is None:
                continue
            paths = [i.path for i in prior.instances]
            s.delete(prior)
        for relpath in paths:
            with contextlib.suppress(OSError, ValueError):
                store.abspath(relpath).unlink()
        with contextlib.suppress(OSError, ValueError):
            shutil.rmtree(store.abspath(f"{PRIORS_DIR}/{_safe_component(study_uid)}"))
        n += 1
    if n:
        log.info("pruned %d prior study(ies) older than %g day(s)", n, config.priors.retention_days)
    return n


class PriorPruner(threading.Thread):
    """Runs :func:`prune` at start and every ``priors.prune_interval_s`` until stopped."""

    def __init__(self, config: Config, sessions: sessionmaker, store: Store, stop: threading.Event) -> None:
        super().__init__(name="cxrnode-prior-pruner", daemon=True)
        self.config, self.sessions, self.store, self.stop_event = config, sessions, store, stop
        self.runs = 0

    def run(self) -> None:
        while not self.stop_event.is_set():
            try:
                prune(self.config, self.sessions, self.store)
            except Exception:
                log.exception("pruning priors failed")
            self.runs += 1
            self.stop_event.wait(self.config.priors.prune_interval_s)

