"""The review service: the worklist of drafted reports and their sign-off.

Used by the PyQt6 reviewer (``gui``) and by the end-to-end tests; it has no Qt and no DIMSE.

A draft moves ``new -> in_review -> signed`` (or ``rejected``); the pipeline may mark an
unsigned draft ``superseded`` when the study gained images and a newer draft replaces it.

Exclusive review is a lock held in the database, so it works the same for one reviewer on the
node's machine (SQLite) and for several reviewer desktops sharing one PostgreSQL:

* :meth:`ReviewService.claim` is one conditional ``UPDATE ... WHERE`` (state still open, and the
  draft unclaimed, claimed by the same user, or its claim older than ``claim_timeout_s``). The
  row count says who won; no read-then-write window exists.
* :meth:`ReviewService.sign` builds and stores the verified SR, then commits the state change with
  another conditional ``UPDATE`` (``state = 'in_review' AND claimed_by = user``) in the same
  transaction as the index row, the audit events and the outbound transfers. Exactly one
  reviewer's update can match; the loser's transaction is rolled back and its file removed.

The verifying observer (PS3.3 C.17.2.1, Verifying Observer Sequence; TID 2000 verification) is
the authenticated OS account (or database role) mapped through the config's ``[[reviewers]]``
table to a display name and organisation. There is no free-text name at signing time: an
account that is not configured cannot claim, sign or reject.

Nothing unsigned is presented as final: :attr:`DraftDetail.is_final` is true only for a signed
draft, and every worklist row carries its state.
"""

from __future__ import annotations

import datetime as dt
import difflib
import getpass
import json
import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pydicom
import pydicom.errors
from sqlalchemy import and_, func, or_, select, update
from sqlalchemy.orm import Session, sessionmaker

from dicom_node import index, outbound
from dicom_node.config import Config, Reviewer
from dicom_node.db import Draft, DraftState, Instance, Job, JobState, Study, StudyState, utcnow
from dicom_node.store import Store
from plugin import sr

log = logging.getLogger(__name__)

DEFAULT_CLAIM_TIMEOUT_S = 15 * 60.0

# Worklist states as the radiologist sees them (a superset of DraftState).
STATE_NEW = "new"
STATE_IN_REVIEW = "in_review"
STATE_SIGNED = "signed"
STATE_REJECTED = "rejected"
STATE_FAILED = "failed"  # drafting failed for good: there is no draft to review
WORKLIST_STATES = (STATE_NEW, STATE_IN_REVIEW, STATE_SIGNED, STATE_REJECTED, STATE_FAILED)
OPEN_STATES = (STATE_NEW, STATE_IN_REVIEW)

SORT_KEYS = ("age", "patient_name", "patient_id", "study_date", "accession_number", "state")


class ReviewError(Exception):
    """A review action could not be done; the message says why, in the reviewer's words."""


class UnknownReviewerError(ReviewError):
    """The account is not in the config's ``[[reviewers]]``: it cannot claim, sign or reject."""


class ClaimConflictError(ReviewError):
    """Another reviewer holds the draft."""

    def __init__(self, message: str, holder: str = "") -> None:
        super().__init__(message)
        self.holder = holder


class NotReviewableError(ReviewError):
    """The draft is signed, rejected or superseded (or does not exist)."""


def current_user() -> str:
    """The authenticated OS account running this process."""
    return getpass.getuser()


@dataclass(frozen=True)
class WorklistRow:
    """One line of the worklist: a draft (or a study whose drafting failed)."""

    draft_id: int | None
    study_instance_uid: str
    patient_name: str
    patient_id: str
    study_date: str
    accession_number: str
    views: tuple[str, ...]
    created_at: dt.datetime
    age_s: float
    state: str  # one of WORKLIST_STATES
    claimed_by: str = ""  # the holder of a live claim (state in_review)
    model_name: str = ""
    model_version: str = ""
    detail: str = ""  # for failed: the job's last error; for rejected: the reason

    @property
    def state_label(self) -> str:
        if self.state == STATE_IN_REVIEW:
            return f"in review by {self.claimed_by}"
        return self.state


