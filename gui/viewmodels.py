"""Qt-free view-models of the reviewer: what the worklist and the review pane show and do.

The widgets in :mod:`gui.window` only render these and forward events; every decision
(which rows, in which order, what the banner says, whether Sign is allowed, what is
highlighted, what changed) is made here and tested without Qt. Methods that touch the
database or files are marked *blocking*: the window runs them off the GUI thread.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import pydicom.errors

from gui import imaging
from gui.highlight import DEFAULT_POLICY, HighlightPolicy, deid_spans, highlight
from gui.highlight import Span as Span  # re-exported for the widgets
from gui.highlight import grounded_spans as grounded_spans  # re-exported
from gui.prior_model import PriorModel, safe_load_prior
from plugin.review.addenda import ReportRecord, report_record
from plugin.review.draft_info import (
    OUTCOME_OFF,
    OUTCOME_PARTIAL,
    OUTCOME_PASSED,
    OUTCOME_WARNED,
    OUTCOME_WITHHELD,
    InputCheck,
    ObservationCall,
    ViewCheck,
)
from plugin.review.scratch import study_detail
from plugin.review.service import (
    OPEN_STATES,
    STATE_FAILED,
    STATE_IN_REVIEW,
    STATE_NEW,
    STATE_REJECTED,
    STATE_SIGNED,
    STATE_SUPERSEDED,
    ClaimConflictError,
    CriticalNotice,
    DraftDetail,
    RejectResult,
    ReviewError,
    ReviewService,
    SignResult,
    UnknownReviewerError,
    WorklistRow,
    text_diff,
)

AI_DRAFT_LABEL = "AI DRAFT — UNVERIFIED"
NOT_DRAFTED_LABEL = "NOT DRAFTED"

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


def format_study_age(study_date: str, today: dt.date | None = None) -> str:
    """How long ago the study was done, from its DA: ``today``, ``1 d``, ``12 d``, ``5 mo``,
    ``2 y``; ``""`` without a valid date (the worklist's "Study age", beside the draft's age)."""
    try:
        day = dt.datetime.strptime(study_date, "%Y%m%d").date()
    except ValueError:
        return ""
    days = ((today or dt.date.today()) - day).days
    if days <= 0:
        return "today" if days == 0 else "future date"
    if days < 60:
        return f"{days} d"
    if days < 730:
        return f"{days // 30} mo"
    return f"{days // 365} y"


def local_time(when: dt.datetime) -> str:
    """A database time (naive UTC) as the reviewer's local time: ``2026-11-28 09:41 CET``."""
    aware = when if when.tzinfo is not None else when.replace(tzinfo=dt.UTC)
    local = aware.astimezone()
    return f"{local:%Y-%m-%d %H:%M} {local.tzname() or ''}".rstrip()


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
    Column("priority", "Priority"),  # STAT, ED, inpatient, outpatient; ⚠ = a critical draft
    Column("patient_name", "Patient"),
    Column("patient_id", "Patient ID"),
    Column("study_date", "Study date"),
    Column("accession_number", "Accession"),
    Column("", "Views"),
    Column("", "Study age"),  # from the study date (sort by Study date)
    Column("age", "Draft age"),
    Column("state", "State"),
    Column("", "AI draft"),
)


def column_index(title: str) -> int:
    """The worklist column with this title (columns are found by title, never by position)."""
    return next(i for i, c in enumerate(COLUMNS) if c.title == title)


def short_reason(reason: str, limit: int = 90) -> str:
    """The gate's reason without its parenthesised detail when it is long (the per-view detail is
    shown beside each view): ``no view can be read by the model (PA: ...)`` -> ``no view can be
    read by the model``."""
    reason = reason.strip().rstrip(".")
    if len(reason) > limit and " (" in reason:
        head = reason.split(" (", 1)[0].strip()
        if head:
            return head
    return reason


