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
the authenticated OS account mapped through the ``[[reviewers]]`` table of the *installed*
configuration to a display name and organisation. There is no free-text name at signing time: an
account that is not configured cannot claim, sign or reject. Neither half can be spoofed by the
person at the keyboard (docs/SECURITY.md):

* :func:`current_user` is the *effective* OS account (``pwd.getpwuid(os.geteuid())``), never
  ``$USER``/``$LOGNAME``, which anyone can set;
* reviewers are read only from an *installed configuration* (:func:`installed_reviewers`): the
  config file is a regular file owned by root that neither its group nor others may write,
  reached through folders only root can change (root-owned, not group/other-writable unless
  sticky like ``/tmp``). That is what the installer writes (``/etc/cxrnode/cxrnode.toml``,
  0640 root:cxrnode). A file any other account could have written (``CXRNODE_CONFIG`` or
  ``--config`` pointing at a private TOML) still opens the worklist, but names no signer:
  :class:`UntrustedConfigError`. The ``[[reviewers]]`` are parsed from the very bytes whose
  file was checked (no window between the check and the read).

A draft is signed only if it still describes its study: :meth:`ReviewService.sign` commits
only while the study has no instance newer than its latest finished drafting job
(``Study.generation`` against ``Job.study_generation``, checked in the same transaction as the
state change, with the study row locked on PostgreSQL). A superseded draft raises
:class:`SupersededError` (naming the draft that replaces it); a study that gained images whose new
draft is not made yet raises :class:`StudyChangedError`. Renewing the claim refuses the same
way, so the reviewer holding such a draft is told at the next heartbeat, not only at Sign.

Nothing unsigned is presented as final: :attr:`DraftDetail.is_final` is true only for a signed
draft, and every worklist row carries its state.
"""

from __future__ import annotations

import datetime as dt
import difflib
import json
import logging
import os
import pwd
import re
import stat
import tomllib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pydicom
import pydicom.errors
from sqlalchemy import and_, case, delete, func, or_, select, update
from sqlalchemy.orm import Session, aliased, sessionmaker

from dicom_node import index
from dicom_node.commit import Enqueue, commit_dataset
from dicom_node.config import Config, Reviewer
from dicom_node.db import (
    Draft,
    DraftState,
    Instance,
    Job,
    JobState,
    Series,
    Study,
    StudyState,
    Transfer,
    TransferState,
    db_utcnow,
    utcnow,
)
from dicom_node.priority import rank as priority_rank
from dicom_node.store import Store
from plugin.drafting import sr
from plugin.review.critical import markers_of
from plugin.review.draft_info import (
    InputCheck,
    ObservationCall,
    ViewCheck,
    bundle_thresholds,
    observation_calls,
)
from plugin.review.priors import PriorDetail, prior_for_draft
from plugin.review.results import CriticalNotice, RejectResult, SignResult
from plugin.token_info import TokenInfo

log = logging.getLogger(__name__)

DEFAULT_CLAIM_TIMEOUT_S = 15 * 60.0

# Worklist states as the radiologist sees them (a superset of DraftState).
STATE_NEW = "new"
STATE_IN_REVIEW = "in_review"
STATE_SIGNED = "signed"
STATE_REJECTED = "rejected"
STATE_FAILED = "failed"  # drafting failed for good: there is no draft to review
STATE_SUPERSEDED = DraftState.SUPERSEDED  # a draft replaced by a newer one (never listed)
STATE_SKIPPED = "skipped"  # the pipeline had nothing to read (e.g. no chest radiograph): why is in detail
WORKLIST_STATES = (STATE_NEW, STATE_IN_REVIEW, STATE_SIGNED, STATE_REJECTED, STATE_FAILED, STATE_SKIPPED)
OPEN_STATES = (STATE_NEW, STATE_IN_REVIEW)

SORT_KEYS = ("age", "patient_name", "patient_id", "study_date", "accession_number", "state", "priority")


class ReviewError(Exception):
    """A review action could not be done; the message says why, in the reviewer's words."""


class UnknownReviewerError(ReviewError):
    """The account is not in the config's ``[[reviewers]]``: it cannot claim, sign or reject."""


class UntrustedConfigError(UnknownReviewerError):
    """The config file is not an installed (root-owned, root-only-writable) configuration, so its
    ``[[reviewers]]`` name nobody: anyone able to write it could make themselves a signer."""


class ClaimConflictError(ReviewError):
    """Another reviewer holds the draft."""

    def __init__(self, message: str, holder: str = "") -> None:
        super().__init__(message)
        self.holder = holder


class NotReviewableError(ReviewError):
    """The draft is signed, rejected or superseded (or does not exist)."""


class SupersededError(NotReviewableError):
    """The study gained images and a newer draft replaces this one; ``newer_draft_id`` is it."""

    def __init__(self, message: str, newer_draft_id: int | None = None) -> None:
        super().__init__(message)
        self.newer_draft_id = newer_draft_id


class UndoExpiredError(ReviewError):
    """The signature can no longer be undone: the undo window passed or the SR is being sent."""


#: a de-identification placeholder ("xxxx") the model learned from its training reports: never
#: report text (the reviewer marks it; signing refuses it)
DEID_PLACEHOLDER = re.compile(r"(?<![^\W_])[xX]{3,}(?![^\W_])")


class PlaceholderError(ReviewError):
    """The text to sign still holds de-identification placeholders ("xxxx")."""