@dataclass(frozen=True)
class ViewRef:
    """One image the draft was made from."""

    sop_instance_uid: str
    view: str  # PA, AP, LATERAL, LL, UNKNOWN
    source: str  # where the view label came from (tag, model, ...)
    path: Path | None  # absolute path in the store; None if the instance is not indexed


@dataclass(frozen=True)
class DraftDetail:
    """Everything the reviewer shows for one draft."""

    draft_id: int
    study_instance_uid: str
    sop_instance_uid: str
    path: Path
    patient_name: str
    patient_id: str
    patient_birth_date: str
    patient_sex: str
    study_date: str
    study_description: str
    accession_number: str
    indication: str
    findings: str
    impression: str
    tokens: tuple[tuple[str, float], ...]
    views: tuple[ViewRef, ...]
    model_name: str
    model_version: str
    created_at: dt.datetime
    state: str
    claimed_by: str
    claimed_at: dt.datetime | None
    signed_by: str = ""
    signed_at: dt.datetime | None = None
    signed_sop_instance_uid: str = ""
    signed_findings: str = ""
    signed_impression: str = ""
    reject_reason: str = ""
    #: sentences the model's grounding step added, with the observation probability behind each
    grounded: tuple[tuple[str, float], ...] = ()

    @property
    def is_final(self) -> bool:
        """Only a signed report is final; everything else is an unverified AI draft."""
        return self.state == DraftState.SIGNED

    @property
    def is_open(self) -> bool:
        return self.state in (DraftState.NEW, DraftState.IN_REVIEW)


def parse_token_info(raw: str | None) -> tuple[tuple[str, float], ...]:
    """Words and their probabilities from ``Draft.token_info`` (JSON).

    Accepts a list of ``[word, prob]`` pairs or of objects with a word (``word``/``token``/
    ``text``) and a probability (``prob``/``p``/``probability``), or an object whose values are
    such lists (one per report section). Word-piece markers (``Ġ``, ``▁``, ``##``) are removed.
    Anything unreadable gives an empty tuple: highlighting is an aid, never a failure.
    """
    if not raw:
        return ()
    try:
        data = json.loads(raw)
    except (TypeError, ValueError):
        return ()
    items: list[Any] = []
    if isinstance(data, dict):
        for key in ("findings", "impression", "tokens", "words"):
            if isinstance(data.get(key), list):
                items.extend(data[key])
    elif isinstance(data, list):
        items = data
    out: list[tuple[str, float]] = []
    for item in items:
        word: Any = None
        prob: Any = None
        if isinstance(item, list | tuple) and len(item) >= 2:
            word, prob = item[0], item[1]
        elif isinstance(item, dict):
            word = next((item[k] for k in ("word", "token", "text") if k in item), None)
            prob = next((item[k] for k in ("prob", "p", "probability") if k in item), None)
        if not isinstance(word, str) or not isinstance(prob, int | float) or isinstance(prob, bool):
            continue
        word = word.replace("Ġ", "").replace("▁", "").removeprefix("##").strip()
        if word:
            out.append((word, float(prob)))
    return tuple(out)


def parse_grounded(raw: str | None) -> tuple[tuple[str, float], ...]:
    """The ``grounded`` sentences of ``Draft.token_info`` (``[[sentence, probability], ...]``);
    anything unreadable gives an empty tuple."""
    try:
        data = json.loads(raw or "")
    except (TypeError, ValueError):
        return ()
    items = data.get("grounded") if isinstance(data, dict) else None
    if not isinstance(items, list):
        return ()
    return tuple((str(i[0]), float(i[1])) for i in items
                 if isinstance(i, list | tuple) and len(i) >= 2 and isinstance(i[0], str)
                 and isinstance(i[1], int | float) and not isinstance(i[1], bool))


def text_diff(before: str, after: str, before_name: str = "AI draft", after_name: str = "edited") -> str:
    """A unified, line-based diff of two report texts (empty when equal)."""
    if before == after:
        return ""
    return "".join(
        difflib.unified_diff(
            before.splitlines(keepends=True) or [""],
            after.splitlines(keepends=True) or [""],
            fromfile=before_name,
            tofile=after_name,
            lineterm="\n",
        )
    )