def draft_status(row: WorklistRow, full: bool = False) -> str:
    """What the input gate let the model do for this row: ``not drafted: <reason>`` for a withheld
    study, the views left out of a partial draft, ``not checked`` for a draft made before the gate."""
    if row.draft_id is None:
        return ""
    if row.no_ai_draft_reason:
        return f"no AI draft: report from scratch ({row.no_ai_draft_reason if full else short_reason(row.no_ai_draft_reason)})"
    outcome, reason = row.input_outcome, row.input_reason if full else short_reason(row.input_reason)
    if outcome == OUTCOME_WITHHELD:
        return f"not drafted: {reason or 'the input check withheld the draft'}"
    if outcome == OUTCOME_PARTIAL:
        unused = " + ".join(row.views_not_used) or "some views"
        return f"drafted without {unused}" + (f": {reason}" if reason else "")
    if outcome == OUTCOME_WARNED:
        return "drafted despite the input check" + (f": {reason}" if reason else "")
    if outcome == OUTCOME_PASSED:
        return "drafted"
    if outcome == OUTCOME_OFF:
        return "drafted (input check off)"
    return "drafted (input not checked)"


#: what the Priority column shows before the priority of a critical draft
CRITICAL_MARK = "⚠"


def priority_text(row: WorklistRow) -> str:
    """The Priority cell: ``STAT``, ``ED``, ``inpatient``, ``outpatient`` or ``—`` (the request
    did not say), after :data:`CRITICAL_MARK` when the draft crossed a critical threshold."""
    label = row.priority or "—"
    return f"{CRITICAL_MARK} {label}" if row.critical else label


def cell_text(row: WorklistRow, column: int, user: str = "") -> str:
    key = COLUMNS[column].title
    if key == "Priority":
        return priority_text(row)
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
    if key == "Study age":
        return format_study_age(row.study_date)
    if key == "Draft age":
        return format_age(row.age_s)
    if key == "State":
        return "in review by you" if user and row.state == STATE_IN_REVIEW and row.claimed_by == user else row.state_label
    if key == "AI draft":
        status = draft_status(row)
        return status if len(status) <= 110 else status[:109].rstrip() + "…"  # all of it in the tooltip
    raise IndexError(column)


def row_tooltip(row: WorklistRow) -> str:
    lines = [f"Study {row.study_instance_uid}"]
    lines.append(f"Priority: {row.priority}" if row.priority else
                 "Priority: not stated in the request (no STAT priority, patient location or admission)")
    if row.critical:
        lines.append("Critical draft (reading-order aid, not a diagnosis; see the README):")
        lines += [f"  {c}" for c in row.critical]
    if row.model_name:
        lines.append(f"Model {row.model_name} {row.model_version}".rstrip())
    if row.detail:
        lines.append(("Failed: " if row.state == STATE_FAILED else "Reason: ") + row.detail)
    status = draft_status(row, full=True)
    if status:
        lines.append("AI draft: " + status)
    return "\n".join(lines)


@dataclass
class WorklistModel:
    """The worklist's query (filter, search, sort) and its current rows (Qt-free).

    Attributes
    ----------
    service:
        The review service the rows come from.
    user:
        Rows this account holds read "in review by you".
    state_filter:
        The state shown (``"To review"``, ``"All"``, ...).
    search:
        Text to search for in the rows.
    sort_column, descending:
        The sort (default: most urgent first, critical drafts first within each, then the
        oldest: :func:`plugin.review.service.sort_rows`).
    rows:
        The rows of the last :meth:`fetch`.
    """

    service: ReviewService
    user: str = ""  # rows this account holds read "in review by you"
    state_filter: str = "To review"
    search: str = ""
    #: most urgent first (STAT, ED, inpatient, outpatient, not stated), critical drafts first
    #: within each, then the oldest (plugin.review.service.sort_rows)
    sort_column: int = field(default_factory=lambda: column_index("Priority"))
    descending: bool = False
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

    def open_rows_after(self, draft_id: int | None) -> list[int]:
        """Draft ids of the unclaimed rows (state new) after ``draft_id`` in worklist order,
        wrapping round: what Sign & next tries, in turn."""
        n = len(self.rows)
        start = self.index_of(draft_id)
        out: list[int] = []
        for k in range(1, n + 1):
            row = self.rows[(start + k) % n]
            if row.draft_id is not None and row.state == STATE_NEW and row.draft_id != draft_id and row.draft_id not in out:
                out.append(row.draft_id)
        return out

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