def placeholders(text: str) -> int:
    """How many de-identification placeholders ``text`` holds."""
    return len(DEID_PLACEHOLDER.findall(text))


class StudyChangedError(ReviewError):
    """The study gained images after this draft was made and no newer draft exists yet: the draft
    does not describe the whole study, so it cannot be signed (a new draft is on its way)."""


def current_user() -> str:
    """The effective OS account of this process (``pwd.getpwuid(os.geteuid())``). Not
    ``getpass.getuser()``: that believes ``$LOGNAME``/``$USER``, which anyone can set.

    Returns
    -------
    str
        The account name.

    Raises
    ------
    ReviewError
        The effective user id has no account name (no passwd entry).
    """
    uid = os.geteuid()
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        raise ReviewError(f"the effective user id {uid} has no account name (no passwd entry); "
                          "it cannot review or sign") from None


#: what the refusal says an installed configuration is
INSTALLED_CONFIG_RULE = (
    "reviewers are read only from the installed configuration: a regular file owned by root that "
    "neither its group nor others may write, in folders only root can change (the installer writes "
    "/etc/cxrnode/cxrnode.toml, mode 0640 root:cxrnode)"
)


def _untrusted_reason(st: os.stat_result, what: str) -> str:
    if st.st_uid != 0:
        try:
            owner = f"{pwd.getpwuid(st.st_uid).pw_name} (uid {st.st_uid})"
        except KeyError:
            owner = f"uid {st.st_uid}"
        return f"{what} is owned by {owner}, not root"
    if st.st_mode & stat.S_IWOTH and not (stat.S_ISDIR(st.st_mode) and st.st_mode & stat.S_ISVTX):
        return f"{what} is writable by others (mode {stat.S_IMODE(st.st_mode):04o})"
    if st.st_mode & stat.S_IWGRP and not (stat.S_ISDIR(st.st_mode) and st.st_mode & stat.S_ISVTX):
        return f"{what} is writable by its group (mode {stat.S_IMODE(st.st_mode):04o})"
    return ""


