"""Qt-free view-models of the reviewer: what the worklist and the review pane show and do.

The widgets in :mod:`gui.window` only render these and forward events; every decision
(which rows, in which order, what the banner says, whether Sign is allowed, what is
highlighted, what changed) is made here and tested without Qt. Methods that touch the
database or files are marked *blocking*: the window runs them off the GUI thread.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import pydicom.errors

from dicom_node.db import Draft, DraftState
from gui import imaging
from plugin.review import (
    OPEN_STATES,
    STATE_FAILED,
    STATE_IN_REVIEW,
    STATE_NEW,
    STATE_REJECTED,
    STATE_SIGNED,
    ClaimConflictError,
    DraftDetail,
    ReviewError,
    ReviewService,
    WorklistRow,
    text_diff,
)

AI_DRAFT_LABEL = "AI DRAFT — UNVERIFIED"
DEFAULT_LOW_CONFIDENCE = 0.4

# -- formatting -------------------------------------------------------------------------------


def format_person_name(pn: str) -> str:
    """DICOM PN ``Family^Given^Middle^Prefix^Suffix`` as ``FAMILY, Given Middle``."""
    if not pn:
        return ""
    parts = (pn.split("=")[0].split("^") + [""] * 5)[:5]
    family, given, middle, prefix, suffix = (p.strip() for p in parts)
    rest = " ".join(p for p in (prefix, given, middle, suffix) if p)
    return f"{family.upper()}, {rest}" if rest else family.upper()


def person_display(pn: str) -> str:
    """DICOM PN as it is spoken: ``Moreau^Alice^^Dr`` -> ``Dr Alice Moreau``."""
    parts = (pn.split("=")[0].split("^") + [""] * 5)[:5]
    family, given, middle, prefix, suffix = (p.strip() for p in parts)
    return " ".join(p for p in (prefix, given, middle, family, suffix) if p)


VIEW_LABELS = {"LL": "LATERAL (LL)", "RL": "LATERAL (RL)", "UNKNOWN": "VIEW ?"}


def view_label(view: str) -> str:
    """What the image is labelled with: PA, AP, LATERAL; a left/right lateral says which."""
    v = (view or "UNKNOWN").upper()
    return VIEW_LABELS.get(v, v)


def format_da(da: str) -> str:
    """DICOM DA ``YYYYMMDD`` as ``YYYY-MM-DD`` (anything else unchanged)."""
    return f"{da[:4]}-{da[4:6]}-{da[6:8]}" if len(da) == 8 and da.isdigit() else da


def format_age(seconds: float) -> str:
    """Age of a draft for the worklist: ``45 s``, ``12 min``, ``3 h 05``, ``2 d 4 h``."""
    s = max(0, int(seconds))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min"
    if s < 86400:
        return f"{s // 3600} h {s % 3600 // 60:02d}"
    return f"{s // 86400} d {s % 86400 // 3600} h"


def patient_age(birth_date: str, study_date: str) -> str:
    """Age at the study in years (``63 y``) from two DA values; ``""`` if unknown."""
    try:
        b = dt.datetime.strptime(birth_date, "%Y%m%d").date()
        s = dt.datetime.strptime(study_date, "%Y%m%d").date()
    except ValueError:
        return ""
    years = s.year - b.year - ((s.month, s.day) < (b.month, b.day))
    return f"{years} y" if years >= 0 else ""


# -- worklist ---------------------------------------------------------------------------------

STATE_FILTERS: dict[str, tuple[str, ...] | None] = {
    "To review": OPEN_STATES + (STATE_FAILED,),
    "New": (STATE_NEW,),
    "In review": (STATE_IN_REVIEW,),
    "Signed": (STATE_SIGNED,),
    "Rejected": (STATE_REJECTED,),
    "Failed": (STATE_FAILED,),
    "All": None,
}


@dataclass(frozen=True)
class Column:
    key: str  # sort key understood by ReviewService.worklist, or "" if not sortable
    title: str


COLUMNS = (
    Column("patient_name", "Patient"),
    Column("patient_id", "Patient ID"),
    Column("study_date", "Study date"),
    Column("accession_number", "Accession"),
    Column("", "Views"),
    Column("age", "Draft age"),
    Column("state", "State"),
)


def cell_text(row: WorklistRow, column: int, user: str = "") -> str:
    key = COLUMNS[column].title
    if key == "Patient":
        return format_person_name(row.patient_name)
    if key == "Patient ID":
        return row.patient_id
    if key == "Study date":
        return format_da(row.study_date)
    if key == "Accession":
        return row.accession_number
    if key == "Views":
        return " + ".join(row.views) if row.views else "—"
    if key == "Draft age":
        return format_age(row.age_s)
    if key == "State":
        return "in review by you" if user and row.state == STATE_IN_REVIEW and row.claimed_by == user else row.state_label
    raise IndexError(column)


def row_tooltip(row: WorklistRow) -> str:
    lines = [f"Study {row.study_instance_uid}"]
    if row.model_name:
        lines.append(f"Model {row.model_name} {row.model_version}".rstrip())
    if row.detail:
        lines.append(("Failed: " if row.state == STATE_FAILED else "Reason: ") + row.detail)
    return "\n".join(lines)


@dataclass
class WorklistModel:
    """The worklist's query (filter, search, sort) and its current rows."""

    service: ReviewService
    user: str = ""  # rows this account holds read "in review by you"
    state_filter: str = "To review"
    search: str = ""
    sort_column: int = 5  # draft age
    descending: bool = True  # oldest first
    rows: list[WorklistRow] = field(default_factory=list)

    def fetch(self) -> list[WorklistRow]:
        """*Blocking*: query the database with the current filter, search and sort."""
        key = COLUMNS[self.sort_column].key or "age"
        return self.service.worklist(
            states=STATE_FILTERS[self.state_filter], search=self.search, sort=key, descending=self.descending
        )

    def set_rows(self, rows: Sequence[WorklistRow]) -> None:
        self.rows = list(rows)

    def sort_by(self, column: int, descending: bool) -> bool:
        """Change the sort; False if the column cannot be sorted."""
        if not COLUMNS[column].key:
            return False
        self.sort_column, self.descending = column, descending
        return True

    def index_of(self, draft_id: int | None) -> int:
        return next((i for i, r in enumerate(self.rows) if r.draft_id is not None and r.draft_id == draft_id), -1)

    def next_open_after(self, draft_id: int | None) -> WorklistRow | None:
        """The next row (after ``draft_id``, wrapping) that can be reviewed now."""
        n = len(self.rows)
        start = self.index_of(draft_id)
        for k in range(1, n + 1):
            row = self.rows[(start + k) % n]
            if row.draft_id is not None and row.state == STATE_NEW and row.draft_id != draft_id:
                return row
        return None