def gate_view_text(check: ViewCheck | None) -> tuple[str, bool | None]:
    """(line shown beside a view, passed?) for the input gate's verdict on it; None: not checked."""
    if check is None:
        return "input not checked", None
    if check.passed:
        return "input check passed", True
    return "NOT USED — " + ("; ".join(check.reasons) or "failed the input check"), False


@dataclass(frozen=True)
class ObservationRow:
    """One line of the probabilities panel."""

    name: str
    probability: float
    threshold: float | None
    called: bool | None  # the classifier's call (p >= threshold); None without a threshold
    uncertain: bool  # within the policy's margin of its threshold

    def text(self) -> tuple[str, str, str]:
        thr = "—" if self.threshold is None else f"{self.threshold:.2f}"
        return self.name, f"{self.probability:.2f}", thr

    def tooltip(self) -> str:
        if self.threshold is None:
            return f"{self.name}: probability {self.probability:.2f} (no threshold recorded for this model)"
        call = "called present" if self.called else "called absent"
        near = "; close to its threshold: an uncertain call" if self.uncertain else ""
        return f"{self.name}: probability {self.probability:.2f}, threshold {self.threshold:.2f}: {call}{near}"


def observation_rows(calls: Sequence[ObservationCall], policy: HighlightPolicy = DEFAULT_POLICY) -> list[ObservationRow]:
    """The probabilities panel: every observation, most probable first, with its threshold and call."""
    rows = []
    for c in calls:
        distance = c.log_odds_from_threshold()
        rows.append(ObservationRow(c.name, c.probability, c.threshold, c.called,
                                   distance is not None and abs(distance) < policy.call_margin))
    return rows