def read_installed_config(path: str | os.PathLike[str]) -> bytes:
    """The bytes of ``path`` if it is an installed configuration.

    Installed = a regular file owned by uid 0, not writable by group or others, whose real path
    runs through folders owned by uid 0 and not writable by group or others (a sticky folder such
    as ``/tmp`` is allowed: others cannot rename or remove root's entries in it). The file is
    opened once; its ownership is checked on that descriptor and the bytes are read from it.

    Parameters
    ----------
    path:
        The configuration file.

    Returns
    -------
    bytes
        Its content.

    Raises
    ------
    UntrustedConfigError
        The file or a folder on its path is not root's, or is writable by others.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOCTTY | os.O_NONBLOCK)
    except OSError as exc:
        raise UntrustedConfigError(f"cannot read the configuration {path}: {exc.strerror or exc}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise UntrustedConfigError(f"the configuration {path} is not a regular file; {INSTALLED_CONFIG_RULE}")
        why = _untrusted_reason(st, f"the configuration file {path}")
        real = Path(os.path.realpath(path))
        if not why:
            try:
                rst = os.stat(real)
            except OSError:
                rst = None
            if rst is None or (rst.st_dev, rst.st_ino) != (st.st_dev, st.st_ino):
                why = f"the configuration {path} changed while it was being checked"
        if not why:
            for folder in real.parents:
                why = _untrusted_reason(os.stat(folder), f"its folder {folder}")
                if why:
                    break
        if why:
            raise UntrustedConfigError(f"{why}: nobody can sign with it. {INSTALLED_CONFIG_RULE}.")
        chunks = []
        while chunk := os.read(fd, 1 << 16):
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def installed_reviewers(config: Config) -> tuple[Reviewer, ...]:
    """The ``[[reviewers]]`` of ``config``'s file, if it is an installed configuration.

    ``()`` when the config came from no file (defaults only: nobody is a reviewer);
    :class:`UntrustedConfigError` when the file is not installed (see :func:`read_installed_config`).
    The reviewers are parsed from the checked bytes, not taken from ``config``.
    """
    if not config.source:
        return ()
    raw = read_installed_config(config.source)
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise UntrustedConfigError(f"the configuration {config.source} changed and is no longer valid TOML: {exc}") from None
    items = data.get("reviewers", [])
    fields = ("username", "display_name", "organisation")
    out: list[Reviewer] = []
    for i, item in enumerate(items if isinstance(items, list) else [None]):
        if (not isinstance(item, dict) or set(item) - set(fields) - {"roles"}
                or not all(isinstance(item.get(k, ""), str) for k in fields)
                or not item.get("username") or not item.get("display_name")
                or not isinstance(item.get("roles", []), list)
                or not all(isinstance(r, str) for r in item.get("roles", []))):
            raise UntrustedConfigError(f"{config.source}: reviewers[{i}]: expected username, display_name "
                                       "and organisation (strings), optionally roles (a list of strings)")
        out.append(Reviewer(**{k: item[k] for k in fields if k in item}, roles=tuple(item.get("roles", []))))
    return tuple(out)


@dataclass(frozen=True)
class WorklistRow:
    """One line of the worklist: a draft (or a study whose drafting failed or was skipped).

    Attributes
    ----------
    draft_id:
        The draft (``None``: a study without one).
    study_instance_uid, patient_name, patient_id, study_date, accession_number, views:
        The study as listed.
    created_at, age_s:
        When the draft (or failure) was made, and how long ago.
    state:
        One of :data:`WORKLIST_STATES`.
    claimed_by:
        The holder of a live claim (state ``in_review``).
    model_name, model_version:
        The drafting model.
    detail:
        For ``failed``: the job's last error; for ``rejected``: the reason.
    input_outcome, input_reason, views_not_used:
        The input gate's outcome (``""``: not checked), its plain reason and the views it left out.
    no_ai_draft_reason:
        A report written from scratch: why there is no AI draft (``""``: an AI draft).
    priority:
        ``STAT``, ``ED``, ``inpatient``, ``outpatient`` or ``""`` (:mod:`dicom_node.priority`).
    critical:
        Why the draft is critical, one line per rule crossed (:mod:`plugin.review.critical`).
    """

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
    #: the input gate's outcome (passed, partial, withheld, warned, off; "" = not checked: a
    #: draft made before the gate) and its plain reason; the views it did not use
    input_outcome: str = ""
    input_reason: str = ""
    views_not_used: tuple[str, ...] = ()
    #: a report written from scratch: why there is no AI draft ("" = an AI draft)
    no_ai_draft_reason: str = ""
    #: STAT, ED, inpatient, outpatient or "" (not stated): ``Study.priority`` (dicom_node.priority)
    priority: str = ""
    #: why the draft is critical, one line per rule crossed (plugin.review.critical); () = not critical
    critical: tuple[str, ...] = ()

    @property
    def state_label(self) -> str:
        if self.state == STATE_IN_REVIEW:
            return f"in review by {self.claimed_by}"
        return self.state


@dataclass(frozen=True)
class ViewRef:
    """One image the draft was made from.

    Attributes
    ----------
    sop_instance_uid:
        The image.
    view:
        ``PA``, ``AP``, ``LATERAL``, ``LL`` or ``UNKNOWN``.
    source:
        Where the view label came from (tag, model, ...).
    path:
        Absolute path in the store; ``None`` if the instance is not indexed.
    check:
        The input gate's verdict on this view (``None``: not checked).
    """

    sop_instance_uid: str
    view: str  # PA, AP, LATERAL, LL, UNKNOWN
    source: str  # where the view label came from (tag, model, ...)
    path: Path | None  # absolute path in the store; None if the instance is not indexed
    #: the input gate's verdict on this view (None: not checked)
    check: ViewCheck | None = None


@dataclass(frozen=True)
class DraftDetail:
    """Everything the reviewer shows for one draft.

    Attributes
    ----------
    draft_id, study_instance_uid, sop_instance_uid, path:
        The draft, its study, its SR and the SR's file.
    patient_name, patient_id, patient_birth_date, patient_sex:
        The patient, as in the images.
    study_date, study_description, accession_number, indication:
        The study and its clinical indication.
    findings, impression, tokens:
        The draft's text and its word pieces with probabilities.
    views:
        The images the draft was made from (:class:`ViewRef`).
    model_name, model_version, created_at:
        Who drafted it, and when.
    state, claimed_by, claimed_at:
        The review state and the live claim.
    signed_by, signed_at, signed_sop_instance_uid, signed_findings, signed_impression:
        The signature, once signed.
    reject_reason:
        Why it was rejected.
    grounded:
        Sentences the grounding step added, with the probability behind each.
    observations:
        Observation probabilities with their thresholds, most probable first.
    input_check:
        The input gate's outcome (``None``: a draft made before the gate).
    no_ai_draft_reason:
        Why there is no AI draft when reporting from scratch (``""``: an AI draft).
    """

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
    #: the observation probabilities (``token_info["observations"]``) with their decision
    #: thresholds, most probable first
    observations: tuple[ObservationCall, ...] = ()
    #: the input gate's outcome; None for a draft made before the gate (not checked)
    input_check: InputCheck | None = None
    #: why there is no AI draft when the radiologist reports from scratch ("" = an AI draft)
    no_ai_draft_reason: str = ""

    @property
    def withheld(self) -> bool:
        """The gate withheld the AI draft: no generated text, the radiologist reports from scratch."""
        return self.input_check is not None and self.input_check.withheld

    @property
    def is_final(self) -> bool:
        """Only a signed report is final; everything else is an unverified AI draft."""
        return self.state == DraftState.SIGNED

    @property
    def is_open(self) -> bool:
        return self.state in (DraftState.NEW, DraftState.IN_REVIEW)


def parse_token_info(raw: str | None) -> tuple[tuple[str, float], ...]:
    """Words and their probabilities from ``Draft.token_info`` (``TokenInfo.parse(raw).tokens``:
    word-piece markers ``Ġ``, ``▁``, ``##`` removed; anything unreadable gives an empty tuple)."""
    return TokenInfo.parse(raw).tokens


def parse_grounded(raw: str | None) -> tuple[tuple[str, float], ...]:
    """The ``grounded`` sentences of ``Draft.token_info`` (``TokenInfo.parse(raw).grounded``)."""
    return TokenInfo.parse(raw).grounded


def text_diff(before: str, after: str, before_name: str = "AI draft", after_name: str = "edited") -> str:
    """A unified, line-based diff of two report texts.

    Parameters
    ----------
    before, after:
        The two texts.
    before_name, after_name:
        Their labels in the diff's header.

    Returns
    -------
    str
        The diff (empty when equal).
    """
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


def _gate_fields(gate: InputCheck | None) -> dict[str, Any]:
    """The worklist fields of the input gate's outcome (empty for a draft made before the gate)."""
    if gate is None:
        return {}
    return {"input_outcome": gate.outcome, "input_reason": gate.reason,
            "views_not_used": tuple(v.view for v in gate.failed_views)}


def _row_of(st: Study, **fields: Any) -> WorklistRow:
    """A worklist row: what it takes from its study, and ``fields`` for the rest."""
    return WorklistRow(study_instance_uid=st.study_instance_uid, patient_name=st.patient_name,
                       patient_id=st.patient_id, study_date=st.study_date, accession_number=st.accession_number,
                       priority=st.priority or "", **fields)


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
    """Worklist, claim, release, sign and reject, all audited. Every method opens and closes its
    own session, so one service can be shared by threads.

    Parameters
    ----------
    config:
        The node's configuration (reviewers, destinations, undo window).
    sessions:
        A SQLAlchemy ``sessionmaker`` bound to the node's database.
    store:
        The node's store (verified SRs are written there).
    claim_timeout_s:
        How long a claim lasts without a heartbeat.
    clock:
        Returns naive UTC (as :func:`dicom_node.db.utcnow`); tests pass a fake one.
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
        self._reviewers: tuple[Reviewer, ...] | None = None  # checked once, on first use

    # -- identity ---------------------------------------------------------------------------

    def reviewers(self) -> tuple[Reviewer, ...]:
        """The reviewers of the installed configuration (:func:`installed_reviewers`);
        :class:`UntrustedConfigError` if the config file is not an installed one."""
        if self._reviewers is None:
            self._reviewers = installed_reviewers(self.config)
        return self._reviewers

    def reviewer(self, user: str) -> Reviewer:
        """The reviewer for an account, from the installed configuration only.

        Raises :class:`UntrustedConfigError` (the config file could have been written by someone
        other than root) or :class:`UnknownReviewerError` (the account is not listed).
        """
        try:
            found = next((r for r in self.reviewers() if r.username == user), None)
        except UntrustedConfigError as exc:
            raise UntrustedConfigError(f"account {user!r} cannot sign: {exc}") from None
        if found is None:
            where = f" in {self.config.source}" if self.config.source else " in the installed configuration"
            raise UnknownReviewerError(
                f"account {user!r} is not a configured reviewer: add a [[reviewers]] entry with "
                f"username = {user!r}, display_name and organisation{where}"
            )
        return found

    def find_reviewer(self, user: str) -> Reviewer | None:
        """The reviewer for ``user`` (installed configuration only), or None."""
        try:
            return self.reviewer(user)
        except UnknownReviewerError:
            return None

    def is_reviewer(self, user: str) -> bool:
        return self.find_reviewer(user) is not None

    # -- worklist ---------------------------------------------------------------------------

    @staticmethod
    def _study_unchanged() -> Any:
        """SQL condition on a Draft: its study has no instance newer than the latest *finished*
        drafting job (``Job.study_generation`` of a ``done`` job >= ``Study.generation``).

        A draft whose study gained images is either superseded by the next job's draft, or (the
        new images changed nothing the pipeline reads) confirmed by that job finishing at the new
        generation; until then it is not signable."""
        covered = (
            select(func.max(Job.study_generation))
            .where(Job.study_id == Draft.study_id, Job.state == JobState.DONE)
            .scalar_subquery()
        )
        current = select(Study.generation).where(Study.id == Draft.study_id).scalar_subquery()
        return func.coalesce(covered, -1) >= current

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

        Two queries whatever the number of rows: the drafts with their studies, and the studies
        with no draft (failed or skipped) each with its latest job of that outcome.
        """
        if sort not in SORT_KEYS:
            raise ValueError(f"sort: expected one of {', '.join(SORT_KEYS)}, got {sort!r}")
        wanted = set(WORKLIST_STATES if states is None else states)
        unknown = wanted - set(WORKLIST_STATES)
        if unknown:
            raise ValueError(f"states: unknown {sorted(unknown)}, expected some of {WORKLIST_STATES}")
        now = self.clock()
        needle = search.strip().lower()
        with self.sessions() as s:
            rows = self._drafted_rows(s, wanted, needle, now, limit)
            rows += self._undrafted_rows(s, wanted, needle, now, limit)
        return sort_rows(rows, sort, descending)

    def _drafted_rows(self, s: Session, wanted: set[str], needle: str, now: dt.datetime,
                      limit: int) -> list[WorklistRow]:
        """The worklist rows of drafts (one query: drafts joined with their studies)."""
        db_states = {
            STATE_NEW: [DraftState.NEW, DraftState.IN_REVIEW],  # expired claims read as new
            STATE_IN_REVIEW: [DraftState.IN_REVIEW],
            STATE_SIGNED: [DraftState.SIGNED],
            STATE_REJECTED: [DraftState.REJECTED],
        }
        wanted_db = sorted({x for st in wanted for x in db_states.get(st, [])})
        q = (
            select(Draft, Study)
            .join(Study, Draft.study_id == Study.id)
            .where(Draft.state != DraftState.SUPERSEDED, Draft.state.in_(wanted_db))
            .order_by(Draft.created_at)
            .limit(limit)
        )
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
        rows: list[WorklistRow] = []
        for d, st in s.execute(q).all():
            state, holder = self._row_state(d, now)
            if state not in wanted:
                continue
            info = TokenInfo.parse(d.token_info)
            rows.append(
                _row_of(
                    st,
                    draft_id=d.id,
                    views=tuple(v.get("view", "UNKNOWN") for v in _views_of(d.views)),
                    created_at=d.created_at,
                    age_s=max(0.0, (now - d.created_at).total_seconds()),
                    state=state,
                    claimed_by=holder,
                    model_name=d.model_name,
                    model_version=d.model_version,
                    detail=d.reject_reason or "",
                    **_gate_fields(info.input_check),
                    no_ai_draft_reason=info.no_ai_draft_reason,
                    critical=markers_of(info.observations, d.findings or "", d.impression or ""),
                )
            )
        return rows

    def _undrafted_rows(self, s: Session, wanted: set[str], needle: str, now: dt.datetime,
                        limit: int) -> list[WorklistRow]:
        """Studies with no draft: drafting failed, or the pipeline skipped them (the job says why).

        One query: each study with its latest job of the same outcome (``failed`` or ``skipped``),
        found by a correlated ``max(Job.id)`` in the outer join's condition."""
        undrafted = [db for x, db in ((STATE_FAILED, StudyState.FAILED), (STATE_SKIPPED, StudyState.SKIPPED))
                     if x in wanted]
        if not undrafted:
            return []
        other = aliased(Job)
        latest_job = (
            select(func.max(other.id))
            .where(other.study_id == Study.id,
                   other.state == case((Study.state == StudyState.FAILED, JobState.FAILED), else_=JobState.SKIPPED))
            .correlate(Study)
            .scalar_subquery()
        )
        q = (
            select(Study, Job)
            .outerjoin(Job, Job.id == latest_job)
            .where(Study.state.in_(undrafted))
            .order_by(Study.id)
            .limit(limit)
        )
        rows: list[WorklistRow] = []
        for st, job in s.execute(q).all():
            hay = " ".join([st.patient_name, st.patient_id, st.accession_number, st.study_instance_uid]).lower()
            if needle and needle not in hay:
                continue
            since = (job.updated_at if job else None) or st.last_received_at
            rows.append(
                _row_of(
                    st,
                    draft_id=None,
                    views=(),
                    created_at=since,
                    age_s=max(0.0, (now - since).total_seconds()),
                    state=STATE_FAILED if st.state == StudyState.FAILED else STATE_SKIPPED,
                    model_name=job.model_name if job else "",
                    model_version=job.model_version if job else "",
                    detail=(job.last_error or "") if job else "",
                )
            )
        return rows

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

    def prior(self, draft_id: int) -> PriorDetail:
        """The prior study the draft is compared with (read-only; its images and report text),
        or why there is none (:mod:`plugin.review.priors`)."""
        return prior_for_draft(self.sessions, self.store, draft_id)

    def _detail(self, s: Session, draft_id: int) -> DraftDetail:
        d = s.get(Draft, draft_id)
        if d is None:
            raise NotReviewableError(f"draft {draft_id} does not exist")
        st = d.study
        refs = _views_of(d.views)
        info = TokenInfo.parse(d.token_info)
        gate = info.input_check
        if gate is not None:  # views the gate did not let through are shown too, with its verdict
            known = {r.get("sop_instance_uid") for r in refs}
            refs += [{"sop_instance_uid": v.sop_instance_uid, "view": v.view, "source": "input check"}
                     for v in gate.views if v.sop_instance_uid and v.sop_instance_uid not in known]
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
                check=gate.for_view(r.get("sop_instance_uid", "")) if gate is not None else None,
            )
            for r in refs
        )
        thresholds = info.thresholds or bundle_thresholds(
            self.config.model.bundle, d.model_name or "", d.model_version or "")
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
            tokens=info.tokens,
            grounded=info.grounded,
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
            observations=observation_calls(info.observations, thresholds),
            input_check=gate,
            no_ai_draft_reason=info.no_ai_draft_reason,
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
            newer = s.scalars(
                select(Draft.id)
                .where(Draft.study_id == d.study_id, Draft.id != d.id, Draft.state != DraftState.SUPERSEDED)
                .order_by(Draft.id.desc())
                .limit(1)
            ).first()
            which = f"draft {newer}" if newer is not None else "a newer draft"
            return SupersededError(
                f"draft {draft_id} is superseded: the study gained images and {which} replaces it; "
                f"nothing was signed; review {which} instead",
                newer_draft_id=newer,
            )
        holder = d.claimed_by or ""
        if holder and holder != user:
            return ClaimConflictError(f"draft {draft_id} is in review by {holder}", holder=holder)
        if not s.scalar(select(self._study_unchanged()).where(Draft.id == draft_id)):
            failed = s.scalars(
                select(Job.last_error)
                .where(Job.study_id == d.study_id, Job.state == JobState.FAILED)
                .order_by(Job.id.desc())
                .limit(1)
            ).first()
            pending = s.scalar(
                select(func.count(Job.id)).where(Job.study_id == d.study_id,
                                                 Job.state.in_((JobState.PENDING, JobState.RUNNING)))
            )
            if failed is not None and not pending:
                return StudyChangedError(
                    f"draft {draft_id} cannot be signed: the study gained images after it was drafted and "
                    f"drafting the new images failed ({failed}); reject this draft and report the study manually"
                )
            return StudyChangedError(
                f"draft {draft_id} cannot be signed: the study gained images after it was drafted; "
                "a new draft is being made and will replace it in the worklist; nothing was signed"
            )
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
                .where(Draft.id == draft_id, Draft.state == DraftState.IN_REVIEW, Draft.claimed_by == user,
                       self._study_unchanged())
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
                    self._study_unchanged(),
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

    def sign(self, draft_id: int, user: str, findings: str, impression: str,
             critical: CriticalNotice | None = None) -> SignResult:
        """Write the verified SR, store and index it, mark the draft signed, audit, enqueue.

        ``critical``: a critical result the radiologist told a clinician (who, role, how, when):
        recorded (``critical_results``), audited ``critical_result`` and written into the verified
        SR as its "Communication of Critical Results" section, in the same transaction.

        The verifying observer is ``user``'s reviewer in the installed configuration (display
        name, organisation). ``user`` must hold (or be able to take) the claim, and the study must
        not have gained images since the draft was made (checked again in the committing
        transaction). Raises :class:`UnknownReviewerError` (or :class:`UntrustedConfigError`),
        :class:`ClaimConflictError`, :class:`SupersededError` / :class:`NotReviewableError` or
        :class:`StudyChangedError` or :class:`PlaceholderError` (``xxxx`` left in the text); on any error nothing is committed and no file is left behind.
        """
        reviewer = self.reviewer(user)
        findings, impression = _text_to_sign(findings, impression)
        communication = _communication(critical, reviewer.display_name)
        self.claim(draft_id, user)  # take or renew the lock; raises if someone else holds it
        draft = self._draft_to_sign(draft_id)
        signed_ds = _signed_sr(draft, findings, impression, reviewer, communication)
        sig = _Signature(
            draft=draft, user=user, reviewer=reviewer, findings=findings, impression=impression,
            sop_instance_uid=str(signed_ds.SOPInstanceUID), communication=communication, at=self.clock(),
            relpath=self.store.instance_relpath(signed_ds.StudyInstanceUID, signed_ds.SeriesInstanceUID,
                                                signed_ds.SOPInstanceUID),
        )
        # one commit (dicom_node.commit): the file, then the signature, the index row, the audit and
        # the transfers in one transaction; the file is removed if it fails. The transfers are due only
        # when the undo window (review.undo_window_s) has passed, or when the reviewer sends at once
        # (send_signed_now); undo_sign withdraws them
        commit_dataset(self.store, self.sessions, signed_ds, sig.relpath, lambda s, _stored: _signed_rows(s, sig),
                       registered_by=self.config.node.ae_title, prepare=lambda s: self._take_draft(s, sig),
                       enqueue=Enqueue(self.config, "signed", dt.timedelta(seconds=self.config.review.undo_window_s)))
        log.info("draft %s signed: verified SR %s", draft_id, sig.sop_instance_uid)
        return SignResult(
            draft_id=draft_id, study_instance_uid=draft.study_uid, state=DraftState.SIGNED, signed_by=user,
            signed_at=sig.at, signed_sop_instance_uid=sig.sop_instance_uid, signed_path=sig.relpath,
            signed_findings=findings, signed_impression=impression, verifier_name=reviewer.display_name,
            critical=None if communication is None else CriticalNotice(
                communication.recipient, communication.role, communication.method,
                _naive_utc(communication.communicated_at), user),
        )

    def _draft_to_sign(self, draft_id: int) -> _DraftToSign:
        """The draft's SR (read from the store) and what the signature records about it."""
        with self.sessions() as s:
            d = s.get(Draft, draft_id)
            assert d is not None
            draft_path = self.store.abspath(d.path)
            facts = (d.study.study_instance_uid, d.sop_instance_uid, d.findings, d.impression)
        try:
            draft_ds = pydicom.dcmread(draft_path)
        except (OSError, pydicom.errors.InvalidDicomError) as exc:
            raise ReviewError(f"cannot read the draft SR {facts[1]} from the store: {exc}") from exc
        return _DraftToSign(draft_id, draft_ds, *facts)

    def _take_draft(self, s: Session, sig: _Signature) -> None:
        """The signature's state change: one conditional UPDATE (still in review, claimed by the
        signer, the study unchanged), first in the committing transaction; refused with the reason."""
        # lock the study row first (PostgreSQL; SQLite has one writer anyway): an instance
        # registered now waits for this transaction, so the generation checked below is the
        # one committed with the signature
        s.execute(select(Study.id).where(Study.study_instance_uid == sig.draft.study_uid).with_for_update()).first()
        res = s.execute(
            update(Draft)
            .where(
                and_(
                    Draft.id == sig.draft.draft_id,
                    Draft.state == DraftState.IN_REVIEW,
                    Draft.claimed_by == sig.user,
                    self._study_unchanged(),
                )
            )
            .values(
                state=DraftState.SIGNED,
                signed_by=sig.user,
                signed_at=sig.at,
                signed_sop_instance_uid=sig.sop_instance_uid,
                signed_path=sig.relpath,
                signed_findings=sig.findings,
                signed_impression=sig.impression,
            )
            .execution_options(synchronize_session=False)
        )
        if _rowcount(res) != 1:
            raise self._explain_refusal(s, sig.draft.draft_id, sig.user, sig.at)

    def send_signed_now(self, draft_id: int, user: str) -> int:
        """End the undo window of ``user``'s signature: its verified SR's transfers become due now.
        Returns how many transfers were released (0 if none was still held)."""
        with self.sessions() as s, s.begin():
            d = s.get(Draft, draft_id)
            if d is None or d.state != DraftState.SIGNED or d.signed_by != user or not d.signed_sop_instance_uid:
                raise ReviewError("only your own signed report can be sent")
            now = db_utcnow(s)  # the sender compares next_attempt_at with the database's clock
            res = s.execute(
                update(Transfer)
                .where(Transfer.sop_instance_uid == d.signed_sop_instance_uid,
                       Transfer.state == TransferState.PENDING, Transfer.attempts == 0, Transfer.next_attempt_at > now)
                .values(next_attempt_at=now)
                .execution_options(synchronize_session=False)
            )
            n = _rowcount(res)
            if n:
                index.audit(s, user, "sign_confirmed", d.study.study_instance_uid, d.signed_sop_instance_uid,
                            json.dumps({"transfers": n}))
        return n

    def undo_sign(self, draft_id: int, user: str) -> tuple[str, str]:
        """Undo ``user``'s own signature within ``review.undo_window_s``: the verified SR's held
        transfers are withdrawn, the SR leaves the index and the store, the draft is back in review
        claimed by ``user``, audited ``sign_undone``. Returns the signed (findings, impression) so
        the reviewer gets the text back. Raises :class:`UndoExpiredError` once the window passed
        or any transfer of the SR has started (nothing is changed then)."""
        self.reviewer(user)
        window = dt.timedelta(seconds=self.config.review.undo_window_s)
        now = self.clock()
        with self.sessions() as s, s.begin():
            d = s.get(Draft, draft_id)
            if d is None or d.state != DraftState.SIGNED or d.signed_by != user or not d.signed_sop_instance_uid:
                raise ReviewError("only your own signature can be undone")
            if d.signed_at is None or not window or now > d.signed_at + window:
                raise UndoExpiredError("the undo window has passed: the verified report is queued to be sent")
            sop, relpath = d.signed_sop_instance_uid, d.signed_path or ""
            text = (d.signed_findings or "", d.signed_impression or "")
            study_uid = d.study.study_instance_uid
            held = s.scalar(select(func.count()).select_from(Transfer).where(Transfer.sop_instance_uid == sop)) or 0
            res = s.execute(
                delete(Transfer)
                .where(Transfer.sop_instance_uid == sop, Transfer.state == TransferState.PENDING,
                       Transfer.attempts == 0, Transfer.next_attempt_at > db_utcnow(s))
                .execution_options(synchronize_session=False)
            )
            if _rowcount(res) != held:  # one is being (or was) sent: nothing is undone
                raise UndoExpiredError("the verified report is already being sent: it cannot be undone")
            res = s.execute(
                update(Draft)
                .where(Draft.id == draft_id, Draft.state == DraftState.SIGNED, Draft.signed_by == user)
                .values(state=DraftState.IN_REVIEW, claimed_by=user, claimed_at=now, signed_by=None, signed_at=None,
                        signed_sop_instance_uid=None, signed_path=None, signed_findings=None, signed_impression=None)
                .execution_options(synchronize_session=False)
            )
            if _rowcount(res) != 1:
                raise ReviewError("only your own signature can be undone")
            from dicom_node.review_records import CriticalResult

            s.execute(delete(CriticalResult).where(CriticalResult.sop_instance_uid == sop)
                      .execution_options(synchronize_session=False))  # it was recorded in the withdrawn SR
            inst = s.scalars(select(Instance).where(Instance.sop_instance_uid == sop)).one_or_none()
            if inst is not None:
                series_id = inst.series_id
                s.delete(inst)
                s.flush()
                if not s.scalar(select(func.count()).select_from(Instance).where(Instance.series_id == series_id)):
                    s.execute(delete(Series).where(Series.id == series_id))
            s.execute(
                update(Study).where(Study.study_instance_uid == study_uid).values(state=StudyState.DRAFTED)
                .execution_options(synchronize_session=False)
            )
            index.audit(s, user, "sign_undone", study_uid, sop, json.dumps({"draft": d.sop_instance_uid}))
        if relpath:
            self.store.remove(relpath)
        log.info("draft %s: signature undone, verified SR %s withdrawn before sending", draft_id, sop)
        return text

    def reject(self, draft_id: int, user: str, reason: str) -> RejectResult:
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
            result = RejectResult(draft_id, d.study.study_instance_uid, DraftState.REJECTED, reason)
        log.info("draft %s rejected", draft_id)
        return result