# -- one review ---------------------------------------------------------------------------------

_WORD = re.compile(r"\w+(?:[-']\w+)*", re.UNICODE)


@dataclass(frozen=True)
class Span:
    start: int
    end: int
    probability: float


def low_confidence_spans(text: str, tokens: Sequence[tuple[str, float]], threshold: float = DEFAULT_LOW_CONFIDENCE) -> list[Span]:
    """Character spans of ``text`` holding words the model gave a probability below ``threshold``.

    The model's words are aligned with the text in order, looking a few words ahead, so the
    highlighting survives edits: a word the radiologist deleted is skipped, inserted words are
    stepped over. Matching is case-insensitive and on whole words; punctuation is ignored.
    """
    words = [(m.start(), m.end(), m.group(0).lower()) for m in _WORD.finditer(text)]
    spans: list[Span] = []
    wi = 0
    for raw, p in tokens:
        found = _WORD.findall(raw.lower())
        if not found:
            continue
        piece = found[0]
        for j in range(wi, min(len(words), wi + 8)):
            if words[j][2] == piece:
                if p < threshold:
                    spans.append(Span(words[j][0], words[j][1], p))
                wi = j + 1
                break
    return spans


def grounded_spans(text: str, sentences: Sequence[tuple[str, float]]) -> list[Span]:
    """Spans of ``text`` where the added ``sentences`` still stand (case-insensitive; an
    edited sentence is no longer marked)."""
    low = text.lower()
    spans = []
    for sentence, p in sentences:
        needle = sentence.strip().lower()
        start = low.find(needle) if needle else -1
        while start >= 0:
            spans.append(Span(start, start + len(needle), p))
            start = low.find(needle, start + len(needle))
    return sorted(spans, key=lambda s: s.start)


