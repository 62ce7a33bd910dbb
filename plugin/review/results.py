"""Typed results of the review actions: what the reviewer window (and scripts) get back.

The review service never hands out ORM rows (issue 15): signing returns a :class:`SignResult`,
rejecting a :class:`RejectResult`, an addendum an :class:`AddendumResult`, a retried drafting a
:class:`RetryResult`. All are frozen dataclasses of plain values.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

#: how a critical result was told, as the reviewer picks it (keys of the SR's coded values)
COMMUNICATION_METHODS = {
    "telephone": "Telephone",
    "in_person": "In person",
    "secure_message": "Secure message",
}


@dataclass(frozen=True)
class CriticalNotice:
    """A critical result told to a clinician: who (name, role), how and when. Recorded at
    signing, written into the verified SR.

    Attributes
    ----------
    recipient, role:
        Name and role of the person told.
    method:
        A key of :data:`COMMUNICATION_METHODS`.
    communicated_at:
        When, naive UTC (as the database keeps times).
    recorded_by:
        The reviewer's account (filled by the service).
    """

    recipient: str
    role: str
    method: str  # a key of COMMUNICATION_METHODS
    communicated_at: dt.datetime
    recorded_by: str = ""  # the reviewer's account (filled by the service)

    @property
    def method_label(self) -> str:
        return COMMUNICATION_METHODS.get(self.method, self.method)


@dataclass(frozen=True)
class SignResult:
    """A signature: the draft, the verified SR written and queued, and what it recorded. Field
    names are those of the draft's columns, so ``result.signed_sop_instance_uid`` reads as
    before.

    Attributes
    ----------
    draft_id, study_instance_uid:
        The draft signed and its study.
    state:
        The draft's state after signing (``signed``).
    signed_by, signed_at:
        The reviewer's account and when (naive UTC).
    signed_sop_instance_uid, signed_path:
        The verified SR and its file in the store.
    signed_findings, signed_impression:
        The text as signed.
    verifier_name:
        Verifying Observer Name written into the SR.
    critical:
        The critical-result communication recorded with it (``None``: none).
    """

    draft_id: int
    study_instance_uid: str
    state: str
    signed_by: str
    signed_at: dt.datetime | None
    signed_sop_instance_uid: str
    signed_path: str
    signed_findings: str
    signed_impression: str
    verifier_name: str = ""
    critical: CriticalNotice | None = None


@dataclass(frozen=True)
class RejectResult:
    """A rejected draft (no SR was sent).

    Attributes
    ----------
    draft_id, study_instance_uid:
        The draft and its study.
    state:
        ``rejected``.
    reject_reason:
        The reviewer's reason.
    """

    draft_id: int
    study_instance_uid: str
    state: str
    reject_reason: str


@dataclass(frozen=True)
class AddendumResult:
    """An addendum: a new verified SR amending ``predecessor_sop_instance_uid`` (kept unchanged).

    Attributes
    ----------
    draft_id, study_instance_uid:
        The signed draft amended and its study.
    sop_instance_uid, path:
        The new SR and its file in the store.
    predecessor_sop_instance_uid:
        The SR it amends.
    text:
        The addendum's text.
    author, author_name:
        The reviewer's account and Verifying Observer Name.
    created_at:
        When (naive UTC).
    transfers:
        Outbound transfers queued for it.
    """

    draft_id: int
    study_instance_uid: str
    sop_instance_uid: str
    path: str
    predecessor_sop_instance_uid: str
    text: str
    author: str  # account
    author_name: str  # verifying observer (display name)
    created_at: dt.datetime
    transfers: int = 0  # outbound transfers queued for it


@dataclass(frozen=True)
class RetryResult:
    """Drafting asked again for a study: the job queued for it.

    Attributes
    ----------
    study_instance_uid:
        The study.
    job_id:
        The new job's id.
    study_generation:
        The study generation the job drafts.
    """

    study_instance_uid: str
    job_id: int
    study_generation: int