def sort_rows(rows: Sequence[WorklistRow], key: str = "age", descending: bool = False) -> list[WorklistRow]:
    """Sort worklist rows by one of :data:`SORT_KEYS` (``age`` descending = oldest first;
    ``priority`` ascending = most urgent first: STAT, ED, inpatient, outpatient, not stated, and
    within each the critical drafts first, then the oldest)."""
    if key not in SORT_KEYS:
        raise ValueError(f"sort: expected one of {', '.join(SORT_KEYS)}, got {key!r}")
    if key == "priority":
        return sorted(rows, key=lambda r: (priority_rank(r.priority), not r.critical, -r.age_s, r.draft_id or 0),
                      reverse=descending)
    if key == "age":
        return sorted(rows, key=lambda r: (r.age_s, r.draft_id or 0), reverse=descending)
    if key == "state":
        order = {s: i for i, s in enumerate(WORKLIST_STATES)}
        return sorted(rows, key=lambda r: (order.get(r.state, 99), -r.age_s), reverse=descending)
    return sorted(rows, key=lambda r: (str(getattr(r, key)).lower(), -r.age_s), reverse=descending)


@dataclass(frozen=True)
class _DraftToSign:
    """The draft being signed: its SR and what the signature records about it."""

    draft_id: int
    dataset: pydicom.Dataset
    study_uid: str
    sop_instance_uid: str
    ai_findings: str
    ai_impression: str