@dataclass
class ReviewModel:
    """One opened draft: the texts being edited, the claim, and what may be done with it."""

    service: ReviewService
    user: str
    detail: DraftDetail
    holds_claim: bool
    notice: str = ""  # why the draft is read-only, if it is (shown plainly)
    findings: str = ""
    impression: str = ""
    pictures: list[imaging.Picture] = field(default_factory=list)
    view_errors: list[str] = field(default_factory=list)  # views that could not be shown, and why
    signed: Draft | None = None

    def __post_init__(self) -> None:
        if not self.findings and not self.impression:
            if self.detail.state == DraftState.SIGNED:
                self.findings, self.impression = self.detail.signed_findings, self.detail.signed_impression
            else:
                self.findings, self.impression = self.detail.findings, self.detail.impression

    # -- state ----------------------------------------------------------------------------
    @property
    def is_final(self) -> bool:
        return self.detail.is_final or self.signed is not None

    @property
    def read_only(self) -> bool:
        return self.is_final or not self.holds_claim or not self.detail.is_open

    @property
    def can_sign(self) -> bool:
        return not self.read_only and bool(self.findings.strip() or self.impression.strip())

    @property
    def can_reject(self) -> bool:
        return not self.read_only

    @property
    def edited(self) -> bool:
        return (self.findings.strip(), self.impression.strip()) != (
            self.detail.findings.strip(),
            self.detail.impression.strip(),
        )

    def banner(self) -> tuple[str, str]:
        """(kind, text) of the status banner; kind is ``draft``, ``final`` or ``blocked``."""
        d = self.detail
        model = f"{d.model_name} {d.model_version}".strip() or "unknown model"
        if self.is_final:
            who = self.signed.signed_by if self.signed else d.signed_by
            when = self.signed.signed_at if self.signed else d.signed_at
            stamp = f" on {when:%Y-%m-%d %H:%M} UTC" if when else ""
            return "final", f"SIGNED — VERIFIED by {who}{stamp}. Read-only."
        if d.state == DraftState.REJECTED:
            return "blocked", f"REJECTED: {d.reject_reason} — {AI_DRAFT_LABEL} ({model}), not a report."
        if d.state == DraftState.SUPERSEDED:
            return "blocked", f"SUPERSEDED by a newer draft — {AI_DRAFT_LABEL} ({model}), cannot be signed."
        if self.notice:
            return "blocked", f"{AI_DRAFT_LABEL} ({model}) — {self.notice}"
        return "draft", f"{AI_DRAFT_LABEL} — drafted by {model}; edit, then sign to make it a report."

    def model_line(self) -> str:
        d = self.detail
        return f"Model: {d.model_name or 'unknown'} {d.model_version}".rstrip() + f" · drafted {d.created_at:%Y-%m-%d %H:%M} UTC"

    def patient_line(self) -> str:
        d = self.detail
        bits = [format_person_name(d.patient_name), d.patient_id]
        age = patient_age(d.patient_birth_date, d.study_date)
        sex = d.patient_sex
        if age or sex:
            bits.append(" ".join(x for x in (age, sex) if x))
        bits += [format_da(d.study_date), f"Acc {d.accession_number}" if d.accession_number else ""]
        return "  ·  ".join(b for b in bits if b)

    # -- text -----------------------------------------------------------------------------
    def set_text(self, findings: str, impression: str) -> None:
        if self.read_only:
            raise ReviewError("this report is read-only")
        self.findings, self.impression = findings, impression

    def diff(self) -> str:
        """What the radiologist changed, against the AI draft (unified diff; '' if nothing)."""
        parts = [
            text_diff(self.detail.findings.strip(), self.findings.strip(), "AI draft: findings", "now: findings"),
            text_diff(self.detail.impression.strip(), self.impression.strip(), "AI draft: impression", "now: impression"),
        ]
        return "".join(p for p in parts if p)

    def word_diff(self, section: str) -> list[tuple[str, str]]:
        """Word-level changes of one section for display: (op, text), op in ``= - +``."""
        import difflib

        before = (self.detail.findings if section == "findings" else self.detail.impression).split()
        after = (self.findings if section == "findings" else self.impression).split()
        out: list[tuple[str, str]] = []
        sm = difflib.SequenceMatcher(a=before, b=after, autojunk=False)
        for op, a0, a1, b0, b1 in sm.get_opcodes():
            if op == "equal":
                out.append(("=", " ".join(before[a0:a1])))
            if op in ("delete", "replace"):
                out.append(("-", " ".join(before[a0:a1])))
            if op in ("insert", "replace"):
                out.append(("+", " ".join(after[b0:b1])))
        return out

    def highlights(self, section: str, threshold: float = DEFAULT_LOW_CONFIDENCE) -> list[Span]:
        """Low-probability words of one section (``findings`` or ``impression``) as spans in it,
        and the sentences the grounding step added (they come from the observation classifier,
        not from the decoder, whatever their probability).

        The model's words run through findings then impression, so they are aligned with both
        sections joined, and the spans of the asked section are returned relative to it.
        """
        joined = self.findings + "\n" + self.impression
        cut = len(self.findings) + 1
        spans = low_confidence_spans(joined, self.detail.tokens, threshold)
        spans += grounded_spans(joined, self.detail.grounded)
        if section == "findings":
            return [s for s in spans if s.end <= len(self.findings)]
        return [Span(s.start - cut, s.end - cut, s.probability) for s in spans if s.start >= cut]

    # -- actions (blocking) ----------------------------------------------------------------
    def needs_confirmation(self) -> bool:
        """Signing an unchanged AI draft asks the radiologist to confirm."""
        return not self.edited

    def sign(self) -> Draft:
        """*Blocking*: sign as ``user`` (verified SR written, stored, indexed, queued)."""
        if self.read_only:
            raise ReviewError("this report cannot be signed: " + self.banner()[1])
        signed = self.service.sign(self.detail.draft_id, self.user, self.findings, self.impression)
        self.signed = signed
        self.detail = self.service.detail(self.detail.draft_id)
        # from now on show exactly what was signed
        self.findings, self.impression = signed.signed_findings or "", signed.signed_impression or ""
        return signed

    def reject(self, reason: str) -> Draft:
        """*Blocking*: reject with a reason."""
        if self.read_only:
            raise ReviewError("this draft cannot be rejected: " + self.banner()[1])
        d = self.service.reject(self.detail.draft_id, self.user, reason)
        self.detail = self.service.detail(self.detail.draft_id)
        return d

    def release(self) -> bool:
        """*Blocking*: give the claim back (Skip, or opening another draft)."""
        if self.holds_claim and not self.is_final and self.detail.is_open:
            self.holds_claim = False
            return self.service.release(self.detail.draft_id, self.user)
        return False