def _views_of(raw: str | None) -> list[dict[str, str]]:
    if not raw:
        return []
    try:
        data = json.loads(raw)
    except (TypeError, ValueError):
        return []
    out: list[dict[str, str]] = []
    if isinstance(data, list):
        for item in data:
            if isinstance(item, dict):
                out.append({k: str(v) for k, v in item.items()})
            elif isinstance(item, str):
                out.append({"view": item})
    return out


class ReviewService:
    """Worklist, claim, release, sign and reject, all audited.

    ``sessions`` is a SQLAlchemy ``sessionmaker`` bound to the node's database; every method
    opens and closes its own session, so one service can be shared by threads.
    ``clock`` returns naive UTC (as :func:`dicom_node.db.utcnow`); tests pass a fake one.
    """

    def __init__(
        self,
        config: Config,
        sessions: sessionmaker[Session],
        store: Store,
        *,
        claim_timeout_s: float = DEFAULT_CLAIM_TIMEOUT_S,
        clock: Callable[[], dt.datetime] = utcnow,
    ) -> None:
        if claim_timeout_s <= 0:
            raise ValueError(f"claim_timeout_s: expected a positive number of seconds, got {claim_timeout_s!r}")
        self.config = config
        self.sessions = sessions
        self.store = store
        self.claim_timeout_s = float(claim_timeout_s)
        self.clock = clock

    # -- identity ---------------------------------------------------------------------------

    def reviewer(self, user: str) -> Reviewer:
        """The configured reviewer for an account, or :class:`UnknownReviewerError`."""
        found = self.config.reviewer(user)
        if found is None:
            where = f" in {self.config.source}" if self.config.source else ""
            raise UnknownReviewerError(
                f"account {user!r} is not a configured reviewer: add a [[reviewers]] entry with "
                f"username = {user!r}, display_name and organisation{where}"
            )
        return found

    def is_reviewer(self, user: str) -> bool:
        return self.config.reviewer(user) is not None

    # -- worklist ---------------------------------------------------------------------------

    def _claim_cutoff(self, now: dt.datetime) -> dt.datetime:
        return now - dt.timedelta(seconds=self.claim_timeout_s)

    def _claimable_by(self, user: str, now: dt.datetime) -> Any:
        """SQL condition: an open draft nobody else holds a live claim on."""
        return and_(
            Draft.state.in_([DraftState.NEW, DraftState.IN_REVIEW]),
            or_(
                Draft.claimed_by.is_(None),
                Draft.claimed_by == user,
                Draft.claimed_at.is_(None),
                Draft.claimed_at < self._claim_cutoff(now),
            ),
        )

    def _row_state(self, d: Draft, now: dt.datetime) -> tuple[str, str]:
        if d.state == DraftState.IN_REVIEW:
            if d.claimed_by and d.claimed_at and d.claimed_at >= self._claim_cutoff(now):
                return STATE_IN_REVIEW, d.claimed_by
            return STATE_NEW, ""  # the claim expired: open to anyone
        return d.state, ""

    def worklist(
        self,
        states: Iterable[str] | None = OPEN_STATES + (STATE_FAILED,),
        search: str = "",
        sort: str = "age",
        descending: bool = True,
        limit: int = 1000,
    ) -> list[WorklistRow]:
        """Drafts (latest per study, superseded ones left out) and failed studies.

        ``states``: worklist states to keep (None = all). ``search``: case-insensitive match on
        patient name, patient ID, accession number or study UID. ``sort``: one of
        :data:`SORT_KEYS`; the default (``age``, descending) puts the oldest draft first: first come, first read.
        """
        if sort not in SORT_KEYS:
            raise ValueError(f"sort: expected one of {', '.join(SORT_KEYS)}, got {sort!r}")
        wanted = set(WORKLIST_STATES if states is None else states)
        unknown = wanted - set(WORKLIST_STATES)
        if unknown:
            raise ValueError(f"states: unknown {sorted(unknown)}, expected some of {WORKLIST_STATES}")
        now = self.clock()
        needle = search.strip().lower()
        rows: list[WorklistRow] = []
        with self.sessions() as s:
            q = (
                select(Draft, Study)
                .join(Study, Draft.study_id == Study.id)
                .where(Draft.state != DraftState.SUPERSEDED)
                .order_by(Draft.created_at)
                .limit(limit)
            )
            db_states = {
                STATE_NEW: [DraftState.NEW, DraftState.IN_REVIEW],  # expired claims read as new
                STATE_IN_REVIEW: [DraftState.IN_REVIEW],
                STATE_SIGNED: [DraftState.SIGNED],
                STATE_REJECTED: [DraftState.REJECTED],
            }
            wanted_db = sorted({x for st in wanted for x in db_states.get(st, [])})
            q = q.where(Draft.state.in_(wanted_db))
            if needle:
                like = f"%{needle}%"
                q = q.where(
                    or_(
                        func.lower(Study.patient_name).like(like),
                        func.lower(Study.patient_id).like(like),
                        func.lower(Study.accession_number).like(like),
                        func.lower(Study.study_instance_uid).like(like),
                    )
                )
            for d, st in s.execute(q).all():
                state, holder = self._row_state(d, now)
                if state not in wanted:
                    continue
                rows.append(
                    WorklistRow(
                        draft_id=d.id,
                        study_instance_uid=st.study_instance_uid,
                        patient_name=st.patient_name,
                        patient_id=st.patient_id,
                        study_date=st.study_date,
                        accession_number=st.accession_number,
                        views=tuple(v.get("view", "UNKNOWN") for v in _views_of(d.views)),
                        created_at=d.created_at,
                        age_s=max(0.0, (now - d.created_at).total_seconds()),
                        state=state,
                        claimed_by=holder,
                        model_name=d.model_name,
                        model_version=d.model_version,
                        detail=d.reject_reason or "",
                    )
                )
            if STATE_FAILED in wanted:
                fq = select(Study).where(Study.state == StudyState.FAILED).limit(limit)
                for st in s.scalars(fq).all():
                    hay = " ".join(
                        [st.patient_name, st.patient_id, st.accession_number, st.study_instance_uid]
                    ).lower()
                    if needle and needle not in hay:
                        continue
                    job = s.scalars(
                        select(Job)
                        .where(Job.study_id == st.id, Job.state == JobState.FAILED)
                        .order_by(Job.id.desc())
                        .limit(1)
                    ).first()
                    since = (job.updated_at if job else None) or st.last_received_at
                    rows.append(
                        WorklistRow(
                            draft_id=None,
                            study_instance_uid=st.study_instance_uid,
                            patient_name=st.patient_name,
                            patient_id=st.patient_id,
                            study_date=st.study_date,
                            accession_number=st.accession_number,
                            views=(),
                            created_at=since,
                            age_s=max(0.0, (now - since).total_seconds()),
                            state=STATE_FAILED,
                            model_name=job.model_name if job else "",
                            model_version=job.model_version if job else "",
                            detail=(job.last_error or "") if job else "",
                        )
                    )
        return sort_rows(rows, sort, descending)

    def find_draft(self, study_instance_uid: str) -> int | None:
        """The current (not superseded) draft of a study, for context launch; None if none."""
        with self.sessions() as s:
            return s.scalars(
                select(Draft.id)
                .join(Study, Draft.study_id == Study.id)
                .where(Study.study_instance_uid == study_instance_uid, Draft.state != DraftState.SUPERSEDED)
                .order_by(Draft.id.desc())
                .limit(1)
            ).first()

    # -- one draft --------------------------------------------------------------------------

    def detail(self, draft_id: int) -> DraftDetail:
        """The draft with its study, views (resolved to store paths) and token probabilities."""
        with self.sessions() as s:
            return self._detail(s, draft_id)

    def _detail(self, s: Session, draft_id: int) -> DraftDetail:
        d = s.get(Draft, draft_id)
        if d is None:
            raise NotReviewableError(f"draft {draft_id} does not exist")
        st = d.study
        refs = _views_of(d.views)
        uids = [r.get("sop_instance_uid", "") for r in refs]
        paths: dict[str, str] = {
            uid: path
            for uid, path in s.execute(
                select(Instance.sop_instance_uid, Instance.path).where(Instance.sop_instance_uid.in_(uids))
            )
        }
        views = tuple(
            ViewRef(
                sop_instance_uid=r.get("sop_instance_uid", ""),
                view=r.get("view", "UNKNOWN"),
                source=r.get("source", ""),
                path=self.store.abspath(paths[r["sop_instance_uid"]]) if r.get("sop_instance_uid") in paths else None,
            )
            for r in refs
        )
        state, holder = self._row_state(d, self.clock())
        return DraftDetail(
            draft_id=d.id,
            study_instance_uid=st.study_instance_uid,
            sop_instance_uid=d.sop_instance_uid,
            path=self.store.abspath(d.path),
            patient_name=st.patient_name,
            patient_id=st.patient_id,
            patient_birth_date=st.patient_birth_date,
            patient_sex=st.patient_sex,
            study_date=st.study_date,
            study_description=st.study_description,
            accession_number=st.accession_number,
            indication=d.indication,
            findings=d.findings,
            impression=d.impression,
            tokens=parse_token_info(d.token_info),
            grounded=parse_grounded(d.token_info),
            views=views,
            model_name=d.model_name,
            model_version=d.model_version,
            created_at=d.created_at,
            state=d.state if d.state != DraftState.IN_REVIEW else (DraftState.IN_REVIEW if holder else DraftState.NEW),
            claimed_by=holder,
            claimed_at=d.claimed_at if holder else None,
            signed_by=d.signed_by or "",
            signed_at=d.signed_at,
            signed_sop_instance_uid=d.signed_sop_instance_uid or "",
            signed_findings=d.signed_findings or "",
            signed_impression=d.signed_impression or "",
            reject_reason=d.reject_reason or "",
        )

    # -- the lock ---------------------------------------------------------------------------

    def _explain_refusal(self, s: Session, draft_id: int, user: str, now: dt.datetime) -> ReviewError:
        d = s.get(Draft, draft_id)
        if d is None:
            return NotReviewableError(f"draft {draft_id} does not exist")
        if d.state == DraftState.SIGNED:
            return NotReviewableError(f"draft {draft_id} is already signed by {d.signed_by}; a signed report is read-only")
        if d.state == DraftState.REJECTED:
            return NotReviewableError(f"draft {draft_id} was rejected: {d.reject_reason}")
        if d.state == DraftState.SUPERSEDED:
            return NotReviewableError(
                f"draft {draft_id} is superseded: the study gained images and a newer draft replaces it"
            )
        holder = d.claimed_by or ""
        if holder and holder != user:
            return ClaimConflictError(f"draft {draft_id} is in review by {holder}", holder=holder)
        return ReviewError(f"draft {draft_id} is not claimed by {user}; open it again")

    def claim(self, draft_id: int, user: str) -> DraftDetail:
        """Take the exclusive review lock (or renew it); :class:`ClaimConflictError` if held.

        One conditional UPDATE: it matches only an open draft that is unclaimed, claimed by
        ``user`` already, or whose claim is older than ``claim_timeout_s``.
        """
        self.reviewer(user)
        now = self.clock()
        with self.sessions() as s, s.begin():
            renewed = s.execute(
                update(Draft)
                .where(Draft.id == draft_id, Draft.state == DraftState.IN_REVIEW, Draft.claimed_by == user)
                .values(claimed_at=now)
                .execution_options(synchronize_session=False)
            )
            if _rowcount(renewed) == 1:
                return self._detail(s, draft_id)
            previous = s.scalars(select(Draft.claimed_by).where(Draft.id == draft_id)).first()
            res = s.execute(
                update(Draft)
                .where(
                    Draft.id == draft_id,
                    self._claimable_by(user, now),
                )
                .values(state=DraftState.IN_REVIEW, claimed_by=user, claimed_at=now)
                .execution_options(synchronize_session=False)
            )
            if _rowcount(res) != 1:
                raise self._explain_refusal(s, draft_id, user, now)
            d = s.get(Draft, draft_id)
            assert d is not None
            detail = f"took over the expired claim of {previous}" if previous and previous != user else ""
            index.audit(s, user, "claimed", d.study.study_instance_uid, d.sop_instance_uid, detail)
            log.info("draft %s (SR %s) claimed", draft_id, d.sop_instance_uid)
            return self._detail(s, draft_id)

    def release(self, draft_id: int, user: str) -> bool:
        """Give the claim back (Skip / close); True if ``user`` held it."""
        now = self.clock()
        with self.sessions() as s, s.begin():
            res = s.execute(
                update(Draft)
                .where(Draft.id == draft_id, Draft.state == DraftState.IN_REVIEW, Draft.claimed_by == user)
                .values(state=DraftState.NEW, claimed_by=None, claimed_at=None)
                .execution_options(synchronize_session=False)
            )
            if _rowcount(res) != 1:
                return False
            d = s.get(Draft, draft_id)
            assert d is not None
            index.audit(s, user, "released", d.study.study_instance_uid, d.sop_instance_uid, "")
        log.info("draft %s released at %s", draft_id, now.isoformat())
        return True

    # -- sign-off ---------------------------------------------------------------------------

    def sign(self, draft_id: int, user: str, findings: str, impression: str) -> Draft:
        """Write the verified SR, store and index it, mark the draft signed, audit, enqueue.

        The verifying observer is ``user``'s configured reviewer (display name, organisation).
        ``user`` must hold (or be able to take) the claim. Raises :class:`UnknownReviewerError`,
        :class:`ClaimConflictError` or :class:`NotReviewableError`; on any error nothing is
        committed and no file is left behind.
        """
        reviewer = self.reviewer(user)
        findings = findings.strip()
        impression = impression.strip()
        if not findings and not impression:
            raise ReviewError("the report is empty: write the findings or the impression before signing")
        self.claim(draft_id, user)  # take or renew the lock; raises if someone else holds it

        with self.sessions() as s:
            d = s.get(Draft, draft_id)
            assert d is not None
            draft_path = self.store.abspath(d.path)
            study_uid = d.study.study_instance_uid
            draft_uid = d.sop_instance_uid
            ai_findings, ai_impression = d.findings, d.impression

        try:
            draft_ds = pydicom.dcmread(draft_path)
        except (OSError, pydicom.errors.InvalidDicomError) as exc:
            raise ReviewError(f"cannot read the draft SR {draft_uid} from the store: {exc}") from exc
        signed_at_local = dt.datetime.now(dt.UTC).astimezone()
        try:
            signed_ds = sr.build_signed_sr(
                draft_ds,
                findings,
                impression,
                reviewer.display_name,
                reviewer.organisation,
                signed_at_local,
            )
        except sr.SRError as exc:
            raise ReviewError(f"cannot write the verified report: {exc}") from exc
        relpath = self.store.instance_relpath(
            signed_ds.StudyInstanceUID, signed_ds.SeriesInstanceUID, signed_ds.SOPInstanceUID
        )
        existed = self.store.abspath(relpath).exists()
        size, sha256 = self.store.write_dataset(signed_ds, relpath)
        now = self.clock()
        try:
            with self.sessions() as s, s.begin():
                res = s.execute(
                    update(Draft)
                    .where(
                        and_(
                            Draft.id == draft_id,
                            Draft.state == DraftState.IN_REVIEW,
                            Draft.claimed_by == user,
                        )
                    )
                    .values(
                        state=DraftState.SIGNED,
                        signed_by=user,
                        signed_at=now,
                        signed_sop_instance_uid=signed_ds.SOPInstanceUID,
                        signed_path=relpath,
                        signed_findings=findings,
                        signed_impression=impression,
                    )
                    .execution_options(synchronize_session=False)
                )
                if _rowcount(res) != 1:
                    raise self._explain_refusal(s, draft_id, user, now)
                index.register_instance(
                    s, signed_ds, relpath, size, sha256, self.config.node.ae_title, generated=True
                )
                s.execute(
                    update(Study)
                    .where(Study.study_instance_uid == study_uid)
                    .values(state=StudyState.SIGNED)
                    .execution_options(synchronize_session=False)
                )
                changes = _edit_summary(ai_findings, ai_impression, findings, impression)
                if changes:
                    index.audit(s, user, "edited", study_uid, draft_uid, changes)
                index.audit(
                    s,
                    user,
                    "signed",
                    study_uid,
                    signed_ds.SOPInstanceUID,
                    json.dumps(
                        {
                            "draft": draft_uid,
                            "verifier": reviewer.display_name,
                            "organisation": reviewer.organisation,
                            "edited": bool(changes),
                        }
                    ),
                )
                outbound.enqueue(s, self.config, signed_ds.SOPInstanceUID, relpath, kind="signed")
        except BaseException:
            if not existed:
                self.store.remove(relpath)
            raise
        log.info("draft %s signed: verified SR %s", draft_id, signed_ds.SOPInstanceUID)
        with self.sessions() as s:
            signed = s.get(Draft, draft_id)
            assert signed is not None
            s.expunge(signed)
            return signed

    def reject(self, draft_id: int, user: str, reason: str) -> Draft:
        """Reject the draft with a reason (no SR is sent); the study stays for a manual report."""
        self.reviewer(user)
        reason = reason.strip()
        if not reason:
            raise ReviewError("give a reason for rejecting the draft")
        now = self.clock()
        with self.sessions() as s, s.begin():
            res = s.execute(
                update(Draft)
                .where(
                    Draft.id == draft_id,
                    self._claimable_by(user, now),
                )
                .values(state=DraftState.REJECTED, reject_reason=reason, claimed_by=user, claimed_at=now)
                .execution_options(synchronize_session=False)
            )
            if _rowcount(res) != 1:
                raise self._explain_refusal(s, draft_id, user, now)
            d = s.get(Draft, draft_id)
            assert d is not None
            index.audit(s, user, "rejected", d.study.study_instance_uid, d.sop_instance_uid, reason)
            s.flush()
            s.expunge(d)
        log.info("draft %s rejected", draft_id)
        return d


