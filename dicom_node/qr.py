"""The Query/Retrieve SCU: find and fetch a patient's prior studies from the PACS (PS3.4 C).

One association per fetch (:class:`QRSession`), Study Root information model:

- C-FIND at STUDY level (PS3.4 C.4.1, C.6.2.1): matching keys Patient ID and, when the current
  study has one, Issuer of Patient ID; return keys Study Instance UID, Date, Time, Accession
  Number, Description, Modalities in Study. Answers naming another issuer are dropped here too.
- C-FIND at SERIES level of one study: Series Instance UID, Modality, Body Part Examined,
  Series Description, Number of Series Related Instances.
- C-GET at SERIES level (PS3.4 C.4.3): the objects come back as C-STORE sub-operations on the
  *same* association (SCP/SCU Role Selection, PS3.7 D.3.3.4), so they never enter the node's own
  Storage SCP and are never drafted. The caller's ``on_instance`` decides where each goes; one
  that is not of the queried patient and study is refused (0xC000-class status) and counted.

Every call has the configured timeouts (``priors.timeout_s``: TCP connect, ACSE, DIMSE and
network idle), so a dead or silent PACS ends the fetch with :class:`QRError` and a plain reason,
never a hang. Nothing here logs patient names or IDs (UIDs only), and pynetdicom's element-by-element
dump of the identifiers is filtered out of its log.
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, build_role, evt
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
)

from dicom_node.config import Config

log = logging.getLogger(__name__)


class _NoIdentifierDump(logging.Filter):
    """pynetdicom logs C-FIND and C-GET identifiers element by element at INFO, the Patient ID
    among them (house rule 10: no patient IDs in logs): drop those element lines."""

    ELEMENT = re.compile(r"^\s*\([0-9A-Fa-f]{4},[0-9A-Fa-f]{4}\)")

    def filter(self, record: logging.LogRecord) -> bool:
        return not self.ELEMENT.match(str(record.msg) if not record.args else record.getMessage())


_ASSOCIATION_LOG = logging.getLogger("pynetdicom.association")
if not any(isinstance(f, _NoIdentifierDump) for f in _ASSOCIATION_LOG.filters):
    _ASSOCIATION_LOG.addFilter(_NoIdentifierDump())

#: the storage SOP classes a prior study's objects come back as: chest radiographs (CR, DX) and
#: reports (Basic Text, Enhanced, Comprehensive SR; Encapsulated PDF)
PRIOR_STORAGE_CLASSES = {
    "1.2.840.10008.5.1.4.1.1.1": "CR Image Storage",
    "1.2.840.10008.5.1.4.1.1.1.1": "Digital X-Ray Image Storage - For Presentation",
    "1.2.840.10008.5.1.4.1.1.1.1.1": "Digital X-Ray Image Storage - For Processing",
    "1.2.840.10008.5.1.4.1.1.88.11": "Basic Text SR Storage",
    "1.2.840.10008.5.1.4.1.1.88.22": "Enhanced SR Storage",
    "1.2.840.10008.5.1.4.1.1.88.33": "Comprehensive SR Storage",
    "1.2.840.10008.5.1.4.1.1.104.1": "Encapsulated PDF Storage",
}
REPORT_MODALITIES = ("SR", "DOC")
TRANSFER_SYNTAXES = [ExplicitVRLittleEndian, ImplicitVRLittleEndian]
#: C-STORE sub-operation refused: not the patient/study that was asked for (PS3.4 B.2.3, 0xCxxx)
REFUSED_NOT_REQUESTED = 0xC001
REFUSED_LIMIT = 0xA702  # out of resources: more instances than priors.max_instances


class QRError(RuntimeError):
    """A Query/Retrieve call failed; the message says why in plain words (no patient data)."""


@dataclass(frozen=True)
class StudyMatch:
    """One C-FIND STUDY answer."""

    study_instance_uid: str
    study_date: str = ""
    study_time: str = ""
    accession_number: str = ""
    study_description: str = ""
    modalities: tuple[str, ...] = ()
    patient_id: str = ""
    issuer_of_patient_id: str = ""

    @property
    def sort_key(self) -> tuple[str, str]:
        return (self.study_date, self.study_time.split(".")[0].ljust(6, "0"))


@dataclass(frozen=True)
class SeriesMatch:
    """One C-FIND SERIES answer."""

    series_instance_uid: str
    modality: str = ""
    body_part_examined: str = ""
    series_description: str = ""
    instances: int | None = None


@dataclass
class GetOutcome:
    """What a C-GET brought: sub-operation counts from the final response and what we refused."""

    completed: int = 0
    failed: int = 0
    warning: int = 0
    refused: list[str] = field(default_factory=list)  # reasons, one per refused object (UIDs only)
    status: int = 0


def _text(ds: Dataset, keyword: str) -> str:
    value = ds.get(keyword, "")
    if value is None:
        return ""
    if not isinstance(value, str) and hasattr(value, "__iter__"):
        return "\\".join(str(v) for v in value)
    return str(value).strip()


class QRSession:
    """One association to the Q/R SCP in ``config.priors.destination``; use as a context manager.
    Every call is bounded by ``priors.timeout_s``.

    ``on_instance(ds)`` is called from the association's thread for each object a C-GET sends;
    it returns ``None`` (stored: status 0x0000) or a reason to refuse it.

    Parameters
    ----------
    config:
        The configuration (``[priors]`` and ``[security]``).

    Raises
    ------
    QRError
        On entering, when the association is not accepted (a plain reason).
    """

    def __init__(self, config: Config) -> None:
        self.config = config
        self.ae_title, self.host, self.port = config.priors.parsed_destination()
        self.timeout = config.priors.timeout_s
        self.assoc: Any = None
        self._lock = threading.Lock()
        self._sink: Callable[[Dataset], str | None] | None = None
        self._expect: tuple[str, str, str] = ("", "", "")  # study UID, patient ID, issuer of the current C-GET
        self._received = 0
        self._limit = config.priors.max_instances
        self._refused: list[str] = []

    @property
    def peer(self) -> str:
        return f"{self.ae_title}@{self.host}:{self.port}"

    def __enter__(self) -> QRSession:
        ae = AE(ae_title=self.config.node.ae_title)
        ae.acse_timeout = self.timeout
        ae.dimse_timeout = self.timeout
        ae.network_timeout = self.timeout
        ae.connection_timeout = self.timeout
        ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
        ae.add_requested_context(StudyRootQueryRetrieveInformationModelGet)
        roles: list[Any] = []
        for uid in PRIOR_STORAGE_CLASSES:
            ae.add_requested_context(uid, TRANSFER_SYNTAXES)
            roles.append(build_role(uid, scp_role=True))
        try:
            assoc = ae.associate(self.host, self.port, ae_title=self.ae_title, ext_neg=roles,
                                 evt_handlers=[(evt.EVT_C_STORE, self._on_store)])
        except OSError as exc:
            raise QRError(f"cannot connect to the Q/R destination {self.peer}: {exc}") from exc
        if not assoc.is_established:
            what = ("rejected the association (does it know our AE title "
                    f"{self.config.node.ae_title}?)" if assoc.is_rejected
                    else "did not answer (connection refused, timed out or aborted)")
            raise QRError(f"the Q/R destination {self.peer} {what}")
        self.assoc = assoc
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.assoc is not None and self.assoc.is_established:
            try:
                self.assoc.release()
            except Exception:  # pragma: no cover - the peer went away; nothing to release
                self.assoc.abort()
        self.assoc = None

    # -- C-FIND ---------------------------------------------------------------------------------
    def _find(self, query: Dataset, what: str) -> list[Dataset]:
        if self.assoc is None or not self.assoc.is_established:
            raise QRError(f"{what}: the association with {self.peer} is closed")
        answers: list[Dataset] = []
        final: int | None = None
        for status, identifier in self.assoc.send_c_find(query, StudyRootQueryRetrieveInformationModelFind):
            if not status or "Status" not in status:
                raise QRError(f"{what}: no answer from {self.peer} within {self.timeout:g} s (timeout or abort)")
            code = int(status.Status)
            if code in (0xFF00, 0xFF01):
                if identifier is not None:
                    answers.append(identifier)
                continue
            final = code
        if final is None:
            raise QRError(f"{what}: {self.peer} ended without a final status")
        if final != 0x0000:
            raise QRError(f"{what}: {self.peer} answered status 0x{final:04X}")
        return answers

    def find_studies(self, patient_id: str, issuer_of_patient_id: str = "") -> list[StudyMatch]:
        """The patient's studies (STUDY level), newest first; answers of another issuer dropped."""
        if not patient_id:
            raise QRError("the current study has no Patient ID: nothing to query")
        q = Dataset()
        q.QueryRetrieveLevel = "STUDY"
        q.PatientID = patient_id
        q.IssuerOfPatientID = issuer_of_patient_id
        for kw in ("StudyInstanceUID", "StudyDate", "StudyTime", "AccessionNumber", "StudyDescription",
                   "ModalitiesInStudy"):
            setattr(q, kw, "")
        out = []
        for a in self._find(q, "C-FIND (study level)"):
            uid = _text(a, "StudyInstanceUID")
            pid = _text(a, "PatientID")
            issuer = _text(a, "IssuerOfPatientID")
            if not uid or (pid and pid != patient_id):
                continue
            if issuer and issuer_of_patient_id and issuer != issuer_of_patient_id:
                continue  # same ID, another issuing authority: another patient
            mods = a.get("ModalitiesInStudy", "") or ""
            mod_list = tuple(str(m) for m in (mods if not isinstance(mods, str) else mods.split("\\")) if m)
            out.append(StudyMatch(uid, _text(a, "StudyDate"), _text(a, "StudyTime"), _text(a, "AccessionNumber"),
                                  _text(a, "StudyDescription"), mod_list, pid, issuer))
        out.sort(key=lambda m: m.sort_key, reverse=True)
        return out

    def find_series(self, study_instance_uid: str) -> list[SeriesMatch]:
        """The series of one study (SERIES level)."""
        q = Dataset()
        q.QueryRetrieveLevel = "SERIES"
        q.StudyInstanceUID = study_instance_uid
        for kw in ("SeriesInstanceUID", "Modality", "BodyPartExamined", "SeriesDescription",
                   "NumberOfSeriesRelatedInstances"):
            setattr(q, kw, "")
        out = []
        for a in self._find(q, "C-FIND (series level)"):
            uid = _text(a, "SeriesInstanceUID")
            if not uid:
                continue
            n = a.get("NumberOfSeriesRelatedInstances", None)
            try:
                count = int(n) if n not in (None, "") else None
            except (TypeError, ValueError):
                count = None
            out.append(SeriesMatch(uid, _text(a, "Modality").upper(), _text(a, "BodyPartExamined").upper(),
                                   _text(a, "SeriesDescription"), count))
        return out

    # -- C-GET ----------------------------------------------------------------------------------
    def _on_store(self, event: Any) -> int:
        ds: Dataset = event.dataset
        ds.file_meta = event.file_meta
        study_uid, patient_id, issuer = self._expect
        sop_uid = _text(ds, "SOPInstanceUID")
        with self._lock:
            if self._sink is None:
                self._refused.append(f"{sop_uid!r}: not during a C-GET")
                return REFUSED_NOT_REQUESTED
            if self._received >= self._limit:
                self._refused.append(f"{sop_uid!r}: more than priors.max_instances ({self._limit})")
                return REFUSED_LIMIT
            if _text(ds, "StudyInstanceUID") != study_uid or _text(ds, "PatientID") != patient_id or (
                    issuer and _text(ds, "IssuerOfPatientID") not in ("", issuer)):
                self._refused.append(f"{sop_uid!r}: not of the queried patient and study")
                return REFUSED_NOT_REQUESTED
            if str(ds.get("SOPClassUID", "")) not in PRIOR_STORAGE_CLASSES:
                self._refused.append(f"{sop_uid!r}: SOP class {ds.get('SOPClassUID', '')!r} is not kept as a prior")
                return REFUSED_NOT_REQUESTED
            self._received += 1
            sink = self._sink
        try:
            reason = sink(ds)
        except Exception as exc:  # could not store it: out of resources for this sub-operation
            log.warning("prior object %r not stored: %s: %s", sop_uid, type(exc).__name__, exc)
            with self._lock:
                self._refused.append(f"{sop_uid!r}: not stored: {type(exc).__name__}")
            return 0xA700
        if reason:
            with self._lock:
                self._refused.append(f"{sop_uid!r}: {reason}")
            return REFUSED_NOT_REQUESTED
        return 0x0000

    def get_series(self, study_instance_uid: str, series_instance_uid: str, patient_id: str,
                   issuer_of_patient_id: str, on_instance: Callable[[Dataset], str | None]) -> GetOutcome:
        """C-GET one series; each object goes to ``on_instance`` (``None`` = stored, else why not)."""
        if self.assoc is None or not self.assoc.is_established:
            raise QRError(f"C-GET: the association with {self.peer} is closed")
        q = Dataset()
        q.QueryRetrieveLevel = "SERIES"
        q.StudyInstanceUID = study_instance_uid
        q.SeriesInstanceUID = series_instance_uid
        with self._lock:
            if self._expect[0] != study_instance_uid:  # priors.max_instances counts per prior study
                self._received = 0
            self._sink, self._expect, self._refused = on_instance, (study_instance_uid, patient_id,
                                                                    issuer_of_patient_id), []
        out = GetOutcome()
        final: Dataset | None = None
        try:
            for status, _identifier in self.assoc.send_c_get(q, StudyRootQueryRetrieveInformationModelGet):
                if not status or "Status" not in status:
                    raise QRError(f"C-GET: no answer from {self.peer} within {self.timeout:g} s (timeout or abort)")
                if int(status.Status) not in (0xFF00,):
                    final = status
        finally:
            with self._lock:
                self._sink = None
                out.refused = list(self._refused)
        if final is None:
            raise QRError(f"C-GET: {self.peer} ended without a final status")
        out.status = int(final.Status)
        out.completed = int(final.get("NumberOfCompletedSuboperations", 0) or 0)
        out.failed = int(final.get("NumberOfFailedSuboperations", 0) or 0)
        out.warning = int(final.get("NumberOfWarningSuboperations", 0) or 0)
        if out.status not in (0x0000, 0xB000) and not out.completed and not out.refused:
            raise QRError(f"C-GET: {self.peer} answered status 0x{out.status:04X} and sent nothing")
        return out