@dataclass(frozen=True)
class _Signature:
    """One signature being committed."""

    draft: _DraftToSign
    user: str
    reviewer: Reviewer
    findings: str
    impression: str
    sop_instance_uid: str  # of the verified SR
    relpath: str  # of the verified SR in the store
    communication: sr.CriticalCommunication | None
    at: dt.datetime  # naive UTC


def _text_to_sign(findings: str, impression: str) -> tuple[str, str]:
    """The report text, stripped; a :class:`ReviewError` when it is empty or holds placeholders."""
    findings = findings.strip()
    impression = impression.strip()
    if not findings and not impression:
        raise ReviewError("the report is empty: write the findings or the impression before signing")
    if n := placeholders(findings + "\n" + impression):
        raise PlaceholderError(f"the report still holds {n} de-identification placeholder(s) (\"xxxx\"): "
                               "replace them with what the images show before signing")
    return findings, impression


def _signed_sr(draft: _DraftToSign, findings: str, impression: str, reviewer: Reviewer,
               communication: sr.CriticalCommunication | None) -> pydicom.Dataset:
    """The verified SR of the draft (plugin.drafting.sr), signed now; a :class:`ReviewError` if it cannot be made."""
    signed_at_local = dt.datetime.now(dt.UTC).astimezone()
    try:
        return sr.build_signed_sr(draft.dataset, findings, impression, reviewer.display_name, reviewer.organisation,
                                  signed_at_local, critical=communication)
    except sr.SRError as exc:
        raise ReviewError(f"cannot write the verified report: {exc}") from exc