def sort_rows(rows: Sequence[WorklistRow], key: str = "age", descending: bool = False) -> list[WorklistRow]:
    """Sort worklist rows by one of :data:`SORT_KEYS` (``age`` descending = oldest first)."""
    if key not in SORT_KEYS:
        raise ValueError(f"sort: expected one of {', '.join(SORT_KEYS)}, got {key!r}")
    if key == "age":
        return sorted(rows, key=lambda r: (r.age_s, r.draft_id or 0), reverse=descending)
    if key == "state":
        order = {s: i for i, s in enumerate(WORKLIST_STATES)}
        return sorted(rows, key=lambda r: (order.get(r.state, 99), -r.age_s), reverse=descending)
    return sorted(rows, key=lambda r: (str(getattr(r, key)).lower(), -r.age_s), reverse=descending)


def _edit_summary(ai_findings: str, ai_impression: str, findings: str, impression: str) -> str:
    """Audit detail of what the radiologist changed ('' when unchanged).

    Counts only (sections changed, words removed and added), no report text: the audit table
    carries no clinical narrative (the texts are in the draft row and the two SRs).
    """
    out: dict[str, dict[str, int]] = {}
    for name, before, after in (("findings", ai_findings, findings), ("impression", ai_impression, impression)):
        a, b = before.split(), after.split()
        if a == b:
            continue
        removed = added = 0
        for op, a0, a1, b0, b1 in difflib.SequenceMatcher(a=a, b=b, autojunk=False).get_opcodes():
            if op != "equal":
                removed += a1 - a0
                added += b1 - b0
        out[name] = {"words_before": len(a), "words_after": len(b), "removed": removed, "added": added}
    return json.dumps({"changed": out}) if out else ""


def _rowcount(result: Any) -> int:
    return int(getattr(result, "rowcount", 0) or 0)


__all__ = [
    "ClaimConflictError",
    "DraftDetail",
    "NotReviewableError",
    "ReviewError",
    "ReviewService",
    "UnknownReviewerError",
    "ViewRef",
    "WorklistRow",
    "current_user",
    "parse_grounded",
    "parse_token_info",
    "sort_rows",
    "text_diff",
]
