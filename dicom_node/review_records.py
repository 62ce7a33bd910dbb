"""Tables of what happens to a report after the draft (issue 17; migration 0004).

- ``critical_results``: a critical result told to a clinician at signing — who (name, role),
  how (telephone, in person, secure message), when, recorded by which reviewer, and the
  verified SR that carries it (its "Communication of Critical Results" section);
- ``report_addenda``: each addendum, a new verified SR amending a signed report (or an earlier
  addendum), with the SR it supersedes (Predecessor Documents Sequence). The amended SR stays
  in the store and the index unchanged.

Kept in their own module so that the rest of the schema (``dicom_node.db``) reads as before;
the models share its :class:`~dicom_node.db.Base`, so one metadata describes the database.
Rows are written by ``plugin.review`` only; neither table is ever updated in place.
"""

from __future__ import annotations

import datetime as dt

from sqlalchemy import DateTime, ForeignKey, Integer, String, Text
from sqlalchemy.orm import Mapped, mapped_column

from dicom_node.db import UID, Base, utcnow

#: how a critical result was told (``critical_results.method``)
COMMUNICATION_METHODS = ("telephone", "in_person", "secure_message")


class CriticalResult(Base):
    """A critical result communicated at signing: who was told, how and when."""

    __tablename__ = "critical_results"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    draft_id: Mapped[int] = mapped_column(ForeignKey("drafts.id", ondelete="CASCADE"), index=True)
    study_instance_uid: Mapped[str] = mapped_column(UID)
    #: the verified SR whose "Communication of Critical Results" section records it
    sop_instance_uid: Mapped[str] = mapped_column(UID, index=True)
    recipient_name: Mapped[str] = mapped_column(String(200))
    recipient_role: Mapped[str] = mapped_column(String(64))
    method: Mapped[str] = mapped_column(String(16))  # one of COMMUNICATION_METHODS
    communicated_at: Mapped[dt.datetime] = mapped_column(DateTime)  # naive UTC
    recorded_by: Mapped[str] = mapped_column(String(128))  # the reviewer's account
    recorded_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)


class ReportAddendum(Base):
    """One addendum: a new verified SR that amends ``predecessor_sop_instance_uid``."""

    __tablename__ = "report_addenda"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    draft_id: Mapped[int] = mapped_column(ForeignKey("drafts.id", ondelete="CASCADE"), index=True)
    study_instance_uid: Mapped[str] = mapped_column(UID)
    sop_instance_uid: Mapped[str] = mapped_column(UID, unique=True)
    path: Mapped[str] = mapped_column(String(512))  # relative to storage_dir
    predecessor_sop_instance_uid: Mapped[str] = mapped_column(UID)
    text: Mapped[str] = mapped_column(Text)
    author: Mapped[str] = mapped_column(String(128))  # the reviewer's account
    author_name: Mapped[str] = mapped_column(String(324))  # the verifying observer (display name)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