def _signed_rows(s: Session, sig: _Signature) -> None:
    """The signature's rows besides the draft's: the study signed, the audit (an ``edited`` event
    when the text changed, then ``signed``) and the critical result told, if any."""
    d = sig.draft
    s.execute(
        update(Study)
        .where(Study.study_instance_uid == d.study_uid)
        .values(state=StudyState.SIGNED)
        .execution_options(synchronize_session=False)
    )
    changes = _edit_summary(d.ai_findings, d.ai_impression, sig.findings, sig.impression)
    if changes:
        index.audit(s, sig.user, "edited", d.study_uid, d.sop_instance_uid, changes)
    index.audit(s, sig.user, "signed", d.study_uid, sig.sop_instance_uid,
                json.dumps({"draft": d.sop_instance_uid, "verifier": sig.reviewer.display_name,
                            "organisation": sig.reviewer.organisation, "edited": bool(changes)}))
    if sig.communication is not None:
        _record_critical(s, d.draft_id, d.study_uid, sig.sop_instance_uid, sig.user, sig.communication, sig.at)


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


def _naive_utc(when: dt.datetime) -> dt.datetime:
    """A time as the database keeps it (naive UTC); a naive input is taken as UTC already."""
    return when.astimezone(dt.UTC).replace(tzinfo=None) if when.tzinfo is not None else when