def open_review(
    service: ReviewService,
    user: str,
    draft_id: int,
    load_views: bool = True,
    progress: Callable[[int, int, str], None] | None = None,
) -> ReviewModel:
    """*Blocking*: claim (when possible) and load one draft with its views.

    An open draft is claimed for ``user``; if another reviewer holds it, or ``user`` is not a
    configured reviewer, or the draft is final/rejected/superseded, it opens read-only with
    a notice saying why. ``progress(done, total, what)`` is called as views are decoded.
    """
    detail = service.detail(draft_id)
    holds = False
    notice = ""
    if detail.is_open:
        if not service.is_reviewer(user):
            notice = f"read-only: account {user!r} is not a configured reviewer and cannot sign"
        else:
            try:
                detail = service.claim(draft_id, user)
                holds = True
            except ClaimConflictError as exc:
                notice = f"read-only: in review by {exc.holder}"
            except ReviewError as exc:
                notice = f"read-only: {exc}"
                detail = service.detail(draft_id)
    model = ReviewModel(service=service, user=user, detail=detail, holds_claim=holds, notice=notice)
    if load_views:
        total = len(detail.views)
        for i, v in enumerate(detail.views):
            if progress:
                progress(i, total, f"Loading {view_label(v.view)} view")
            if v.path is None:
                model.view_errors.append(f"{view_label(v.view)}: image {v.sop_instance_uid} is not in the store")
                continue
            try:
                model.pictures.append(imaging.load_picture(v.path, view=view_label(v.view)))
            except (OSError, ValueError, pydicom.errors.InvalidDicomError) as exc:  # PixelError is a ValueError
                model.view_errors.append(f"{view_label(v.view)}: cannot display {v.sop_instance_uid}: {exc}")
        if progress:
            progress(total, total, "Views loaded")
    return model