@dataclass
class ReviewModel:
    """One opened draft: the texts being edited, the claim, and what may be done with it (Qt-free).

    Attributes
    ----------
    service:
        The review service.
    user:
        The reviewer's account.
    detail:
        The draft (:class:`plugin.review.service.DraftDetail`).
    holds_claim:
        Whether ``user`` holds the claim (else it is read-only).
    notice:
        Why the draft is read-only, if it is (shown plainly).
    findings, impression:
        The texts being edited.
    pictures, view_errors:
        The views, decoded, and those that could not be shown, with why.
    signed:
        The signature, once signed.
    record:
        A signed report's critical-result communication and addenda.
    policy:
        The highlight cut-offs.
    prior:
        The draft's prior study for comparison (``None``: not loaded).
    """

    service: ReviewService
    user: str
    detail: DraftDetail
    holds_claim: bool
    notice: str = ""  # why the draft is read-only, if it is (shown plainly)
    findings: str = ""
    impression: str = ""
    pictures: list[imaging.Picture] = field(default_factory=list)
    view_errors: list[str] = field(default_factory=list)  # views that could not be shown, and why
    signed: SignResult | None = None
    #: a signed report's critical-result communication and addenda (loaded with a signed draft)
    record: ReportRecord | None = None
    policy: HighlightPolicy = DEFAULT_POLICY
    #: the draft's prior study for comparison (gui.prior_model; None: not loaded)
    prior: PriorModel | None = None

    def __post_init__(self) -> None:
        if not self.findings and not self.impression:
            if self.detail.state == STATE_SIGNED:
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
            stamp = f" on {local_time(when)}" if when else ""
            return "final", f"SIGNED — VERIFIED by {self.signer_name(who or '')}{stamp}. Read-only."
        if d.draft_id == 0:  # a study with no draft (drafting failed or skipped): its images only
            return "blocked", (f"{NOT_DRAFTED_LABEL} — {d.no_ai_draft_reason or 'no AI draft'}. Look at the images, "
                               "then report from scratch or retry drafting.")
        if d.no_ai_draft_reason and d.state not in (STATE_REJECTED, STATE_SUPERSEDED):
            head = f"NO AI DRAFT — report from scratch ({d.no_ai_draft_reason})."
            if self.notice:
                return "blocked", f"{head} {self.notice}"
            return "withheld", f"{head} Write the report from the images, then sign as usual."
        if d.state == STATE_REJECTED:
            return "blocked", f"REJECTED: {d.reject_reason} — {AI_DRAFT_LABEL} ({model}), not a report."
        if d.state == STATE_SUPERSEDED:
            return "blocked", f"SUPERSEDED by a newer draft — {AI_DRAFT_LABEL} ({model}), cannot be signed."
        if d.withheld:
            reason = short_reason(self.gate.reason) if self.gate and self.gate.reason else "the images failed the input check"
            head = f"{NOT_DRAFTED_LABEL} — the AI draft was withheld: {reason}."
            if self.notice:
                return "blocked", f"{head} {self.notice}"
            return "withheld", f"{head} Write the report from the images, then sign as usual."
        if self.notice:
            return "blocked", f"{AI_DRAFT_LABEL} ({model}) — {self.notice}"
        g = self.gate
        if g is not None and g.outcome == OUTCOME_WARNED:
            return "draft", (f"{AI_DRAFT_LABEL} — drafted by {model} although the input check failed "
                             f"({short_reason(g.reason) or 'see below'}); read it with extra care, edit, then sign.")
        if g is not None and g.outcome == OUTCOME_PARTIAL:
            unused = ", ".join(view_label(v.view) for v in g.failed_views) or "some views"
            return "draft", f"{AI_DRAFT_LABEL} — drafted by {model} without {unused}; edit, then sign to make it a report."
        return "draft", f"{AI_DRAFT_LABEL} — drafted by {model}; edit, then sign to make it a report."

    def signer_name(self, account: str) -> str:
        """The verifying observer's name as configured (``Dr Alice Moreau``), not the account;
        the account when it is no longer a configured reviewer."""
        try:
            r = self.service.find_reviewer(account) if account else None
        except ReviewError:  # the configuration cannot be trusted now: say the account
            r = None
        return person_display(r.display_name) if r is not None else account or "(unknown)"

    @property
    def gate(self) -> InputCheck | None:
        return self.detail.input_check

    def gate_lines(self) -> list[str]:
        """What the input gate did, in plain lines: the outcome, each view left out and why, the
        study-level notes. A draft made before the gate says it was not checked."""
        g = self.gate
        if g is None:
            return ["Input check: not checked (drafted before the input gate existed)."]
        mode = f" (mode {g.mode})" if g.mode else ""
        lines: list[str] = []
        if g.outcome == OUTCOME_WITHHELD:
            lines.append(f"Input check{mode}: withheld — {short_reason(g.reason) or 'no view passed'}.")
        elif g.outcome == OUTCOME_PARTIAL:
            unused = ", ".join(view_label(v.view) for v in g.failed_views) or "some views"
            reason = short_reason(g.reason)
            lines.append(f"Input check{mode}: partial — drafted without {unused}" + (f": {reason}." if reason else "."))
        elif g.outcome == OUTCOME_WARNED:
            reason = short_reason(g.reason)
            lines.append(f"Input check{mode}: WARNING — drafted although the check failed"
                         + (f": {reason}." if reason else ".") + " Read this draft with extra care.")
        elif g.outcome == OUTCOME_OFF:
            lines.append("Input check: off for this node (the images were not checked).")
        else:
            lines.append(f"Input check{mode}: every view passed.")
        for v in g.views:
            if not v.passed:
                verb = "read anyway" if g.outcome == OUTCOME_WARNED else "not used"
                lines.append(f"{view_label(v.view)} {verb}: " + ("; ".join(v.reasons) or "failed the check") + ".")
        lines += [f"Study: {note}." for note in g.study]
        return lines

    def view_gate(self, sop_instance_uid: str) -> tuple[str, bool | None]:
        """The line shown beside one view: the gate's verdict on it."""
        g = self.gate
        return gate_view_text(g.for_view(sop_instance_uid) if g is not None else None)

    def observation_rows(self) -> list[ObservationRow]:
        """The probabilities panel (empty for a withheld draft: the model's output is not shown)."""
        if self.detail.withheld:
            return []
        return observation_rows(self.detail.observations, self.policy)

    @property
    def no_ai_text(self) -> bool:
        """There is no AI text to show: the gate withheld it, or the report is written from scratch."""
        return self.detail.withheld or bool(self.detail.no_ai_draft_reason)

    def model_line(self) -> str:
        d = self.detail
        if d.no_ai_draft_reason:
            return "No AI draft: the report is written from the images."
        return f"Model: {d.model_name or 'unknown'} {d.model_version}".rstrip() + f" · drafted {local_time(d.created_at)}"

    def patient_line(self) -> str:
        d = self.detail
        bits = [format_person_name(d.patient_name), d.patient_id]
        age = patient_age(d.patient_birth_date, d.study_date)
        sex = d.patient_sex
        if age or sex:
            bits.append(" ".join(x for x in (age, sex) if x))
        bits += [format_da(d.study_date), f"Acc {d.accession_number}" if d.accession_number else ""]
        return "  ·  ".join(b for b in bits if b)

    def signing_for(self) -> str:
        """The open study in one line, shown beside the Sign button at all times:
        ``SCHMIDT, Hans · ID CXR-10001 · Acc A1001 · 2026-11-27``."""
        d = self.detail
        bits = [format_person_name(d.patient_name) or "(no name)", f"ID {d.patient_id or '(none)'}",
                f"Acc {d.accession_number or '(none)'}", format_da(d.study_date) or "(no study date)"]
        return "  ·  ".join(bits)

    def sign_confirmation(self) -> tuple[str, str]:
        """(title, text) of the question asked before every signature: it names the patient, the
        patient ID, the accession number and the study date of the open study, and says whether
        the text is the unchanged AI draft or edited (both are confirmed)."""
        d = self.detail
        who = (f"Patient: {format_person_name(d.patient_name) or '(no name)'}\n"
               f"Patient ID: {d.patient_id or '(none)'}\n"
               f"Accession: {d.accession_number or '(none)'}\n"
               f"Study date: {format_da(d.study_date) or '(none)'}")
        if self.needs_confirmation():
            return ("Sign the unchanged AI draft?",
                    f"{who}\n\nThe text is exactly the AI draft. Sign it as your report, verified by you?")
        return "Sign this report?", f"{who}\n\nSign your edited report for this patient, verified by you?"

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

    def highlights(self, section: str) -> list[Span]:
        """The marks of one section (``findings`` or ``impression``), as spans in it: uncertain
        observation calls, the words the decoder was least sure of, and the sentences the
        grounding step added (:func:`gui.highlight.highlight`, the policy the benchmark measures).

        The model's words run through findings then impression, so both sections are joined
        (as drafted and as they stand now) and the spans of the asked one are returned relative
        to it. Nothing the radiologist typed is marked.
        """
        d = self.detail
        draft = d.findings + "\n" + d.impression
        joined = self.findings + "\n" + self.impression
        cut = len(self.findings) + 1
        observations = {c.name: c.probability for c in d.observations}
        thresholds = {c.name: c.threshold for c in d.observations if c.threshold is not None}
        spans = highlight(draft, joined, d.tokens, observations, thresholds, d.grounded, self.policy)
        spans = sorted(spans + deid_spans(joined), key=lambda s: (s.start, s.end))  # "xxxx": always marked
        if section == "findings":
            return [s for s in spans if s.end <= len(self.findings)]
        return [Span(s.start - cut, s.end - cut, s.probability, s.kind, s.note) for s in spans if s.start >= cut]

    def deid_placeholders(self) -> int:
        """How many de-identification placeholders (``xxxx``) the text still holds."""
        return len(deid_spans(self.findings + "\n" + self.impression))

    def sign_refusal(self) -> str:
        """Why the text cannot be signed as it stands ('' if it can): a placeholder is left."""
        n = self.deid_placeholders()
        if not n:
            return ""
        return (f"The report still contains {n} de-identification placeholder{'s' if n > 1 else ''} "
                "(\"xxxx\", marked in red): the model learned them from de-identified reports; they are not "
                "report text. Replace each with what you see, or delete it, then sign.")

    # -- actions (blocking) ----------------------------------------------------------------
    def needs_confirmation(self) -> bool:
        """Signing an unchanged AI draft asks the radiologist to confirm."""
        return not self.edited

    def sign(self, critical: CriticalNotice | None = None) -> SignResult:
        """*Blocking*: sign as ``user`` (verified SR written, stored, indexed, queued)."""
        if self.read_only:
            raise ReviewError("this report cannot be signed: " + self.banner()[1])
        refusal = self.sign_refusal()
        if refusal:
            raise ReviewError(refusal)
        signed = self.service.sign(self.detail.draft_id, self.user, self.findings, self.impression, critical=critical)
        self.signed = signed
        self.detail = self.service.detail(self.detail.draft_id)
        self.record = report_record(self.service, self.detail.draft_id)  # the critical result, if recorded
        # from now on show exactly what was signed
        self.findings, self.impression = signed.signed_findings or "", signed.signed_impression or ""
        return signed

    def reject(self, reason: str) -> RejectResult:
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
    """*Blocking*: claim (when possible) and load one draft with its views. An open draft is
    claimed for ``user``; if another reviewer holds it, or ``user`` is not a configured
    reviewer, or the draft is final/rejected/superseded, it opens read-only with a notice
    saying why.

    Parameters
    ----------
    service:
        The review service.
    user:
        The reviewer's account.
    draft_id:
        The draft to open.
    load_views:
        Decode the views now (else :func:`load_pictures` later).
    progress:
        ``progress(done, total, what)``, called as views are decoded.

    Returns
    -------
    ReviewModel
        The opened draft.
    """
    detail = service.detail(draft_id)
    holds = False
    notice = ""
    if detail.is_open:
        try:
            service.reviewer(user)
        except UnknownReviewerError as exc:  # not listed, or the config is not the installed one
            notice = f"read-only: {exc}"
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
    if detail.state == STATE_SIGNED:
        model.record = report_record(service, draft_id)
    if load_views:
        load_pictures(model, progress)
        model.prior = safe_load_prior(service, draft_id, detail.study_date, progress)
    return model


def load_pictures(model: ReviewModel, progress: Callable[[int, int, str], None] | None = None) -> None:
    """*Blocking*: decode the views of ``model.detail`` into ``model.pictures`` (errors in
    ``model.view_errors``); ``progress(done, total, what)`` as views are decoded."""
    detail = model.detail
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


def open_study_images(
    service: ReviewService,
    user: str,
    study_uid: str,
    progress: Callable[[int, int, str], None] | None = None,
) -> ReviewModel:
    """*Blocking*: a study with no draft (drafting failed or skipped), read-only: its images and
    why there is no draft (``detail.draft_id == 0``); report it from scratch or retry drafting."""
    model = ReviewModel(service=service, user=user, detail=study_detail(service, study_uid), holds_claim=False)
    load_pictures(model, progress)
    return model