def _communication(critical: CriticalNotice | None, told_by: str) -> sr.CriticalCommunication | None:
    """The SR's form of a critical-result notice (the time aware, the teller named); a clear
    :class:`ReviewError` when a field is missing or wrong."""
    if critical is None:
        return None
    when = critical.communicated_at
    when = (when if when.tzinfo is not None else when.replace(tzinfo=dt.UTC)).astimezone()
    if when > dt.datetime.now(dt.UTC) + dt.timedelta(minutes=5):
        raise ReviewError("critical result: the time it was told is in the future")
    try:
        return sr.CriticalCommunication(critical.recipient.strip(), critical.role.strip(), critical.method, when,
                                        communicated_by=told_by)
    except sr.SRError as exc:
        raise ReviewError(str(exc)) from None


def _record_critical(s: Session, draft_id: int, study_uid: str, sop_uid: str, user: str,
                     c: sr.CriticalCommunication, now: dt.datetime) -> None:
    """Store and audit the critical-result communication (inside the signing transaction)."""
    from dicom_node.review_records import CriticalResult

    at = _naive_utc(c.communicated_at)
    s.add(CriticalResult(draft_id=draft_id, study_instance_uid=study_uid, sop_instance_uid=sop_uid,
                         recipient_name=c.recipient, recipient_role=c.role, method=c.method,
                         communicated_at=at, recorded_by=user, recorded_at=now))
    index.audit(s, user, "critical_result", study_uid, sop_uid,
                json.dumps({"recipient": c.recipient, "role": c.role, "method": c.method,
                            "communicated_at": at.isoformat(timespec="seconds") + "Z"}))


__all__ = [
    "DEID_PLACEHOLDER",
    "ClaimConflictError",
    "DraftDetail",
    "NotReviewableError",
    "PlaceholderError",
    "ReviewError",
    "ReviewService",
    "CriticalNotice",
    "RejectResult",
    "SignResult",
    "StudyChangedError",
    "SupersededError",
    "UnknownReviewerError",
    "UntrustedConfigError",
    "ViewRef",
    "WorklistRow",
    "current_user",
    "installed_reviewers",
    "read_installed_config",
    "parse_grounded",
    "parse_token_info",
    "placeholders",
    "sort_rows",
    "text_diff",
]
