"""The report as a DICOM Structured Report, built with highdicom content items and templates.

Both documents are Comprehensive SR (PS3.3 A.35.3) following TID 2000 "Basic Diagnostic
Imaging Report" (PS3.16):

- root CONTAINER (18748-4, LN, "Diagnostic Imaging Report"), template 2000;
- HAS CONCEPT MOD Language of Content Item and Descendants (TID 1204): English;
- HAS OBS CONTEXT Observation Context (TID 1001): the device (TID 1004: UID, name,
  manufacturer, model name = the report model and its version) and, once signed, the person
  (TID 1003: the verifying radiologist and organisation);
- HAS CONCEPT MOD Procedure reported: (399208008, SCT, "Plain chest X-ray");
- CONTAINS sections (TID 2001 headings, CID 7001), each a TID 2002 report narrative:
  Indications for Procedure (121109), Findings (121070: the text as TEXT "Finding" 121071,
  the CheXpert-style observations as SNOMED CT coded items whose value is Present / Absent /
  Indeterminate, and the source images as IMAGE references), Impressions (121072: TEXT
  "Impression" 121073);
- when priors are on (``[priors]``), a CONTAINS CONTAINER (121066, DCM, "Prior Procedure
  Descriptions") (CID 7001) whose HAS OBS CONTEXT (TID 2000 row 9 -> TID 1001 -> TID 1005
  Procedure Context) names the compared prior: UIDREF (121018, DCM, "Procedure Study Instance
  UID") and TEXT (121022, DCM, "Accession Number"), and whose TEXT (121065, DCM, "Procedure
  Description") says the date, the prior's report and that the model does not use priors yet.

The source images are also listed in the Current Requested Procedure Evidence Sequence
(PS3.3 C.17.2), same patient and study as the images, in a new series.

The draft is CompletionFlag PARTIAL, VerificationFlag UNVERIFIED, PreliminaryFlag PRELIMINARY,
and says in its text that it is an unverified AI draft. The signed report is COMPLETE,
VERIFIED, FINAL, with the Verifying Observer Sequence and a Predecessor Documents Sequence
(C.17.2.3) pointing at the draft. UIDs are ``2.25.`` + the integer of a uuid5 of the inputs,
so building the same document twice gives the same UIDs.
"""

from __future__ import annotations

import datetime as dt
import uuid
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import highdicom as hd
from highdicom.sr import (
    CodeContentItem,
    CodedConcept,
    ContainerContentItem,
    DeviceObserverIdentifyingAttributes,
    ImageContentItem,
    LanguageOfContentItemAndDescendants,
    ObservationContext,
    ObserverContext,
    PersonObserverIdentifyingAttributes,
    RelationshipTypeValues,
    TextContentItem,
    UIDRefContentItem,
)
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.sr.codedict import codes
from pydicom.valuerep import DT

CONTAINS = RelationshipTypeValues.CONTAINS
HAS_CONCEPT_MOD = RelationshipTypeValues.HAS_CONCEPT_MOD
HAS_OBS_CONTEXT = RelationshipTypeValues.HAS_OBS_CONTEXT

def _quiet_person_name_warning() -> None:
    """highdicom warns about a one-component person name by quoting it whole (the patient's
    name, to stderr, at any log level): drop that warning (issue 13, no PHI in logs). A filter,
    not ``catch_warnings``, which is process-global and not thread-safe; re-installed before
    each build because another thread's ``catch_warnings`` exit may have dropped it."""
    warnings.filterwarnings("ignore", message=r"(?s)The string .* is unlikely to represent the intended person name",
                            category=UserWarning)


_quiet_person_name_warning()

UID_NAMESPACE = uuid.UUID("4f6d1a52-8c1e-5b8e-9a43-6e0c2d7f1b11")  # cxrnode's uuid5 namespace
COMPREHENSIVE_SR = "1.2.840.10008.5.1.4.1.1.88.33"

DOCUMENT_TITLE = CodedConcept("18748-4", "LN", "Diagnostic Imaging Report")
LANGUAGE = CodedConcept("en-US", "RFC5646", "English (United States)")
PROCEDURE_REPORTED = CodedConcept("121058", "DCM", "Procedure reported")
PLAIN_CHEST_XRAY = CodedConcept("399208008", "SCT", "Plain chest X-ray")
INDICATIONS = CodedConcept("121109", "DCM", "Indications for Procedure")
FINDINGS = CodedConcept("121070", "DCM", "Findings")
FINDING = CodedConcept("121071", "DCM", "Finding")
IMPRESSIONS = CodedConcept("121072", "DCM", "Impressions")
IMPRESSION = CodedConcept("121073", "DCM", "Impression")
COMMENT = CodedConcept("121106", "DCM", "Comment")
SOURCE_IMAGE = CodedConcept("121324", "DCM", "Source image")
#: the comparison (CID 7001 heading; TID 1005 procedure context; CID 7002 element)
PRIOR_PROCEDURES = CodedConcept("121066", "DCM", "Prior Procedure Descriptions")
PROCEDURE_STUDY_UID = CodedConcept("121018", "DCM", "Procedure Study Instance UID")
ACCESSION_NUMBER = CodedConcept("121022", "DCM", "Accession Number")
PROCEDURE_DESCRIPTION = CodedConcept("121065", "DCM", "Procedure Description")
PRESENCE_CODES = {
    "present": CodedConcept("121053", "DCM", "Present"),
    "absent": CodedConcept("121054", "DCM", "Absent"),
    "uncertain": CodedConcept("82334004", "SCT", "Indeterminate"),
}

#: the coded statement of a withheld draft (private scheme, PS3.16 8.2: "99" prefix)
DRAFT_WITHHELD = CodedConcept("CXRN-WITHHELD", "99CXRNODE", "AI draft withheld")
#: the coded statement of a report written from the images with no AI draft (drafting failed,
#: the study was skipped, or its draft rejected): private scheme, like DRAFT_WITHHELD
NO_AI_DRAFT = CodedConcept("CXRN-NO-AI", "99CXRNODE", "No AI draft: reported from the images")

# Sections added after signing (issue 17). PS3.16 CID 7001 "Diagnostic Imaging Report Heading"
# lists both as LOINC codes (DCM 121078 "Addendum" is the older, retired heading code);
# PS3.20 9.8.10 uses 73568-8 for the "Communication of Actionable Results" section.
ADDENDUM = CodedConcept("55107-7", "LN", "Addendum")
CRITICAL_RESULTS = CodedConcept("73568-8", "LN", "Communication of Critical Results")
#: the coded communication item: DCM "Results communicated", valued with how it was done
RESULTS_COMMUNICATED = CodedConcept("121291", "DCM", "Results communicated")
#: how a critical result was communicated. No standard code set exists for the method (PS3.20
#: 9.8.10 / RSNA template 297 give plain words: discussed directly, by telephone, described in
#: a message), so the values are private (99CXRNODE) with those words as meanings
COMMUNICATION_METHODS = {
    "telephone": CodedConcept("CXRN-COMM-PHONE", "99CXRNODE", "Discussed by telephone"),
    "in_person": CodedConcept("CXRN-COMM-DIRECT", "99CXRNODE", "Discussed directly in person"),
    "secure_message": CodedConcept("CXRN-COMM-MSG", "99CXRNODE", "Described in a secure message"),
}
#: who was told and when (private concept names: DICOM has none for these)
RECIPIENT = CodedConcept("CXRN-RECIPIENT", "99CXRNODE", "Person told of the critical result")
RECIPIENT_ROLE = CodedConcept("CXRN-RCPT-ROLE", "99CXRNODE", "Role of the person told")
COMMUNICATED_AT = CodedConcept("CXRN-COMM-DT", "99CXRNODE", "DateTime the critical result was told")

MANUFACTURER = "cxrnode"
DRAFT_SERIES_NUMBER = 9901
SIGNED_SERIES_NUMBER = 9902
DRAFT_SERIES_DESCRIPTION = "AI DRAFT report - UNVERIFIED"
SIGNED_SERIES_DESCRIPTION = "Verified report"


class SRError(ValueError):
    """The inputs cannot make a valid report; the message says which and why."""


def deterministic_uid(*parts: str) -> str:
    """A deterministic UID: ``2.25.`` + the integer value of uuid5(cxrnode namespace, parts
    joined) (PS3.5 B.2), so a re-run of the same job writes the same objects.

    Parameters
    ----------
    *parts:
        The inputs that identify the object.

    Returns
    -------
    str
        The UID (at most 64 characters).
    """
    name = "\x1f".join(parts)
    return f"2.25.{uuid.uuid5(UID_NAMESPACE, name).int}"


def _software_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("cxrnode")
    except PackageNotFoundError:  # pragma: no cover - running from a source tree
        return "0"


@dataclass(frozen=True)
class CodedObservation:
    """One CheXpert-style observation found in the report text, SNOMED CT coded."""

    name: str  # e.g. "Pleural Effusion"
    code: str  # SNOMED CT concept id
    meaning: str
    presence: str  # "present", "absent" or "uncertain"

    def __post_init__(self) -> None:
        if self.presence not in PRESENCE_CODES:
            raise SRError(f"observation {self.name!r}: presence must be present, absent or uncertain, got {self.presence!r}")


def coded_observations(text: str) -> tuple[CodedObservation, ...]:
    """The observations ``onnx_models.labels.label`` finds in ``text``, in CheXpert order."""
    from onnx_models import labels as labeller

    labels = labeller.label(text)
    out = []
    for name in labeller.OBSERVATIONS:
        if name in labels:
            code, meaning = labeller.SNOMED[name]
            out.append(CodedObservation(name, code, meaning, labels[name].value))
    return tuple(out)


@dataclass(frozen=True)
class PriorComparison:
    """The prior study shown for comparison (the "Prior Procedure Descriptions" section, DCM
    121066); without ``study_instance_uid`` the section only says why there is none.

    Attributes
    ----------
    description:
        What the section says (the prior's description, or why there is none).
    study_instance_uid, study_date, accession_number:
        The prior study's identifiers (empty when there is none).
    """

    description: str
    study_instance_uid: str = ""
    study_date: str = ""
    accession_number: str = ""


@dataclass(frozen=True)
class DraftContent:
    """What the draft says and who (which model) said it: the input of :func:`build_draft_sr`.

    Attributes
    ----------
    findings, impression:
        The generated text.
    indication:
        The clinical indication for people (cleaned), written as "Indications for Procedure".
    model_name, model_version:
        The model, written as the device observer.
    observations:
        Coded findings (SNOMED CT) derived from the text.
    institution_name:
        Written as Institution Name.
    created_at:
        ContentDate/Time (``None``: now).
    withheld_reason:
        The input gate withheld the draft: no generated findings; the Findings section says so
        (coded ``DRAFT_WITHHELD`` with this sentence as a Comment).
    notes:
        Plain sentences about the input (views not used and why), Comments in Findings.
    prior:
        The prior compared (or why none), when priors are on.
    """

    findings: str
    impression: str
    indication: str = ""
    model_name: str = ""
    model_version: str = ""
    observations: tuple[CodedObservation, ...] = ()
    institution_name: str = ""
    created_at: dt.datetime | None = None  # ContentDate/Time; None = now
    #: the input gate withheld the draft: no generated findings; the Findings section says
    #: so (coded DRAFT_WITHHELD + this sentence as a Comment)
    withheld_reason: str = ""
    #: plain sentences about the input (views not used and why), Comments in Findings
    notes: tuple[str, ...] = ()
    #: the prior compared (or why none), when priors are on
    prior: PriorComparison | None = None


def spoken_name(pn: str) -> str:
    """A DICOM PN as it is said: ``Moreau^Alice^^Dr`` -> ``Dr Alice Moreau`` (free text unchanged)."""
    parts = (str(pn).split("=")[0].split("^") + [""] * 5)[:5]
    family, given, middle, prefix, suffix = (p.strip() for p in parts)
    return " ".join(p for p in (prefix, given, middle, family, suffix) if p)


@dataclass(frozen=True)
class CriticalCommunication:
    """A critical result told to a clinician at signing: who (name and role), how, when. Written
    into the verified SR as the "Communication of Critical Results" section (LN 73568-8) with a
    coded "Results communicated" item.

    Attributes
    ----------
    recipient:
        Name of the person told (required, at most 200 characters).
    role:
        Their role (required, at most 64 characters).
    method:
        A key of :data:`COMMUNICATION_METHODS`.
    communicated_at:
        When, timezone-aware (a naive time is taken as local).
    communicated_by:
        The radiologist who told them (display name).

    Raises
    ------
    SRError
        On construction, when a required value is missing, too long or not known.
    """

    recipient: str
    role: str
    method: str
    communicated_at: dt.datetime
    communicated_by: str = ""  # the radiologist who told them (display name)

    def __post_init__(self) -> None:
        if not self.recipient.strip():
            raise SRError("critical result: the name of the person told is required")
        if not self.role.strip():
            raise SRError("critical result: the role of the person told is required")
        if self.method not in COMMUNICATION_METHODS:
            raise SRError(f"critical result: method must be one of {', '.join(COMMUNICATION_METHODS)}, "
                          f"got {self.method!r}")
        if len(self.recipient) > 200 or len(self.role) > 64:
            raise SRError("critical result: the name (200) or role (64 characters) is too long")

    def sentence(self) -> str:
        """The narrative line (PS3.20 9.8.10: by whom, to whom, how, at what date/time)."""
        how = {"telephone": "discussed by telephone with", "in_person": "discussed in person with",
               "secure_message": "described in a secure message to"}[self.method]
        when = self.communicated_at if self.communicated_at.tzinfo else self.communicated_at.astimezone()
        by = f" by {spoken_name(self.communicated_by)}" if self.communicated_by.strip() else ""
        return (f"Critical result {how} {self.recipient.strip()} ({self.role.strip()}) "
                f"on {when:%Y-%m-%d} at {when:%H:%M} (UTC{when:%z}){by}.")


@dataclass(frozen=True)
class AddendumText:
    """One addendum of a verified report, as read back by :func:`read_report`.

    Attributes
    ----------
    text:
        The addendum's text.
    author:
        Who added it (Verifying Observer Name).
    added_at:
        When (timezone-aware).
    """

    text: str
    author: str
    added_at: dt.datetime

    def byline(self) -> str:
        when = self.added_at if self.added_at.tzinfo else self.added_at.astimezone()
        return f"Addendum by {spoken_name(self.author)} on {when:%Y-%m-%d %H:%M} (UTC{when:%z})."


@dataclass(frozen=True)
class ReportText:
    """A report read back from an SR by :func:`read_report`: the text, the coded observations and
    the flags.

    Attributes
    ----------
    sop_instance_uid:
        The SR's SOP Instance UID.
    indication, findings, impression:
        The report's sections as text.
    comments:
        Comment items (e.g. why a draft was withheld).
    observations:
        The coded findings.
    completion_flag, verification_flag, preliminary_flag:
        The SR's flags (PS3.3 C.17.2).
    verifying_observer:
        Who signed (empty for a draft).
    predecessors:
        SOP Instance UIDs in the Predecessor Documents Sequence.
    source_images:
        SOP Instance UIDs of the images the report is about.
    device_model:
        The drafting model (device observer), empty when none.
    critical:
        The communication of a critical result recorded at signing (``None``: none recorded).
    addenda:
        The addenda, oldest first.
    no_ai_draft:
        The report was written from the images with no AI draft (``NO_AI_DRAFT``).
    prior:
        The prior compared ("Prior Procedure Descriptions"); ``None``: no such section.
    """

    sop_instance_uid: str
    indication: str
    findings: str
    impression: str
    comments: tuple[str, ...]
    observations: tuple[CodedObservation, ...]
    completion_flag: str
    verification_flag: str
    preliminary_flag: str
    verifying_observer: str
    predecessors: tuple[str, ...]
    source_images: tuple[str, ...]
    device_model: str
    #: the communication of a critical result recorded at signing (None: none recorded)
    critical: CriticalCommunication | None = None
    #: the addenda, oldest first
    addenda: tuple[AddendumText, ...] = ()
    #: the report was written from the images with no AI draft (NO_AI_DRAFT)
    no_ai_draft: bool = False
    #: the prior compared ("Prior Procedure Descriptions"); None: no such section
    prior: PriorComparison | None = None


def draft_notice(model_name: str, model_version: str) -> str:
    who = f"{model_name} {model_version}".strip() or "an AI model"
    return (f"AI-GENERATED DRAFT by {who}: UNVERIFIED, PRELIMINARY. Not reviewed by a radiologist; "
            "not for clinical use until verified. Research use only.")


def withheld_notice(reason: str) -> str:
    """The plain sentence of a withheld draft (the reviewer reports from scratch)."""
    return (f"AI draft withheld: {reason.rstrip('.')}. No findings were generated; "
            "a radiologist must report this study.")


def _device_context(model_name: str, model_version: str) -> ObserverContext:
    """TID 1002 with TID 1004: the report-generation software as the observing device."""
    model = f"{model_name} {model_version}".strip() or "unknown model"
    return ObserverContext(
        observer_type=codes.cid270.Device,
        observer_identifying_attributes=DeviceObserverIdentifyingAttributes(
            uid=deterministic_uid("device", MANUFACTURER, model_name, model_version),
            name=f"{MANUFACTURER} report drafting",
            manufacturer_name=MANUFACTURER,
            model_name=model[:64],
        ),
    )


def _person_context(name: str, organisation: str) -> ObserverContext:
    return ObserverContext(
        observer_type=codes.cid270.Person,
        observer_identifying_attributes=PersonObserverIdentifyingAttributes(
            name=name, organization_name=organisation or None
        ),
    )


def _text(name: CodedConcept, value: str) -> TextContentItem:
    return TextContentItem(name=name, value=value, relationship_type=CONTAINS)


def _section(heading: CodedConcept, children: list[Any]) -> ContainerContentItem:
    """A CONTAINS container (a report section under a CID 7001 heading) holding ``children``."""
    section = ContainerContentItem(name=heading, relationship_type=CONTAINS)
    section.ContentSequence = DicomSequence(children)
    return section


def _content_tree(
    *,
    indication: str,
    findings: str,
    impression: str,
    comments: Sequence[str],
    observations: Sequence[CodedObservation],
    withheld: bool = False,
    images: Sequence[tuple[str, str]],
    model_name: str,
    model_version: str,
    verifier: tuple[str, str] | None,
    no_ai_draft: bool = False,
    critical: CriticalCommunication | None = None,
    addenda: Sequence[AddendumText] = (),
    prior: PriorComparison | None = None,
) -> ContainerContentItem:
    root = ContainerContentItem(name=DOCUMENT_TITLE, template_id="2000")
    items: list[Any] = []
    items.extend(LanguageOfContentItemAndDescendants(LANGUAGE))
    person = _person_context(*verifier) if verifier else None
    device = None if no_ai_draft else _device_context(model_name, model_version)  # no model wrote it
    items.extend(ObservationContext(observer_person_context=person, observer_device_context=device))
    items.append(CodeContentItem(name=PROCEDURE_REPORTED, value=PLAIN_CHEST_XRAY, relationship_type=HAS_CONCEPT_MOD))

    if indication:
        items.append(_section(INDICATIONS, [_text(INDICATIONS, indication)]))

    if prior is not None:
        items.append(_comparison_section(prior))

    children: list[Any] = [_text(COMMENT, c) for c in comments if c]
    if withheld:
        children.insert(0, CodeContentItem(name=FINDING, value=DRAFT_WITHHELD, relationship_type=CONTAINS))
    if no_ai_draft:
        children.insert(0, CodeContentItem(name=FINDING, value=NO_AI_DRAFT, relationship_type=CONTAINS))
    if findings:
        children.append(_text(FINDING, findings))
    for obs in observations:
        children.append(CodeContentItem(
            name=CodedConcept(obs.code, "SCT", obs.meaning),
            value=PRESENCE_CODES[obs.presence],
            relationship_type=CONTAINS,
        ))
    for sop_class, sop_uid in images:
        children.append(ImageContentItem(
            name=SOURCE_IMAGE,
            referenced_sop_class_uid=sop_class,
            referenced_sop_instance_uid=sop_uid,
            relationship_type=CONTAINS,
        ))
    if children:
        items.append(_section(FINDINGS, children))

    if impression:
        items.append(_section(IMPRESSIONS, [_text(IMPRESSION, impression)]))
    if critical is not None:
        items.append(_critical_section(critical))
    for addendum in addenda:
        items.append(_section(ADDENDUM, [_text(ADDENDUM, addendum.text), _text(COMMENT, addendum.byline())]))
    root.ContentSequence = DicomSequence(items)
    return root


def _comparison_section(prior: PriorComparison) -> ContainerContentItem:
    """TID 2000 rows 8-10: a CID 7001 heading with its own observation context (TID 1005:
    the prior's Study Instance UID and accession number) and a TID 2002 narrative."""
    children: list[Any] = []
    if prior.study_instance_uid:
        children.append(UIDRefContentItem(name=PROCEDURE_STUDY_UID, value=prior.study_instance_uid,
                                          relationship_type=HAS_OBS_CONTEXT))
        if prior.accession_number:
            children.append(TextContentItem(name=ACCESSION_NUMBER, value=prior.accession_number,
                                            relationship_type=HAS_OBS_CONTEXT))
    children.append(_text(PROCEDURE_DESCRIPTION, _check_text("prior description", prior.description)))
    return _section(PRIOR_PROCEDURES, children)


def _critical_section(c: CriticalCommunication) -> ContainerContentItem:
    """TID 2001 section "Communication of Critical Results" (LN 73568-8, CID 7001): the narrative
    (PS3.20 9.8.10) and the coded item: DCM 121291 "Results communicated" = how, with who was told,
    their role and when."""
    from highdicom.sr import DateTimeContentItem

    when = c.communicated_at if c.communicated_at.tzinfo else c.communicated_at.astimezone()
    when = when.replace(microsecond=0)
    if not when.utcoffset():  # DCMTK refuses the offset "+0000": a DT without one is the writer's local time
        when = when.replace(tzinfo=None)
    return _section(CRITICAL_RESULTS, [
        _text(CRITICAL_RESULTS, c.sentence()),
        CodeContentItem(name=RESULTS_COMMUNICATED, value=COMMUNICATION_METHODS[c.method], relationship_type=CONTAINS),
        _text(RECIPIENT, c.recipient.strip()),
        _text(RECIPIENT_ROLE, c.role.strip()),
        DateTimeContentItem(name=COMMUNICATED_AT, value=DT(when), relationship_type=CONTAINS),
    ])


_PATIENT_STUDY = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "AccessionNumber",
                  "StudyID", "StudyDate", "StudyTime", "ReferringPhysicianName", "StudyInstanceUID")


def _evidence_stub(src: Any, first: bool) -> Dataset:
    """The attributes highdicom reads from an evidence dataset (Type 2 ones default to empty)."""
    ev = Dataset()
    for kw in ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID"):
        value = src.get(kw, None)
        if not value:
            raise SRError(f"source image lacks {kw}")
        setattr(ev, kw, value)
    if first:
        for kw in _PATIENT_STUDY:
            value = src.get(kw, "") or ""
            # Type 2 in the SR: an invalid value (e.g. a date as 2011-03-24) is sent empty
            setattr(ev, kw, value if kw == "StudyInstanceUID" or _valid(kw, value) else "")
        for kw in ("PatientAge", "PatientSize", "PatientWeight", "IssuerOfPatientID", "OtherPatientIDs",
                   "StudyDescription", "PatientComments", "EthnicGroup"):
            value = src.get(kw, None)
            if value not in (None, "") and _valid(kw, value):  # optional: an invalid value is left out
                setattr(ev, kw, value)
    return ev


def _valid(keyword: str, value: Any) -> bool:
    """Whether ``value`` is valid for the attribute's VR (PS3.5 6.2); sources are often not."""
    from pydicom import config
    from pydicom.datadict import dictionary_VR
    from pydicom.valuerep import validate_value

    if value in (None, ""):
        return True
    vr = dictionary_VR(keyword)
    values = value if isinstance(value, list | tuple) or type(value).__name__ == "MultiValue" else [value]
    try:
        for v in values:
            if isinstance(v, int | float):  # DS/IS/US already parsed: a number is valid
                continue
            validate_value(vr, v if isinstance(v, str | bytes) else str(v), config.RAISE)
    except (ValueError, TypeError):
        return False
    return True


def _check_text(what: str, text: str) -> str:
    text = (text or "").replace("\r\n", "\n").strip()
    if len(text) > 65535:  # UT: 2^32-2, but a report beyond this is a bug upstream
        raise SRError(f"{what}: {len(text)} characters is too long for a report")
    return text


def build_draft_sr(sources: Sequence[Any], content: DraftContent) -> Dataset:
    """The draft SR (UNVERIFIED, PARTIAL, PRELIMINARY; TID 2000 with highdicom) for the images the
    model read. The SOP Instance UID is uuid5(study, model name, model version, sorted source
    SOP Instance UIDs): re-running the same job yields the same UID.

    Parameters
    ----------
    sources:
        The source image datasets (headers suffice), all of one study.
    content:
        What the draft says and which model said it.

    Returns
    -------
    pydicom.Dataset
        The Comprehensive SR, in the draft series.

    Raises
    ------
    SRError
        No source image, sources of several studies, or no text (a withheld draft must have
        none).
    """
    study_uid = _one_study(sources, "a draft needs at least one source image")
    findings = _check_text("findings", content.findings)
    impression = _check_text("impression", content.impression)
    indication = _check_text("indication", content.indication)
    withheld = _check_text("withheld reason", content.withheld_reason)
    if withheld and (findings or impression):
        raise SRError("a withheld draft carries no generated findings or impression")
    if not findings and not impression and not withheld:
        raise SRError("the generated report is empty (no findings, no impression)")
    source_uids = sorted(str(s.SOPInstanceUID) for s in sources)
    sop_uid = deterministic_uid("draft", study_uid, content.model_name, content.model_version, *source_uids,
                                *(["withheld"] if withheld else []),
                                *([f"prior:{content.prior.study_instance_uid}"]
                                  if content.prior and content.prior.study_instance_uid else []))
    evidence = [_evidence_stub(s, i == 0) for i, s in enumerate(sources)]
    images = [(str(s.SOPClassUID), str(s.SOPInstanceUID)) for s in sources]
    tree = _content_tree(
        indication=indication, findings=findings, impression=impression,
        comments=[withheld_notice(withheld) if withheld else draft_notice(content.model_name, content.model_version),
                  *(_check_text("note", n) for n in content.notes)],
        observations=() if withheld else content.observations, images=images,
        model_name=content.model_name, model_version=content.model_version, verifier=None,
        withheld=bool(withheld), prior=content.prior,
    )
    return _unverified_sr(evidence, tree, study_uid=study_uid, sop_uid=sop_uid,
                          created=content.created_at or dt.datetime.now(dt.UTC).astimezone(),
                          institution_name=content.institution_name, series_description=DRAFT_SERIES_DESCRIPTION,
                          model_name_attr=(content.model_name or "report model")[:64],
                          software_versions=_versions(content.model_name, content.model_version))


def _one_study(sources: Sequence[Any], none_given: str) -> str:
    """The one study of ``sources`` (a report covers one study); quiets highdicom's name warning."""
    if not sources:
        raise SRError(none_given)
    _quiet_person_name_warning()
    studies = {str(s.StudyInstanceUID) for s in sources}
    if len(studies) != 1:
        raise SRError(f"source images belong to {len(studies)} studies; a report covers one study")
    return studies.pop()


def _unverified_sr(evidence: list[Dataset], tree: Any, *, study_uid: str, sop_uid: str, created: dt.datetime,
                   institution_name: str, series_description: str, model_name_attr: str,
                   software_versions: Any) -> Dataset:
    """A draft SR (PARTIAL, UNVERIFIED, PRELIMINARY) in the draft series of the study, with the
    source images as ``evidence`` (the first carries patient and study)."""
    sr = hd.sr.ComprehensiveSR(
        evidence=evidence,
        content=tree,
        series_instance_uid=deterministic_uid("draft-series", study_uid),
        series_number=DRAFT_SERIES_NUMBER,
        sop_instance_uid=sop_uid,
        instance_number=1,
        manufacturer=MANUFACTURER,
        is_complete=False,
        is_final=False,
        is_verified=False,
        institution_name=institution_name or None,
        series_description=series_description,
        manufacturer_model_name=model_name_attr,
        software_versions=software_versions,
        content_date=created.date(),
        content_time=created.time().replace(tzinfo=None),
        specific_character_set="ISO_IR 192",
    )
    return _finish(sr)


def _versions(model_name: str, model_version: str) -> Any:
    return [f"cxrnode {_software_version()}"[:64], f"{model_name} {model_version}".strip()[:64] or "unknown"]


def _finish(sr: Any) -> Dataset:
    """A plain pydicom Dataset with file meta, ready for Store.write_dataset / C-STORE."""
    ds = Dataset()
    ds.update(sr)
    ds.file_meta = sr.file_meta
    ds.preamble = b"\x00" * 128
    return ds


def _references(draft: Any) -> list[Dataset]:
    """Evidence stubs for the images the draft references (its CRPE sequence)."""
    refs: list[Dataset] = []
    for study_item in draft.get("CurrentRequestedProcedureEvidenceSequence", None) or ():
        for series_item in study_item.ReferencedSeriesSequence:
            for inst in series_item.ReferencedSOPSequence:
                ev = Dataset()
                ev.SOPClassUID = inst.ReferencedSOPClassUID
                ev.SOPInstanceUID = inst.ReferencedSOPInstanceUID
                ev.StudyInstanceUID = study_item.StudyInstanceUID
                ev.SeriesInstanceUID = series_item.SeriesInstanceUID
                refs.append(ev)
    return refs


def build_signed_sr(
    draft: Dataset,
    findings: str,
    impression: str,
    verifier_name: str,
    verifier_org: str,
    signed_at: dt.datetime,
    critical: CriticalCommunication | None = None,
) -> Dataset:
    """The verified SR (VERIFIED, COMPLETE, FINAL) that replaces ``draft`` with the edited text.

    Verifying Observer Sequence (PS3.3 C.17.2): ``verifier_name`` (PN), ``verifier_org``,
    VerificationDateTime = ``signed_at``; Predecessor Documents Sequence -> the draft. The
    coded observations are re-derived from the edited text. The SOP Instance UID is uuid5 of
    the draft's UID, the text, the verifier and the time. A draft marked :data:`NO_AI_DRAFT`
    (reported from scratch) gives a report with no device observer.

    Parameters
    ----------
    draft:
        The draft SR being signed.
    findings, impression:
        The text as the radiologist signs it.
    verifier_name:
        Verifying Observer Name (PN, e.g. ``Doe^Jane``).
    verifier_org:
        Verifying Organization.
    signed_at:
        VerificationDateTime (timezone-aware).
    critical:
        A critical result told at signing, written as the "Communication of Critical Results"
        section.

    Returns
    -------
    pydicom.Dataset
        The verified Comprehensive SR, in the signed series.

    Raises
    ------
    SRError
        The draft is not a Comprehensive SR or references no images, the verifier's name or
        organisation is missing, or the report is empty.
    """
    if str(draft.get("SOPClassUID", "")) != COMPREHENSIVE_SR or "ContentSequence" not in draft:
        raise SRError("the draft is not a Comprehensive SR document")
    _quiet_person_name_warning()
    _check_verifier(verifier_name, verifier_org, "the verifying observer's name is required")
    findings = _check_text("findings", findings)
    impression = _check_text("impression", impression)
    if not findings and not impression:
        raise SRError("the report is empty (no findings, no impression)")
    if signed_at.tzinfo is None:
        signed_at = signed_at.astimezone()
    before = read_report(draft)
    evidence, images = _verified_evidence(draft, "the draft")
    draft_uid = str(draft.SOPInstanceUID)
    sop_uid = deterministic_uid("signed", draft_uid, findings, impression, verifier_name, verifier_org,
                                signed_at.isoformat(),
                                *(("critical", critical.sentence()) if critical is not None else ()))
    model_name, _, model_version = before.device_model.rpartition(" ")
    tree = _content_tree(
        indication=before.indication, findings=findings, impression=impression,
        comments=[_signed_comment(before, draft_uid, verifier_name)],
        observations=coded_observations(f"{findings}\n{impression}"), images=images,
        model_name=model_name, model_version=model_version,
        verifier=(verifier_name, verifier_org), no_ai_draft=before.no_ai_draft, critical=critical,
        prior=before.prior,
    )
    return _verified_sr(draft, evidence, tree, sop_uid=sop_uid, instance_number=1,
                        verifier=(verifier_name, verifier_org), at=signed_at, model=(model_name, model_version))


def _check_verifier(name: str, organisation: str, name_missing: str) -> None:
    """The verifying observer (PS3.3 C.17.2) needs a name and an organisation."""
    if not name or not name.strip():
        raise SRError(name_missing)
    if not organisation or not organisation.strip():
        raise SRError("the verifying organisation is required")


def _verified_evidence(predecessor: Dataset, what: str) -> tuple[list[Dataset], list[tuple[str, str]]]:
    """The evidence of a verified SR that follows ``predecessor`` (the images it references; the
    first carries patient and study, taken from ``predecessor`` itself) and those images as
    (SOP Class UID, SOP Instance UID) for the content tree."""
    refs = _references(predecessor)
    if not refs:
        raise SRError(f"{what} references no source images")
    first = _evidence_stub(predecessor, True)
    for kw in ("SOPClassUID", "SOPInstanceUID", "SeriesInstanceUID"):
        setattr(first, kw, getattr(refs[0], kw))
    return [first, *refs[1:]], [(str(r.SOPClassUID), str(r.SOPInstanceUID)) for r in refs]


def _signed_comment(before: ReportText, draft_uid: str, verifier_name: str) -> str:
    """Who drafted and who verified the report (one Comment of the verified SR)."""
    if before.no_ai_draft:
        return f"Reported from the images by {spoken_name(verifier_name)}; no AI draft was used."
    who = str(verifier_name).replace('^', ' ').strip()
    return (f"Drafted by {before.device_model or 'an AI model'} (draft SR {draft_uid}); "
            f"reviewed and verified by {who}.")


def _verified_sr(predecessor: Dataset, evidence: list[Dataset], tree: Any, *, sop_uid: str, instance_number: int,
                 verifier: tuple[str, str], at: dt.datetime, model: tuple[str, str]) -> Dataset:
    """A verified SR (COMPLETE, VERIFIED, FINAL; VerificationDateTime = ``at``) in the signed
    series of the study, with Predecessor Documents -> ``predecessor``: the signed report and its
    addenda alike."""
    verifier_name, verifier_org = verifier
    sr = hd.sr.ComprehensiveSR(
        evidence=evidence,
        content=tree,
        series_instance_uid=deterministic_uid("signed-series", str(predecessor.StudyInstanceUID)),
        series_number=SIGNED_SERIES_NUMBER,
        sop_instance_uid=sop_uid,
        instance_number=instance_number,
        manufacturer=MANUFACTURER,
        is_complete=True,
        is_final=True,
        is_verified=True,
        verifying_observer_name=verifier_name,
        verifying_organization=verifier_org.strip()[:64],  # LO
        institution_name=str(predecessor.get("InstitutionName", "") or "") or None,
        previous_versions=[predecessor],
        series_description=SIGNED_SERIES_DESCRIPTION,
        manufacturer_model_name=str(predecessor.get("ManufacturerModelName", "") or "report model"),
        software_versions=_versions(*model),
        content_date=at.date(),
        content_time=at.time().replace(tzinfo=None),
        specific_character_set="ISO_IR 192",
    )
    sr.VerifyingObserverSequence[0].VerificationDateTime = DT(at)
    return _finish(sr)


def build_no_ai_draft_sr(sources: Sequence[Any], reason: str, indication: str = "",
                         institution_name: str = "", created_at: dt.datetime | None = None) -> Dataset:
    """The placeholder draft of a study reported from scratch (no AI draft: drafting failed, the
    study was skipped or its draft rejected): UNVERIFIED, PARTIAL, no text, coded
    :data:`NO_AI_DRAFT` with ``reason`` as a Comment, no device observer. Signed through
    :func:`build_signed_sr` like any draft; never sent (it holds no report).

    Parameters
    ----------
    sources:
        The study's image datasets (headers suffice), all of one study.
    reason:
        Why there is no AI draft.
    indication:
        The clinical indication for people.
    institution_name:
        Written as Institution Name.
    created_at:
        ContentDate/Time (``None``: now).

    Returns
    -------
    pydicom.Dataset
        The placeholder Comprehensive SR.

    Raises
    ------
    SRError
        No source image, or sources of several studies.
    """
    study_uid = _one_study(sources, "a report needs at least one source image")
    reason = _check_text("reason", reason) or "no AI draft"
    source_uids = sorted(str(s.SOPInstanceUID) for s in sources)
    created = created_at or dt.datetime.now(dt.UTC).astimezone()
    sop_uid = deterministic_uid("no-ai-draft", study_uid, *source_uids, created.isoformat())
    tree = _content_tree(
        indication=_check_text("indication", indication), findings="", impression="",
        comments=[f"No AI draft ({reason.rstrip('.')}): a radiologist reports this study from the images."],
        observations=(), images=[(str(s.SOPClassUID), str(s.SOPInstanceUID)) for s in sources],
        model_name="", model_version="", verifier=None, no_ai_draft=True,
    )
    evidence = [_evidence_stub(s, i == 0) for i, s in enumerate(sources)]
    return _unverified_sr(evidence, tree, study_uid=study_uid, sop_uid=sop_uid, created=created,
                          institution_name=institution_name, series_description="Report from scratch - UNVERIFIED",
                          model_name_attr="none (no AI draft)",
                          software_versions=[f"cxrnode {_software_version()}"[:64]])


def build_addendum_sr(
    predecessor: Dataset,
    text: str,
    author_name: str,
    author_org: str,
    added_at: dt.datetime,
) -> Dataset:
    """A new verified SR amending ``predecessor`` (a verified report, or an earlier addendum).

    It repeats the predecessor's report unchanged (indication, findings, impression, coded
    observations, critical-result communication, earlier addenda) and adds an "Addendum"
    section (LN 55107-7, PS3.16 CID 7001) with ``text`` and its byline. COMPLETE, VERIFIED,
    FINAL; the verifying observer is the addendum's author; Predecessor Documents Sequence
    (PS3.3 C.17.2.3) -> ``predecessor``, which is not changed. Same series as the signed report;
    SOP Instance UID = uuid5 of the predecessor's UID, the text, the author and the time.

    Parameters
    ----------
    predecessor:
        The verified report (or addendum) to amend.
    text:
        The addendum's text.
    author_name:
        The author (PN), the new report's verifying observer.
    author_org:
        Verifying Organization.
    added_at:
        VerificationDateTime (timezone-aware).

    Returns
    -------
    pydicom.Dataset
        The new verified Comprehensive SR.

    Raises
    ------
    SRError
        The predecessor is not a verified, complete Comprehensive SR, the author or organisation
        is missing, or the text is empty.
    """
    if str(predecessor.get("SOPClassUID", "")) != COMPREHENSIVE_SR or "ContentSequence" not in predecessor:
        raise SRError("the report to amend is not a Comprehensive SR document")
    if str(predecessor.get("VerificationFlag", "")) != "VERIFIED" or str(predecessor.get("CompletionFlag", "")) != "COMPLETE":
        raise SRError("only a verified, complete report can be amended; sign the draft instead")
    _quiet_person_name_warning()
    _check_verifier(author_name, author_org, "the addendum's author (verifying observer) is required")
    text = _check_text("addendum", text)
    if not text:
        raise SRError("the addendum is empty")
    if added_at.tzinfo is None:
        added_at = added_at.astimezone()
    before = read_report(predecessor)
    evidence, images = _verified_evidence(predecessor, "the report to amend")
    addenda = (*before.addenda, AddendumText(text, str(author_name), added_at))
    model_name, _, model_version = before.device_model.rpartition(" ")
    pred_uid = str(predecessor.SOPInstanceUID)
    tree = _content_tree(
        indication=before.indication, findings=before.findings, impression=before.impression,
        comments=[c for c in before.comments if c], observations=before.observations, images=images,
        model_name=model_name, model_version=model_version, verifier=(author_name, author_org),
        no_ai_draft=before.no_ai_draft, critical=before.critical, addenda=addenda, prior=before.prior,
    )
    return _verified_sr(predecessor, evidence, tree,
                        sop_uid=deterministic_uid("addendum", pred_uid, text, author_name, author_org,
                                                  added_at.isoformat()),
                        instance_number=len(addenda) + 1, verifier=(author_name, author_org), at=added_at,
                        model=(model_name, model_version))


def warm_up() -> None:
    """Build and read one throw-away draft: highdicom loads its IOD tables on first use (~1 s),
    which the node does once at model load instead of in the first study's latency."""
    src = Dataset()
    src.SOPClassUID = "1.2.840.10008.5.1.4.1.1.1"
    src.SOPInstanceUID = deterministic_uid("warm-up", "image")
    src.StudyInstanceUID = deterministic_uid("warm-up", "study")
    src.SeriesInstanceUID = deterministic_uid("warm-up", "series")
    text = "Lungs are clear. No pleural effusion."
    draft = build_draft_sr([src], DraftContent(findings=text, impression="Normal.", model_name="warm-up",
                                               model_version="0", observations=coded_observations(text)))
    read_report(draft)


# -- reading back ---------------------------------------------------------------------------


def _code_of(item: Any) -> tuple[str, str]:
    name = item.ConceptNameCodeSequence[0]
    return str(name.CodeValue), str(name.CodingSchemeDesignator)


def _walk(items: Iterable[Any]) -> Iterable[Any]:
    for item in items:
        yield item
        yield from _walk(item.get("ContentSequence", None) or ())


def read_report(ds: Dataset) -> ReportText:
    """Parse an SR this module wrote (or any TID 2000-like SR) with highdicom.

    Parameters
    ----------
    ds:
        The SR data set.

    Returns
    -------
    ReportText
        Its text, coded observations, flags, critical result, addenda and prior.
    """
    sr = hd.sr.ComprehensiveSR.from_dataset(ds)
    indication, findings, impression = [], [], []
    comments: list[str] = []
    observations: list[CodedObservation] = []
    images: list[str] = []
    device_model = ""
    presence_by_code = {(c.value, c.scheme_designator): k for k, c in PRESENCE_CODES.items()}
    critical: CriticalCommunication | None = None
    addenda: list[AddendumText] = []
    no_ai_draft = False
    prior: PriorComparison | None = None
    root = sr.ContentSequence
    for section in root:
        code = _code_of(section)
        if code == ("121015", "DCM"):
            device_model = str(section.TextValue)
        if section.ValueType != "CONTAINER":
            continue
        if code == (CRITICAL_RESULTS.value, CRITICAL_RESULTS.scheme_designator):
            critical = _read_critical(section) or critical
            continue
        if code == (ADDENDUM.value, ADDENDUM.scheme_designator):
            addenda.append(_read_addendum(section))
            continue
        if code == (PRIOR_PROCEDURES.value, PRIOR_PROCEDURES.scheme_designator):
            prior = _read_comparison(section)
            continue
        no_ai_draft = no_ai_draft or any(
            item.ValueType == "CODE" and _code_of_value(item) == (NO_AI_DRAFT.value, NO_AI_DRAFT.scheme_designator)
            for item in section.get("ContentSequence", None) or ())
        for item in _walk(section.get("ContentSequence", None) or ()):
            icode = _code_of(item)
            if item.ValueType == "TEXT":
                if icode == ("121106", "DCM"):
                    comments.append(str(item.TextValue))
                elif code == ("121109", "DCM"):
                    indication.append(str(item.TextValue))
                elif code == ("121070", "DCM"):
                    findings.append(str(item.TextValue))
                elif code == ("121072", "DCM"):
                    impression.append(str(item.TextValue))
            elif item.ValueType == "CODE" and icode[1] == "SCT":
                value = item.ConceptCodeSequence[0]
                presence = presence_by_code.get((str(value.CodeValue), str(value.CodingSchemeDesignator)))
                if presence:
                    name = item.ConceptNameCodeSequence[0]
                    observations.append(CodedObservation(str(name.CodeMeaning), icode[0],
                                                         str(name.CodeMeaning), presence))
            elif item.ValueType == "IMAGE":
                images.append(str(item.ReferencedSOPSequence[0].ReferencedSOPInstanceUID))
    verifier = ""
    if "VerifyingObserverSequence" in ds and ds.VerifyingObserverSequence:
        verifier = str(ds.VerifyingObserverSequence[0].VerifyingObserverName)
    predecessors = tuple(
        str(inst.ReferencedSOPInstanceUID)
        for study in ds.get("PredecessorDocumentsSequence", None) or ()
        for series in study.ReferencedSeriesSequence
        for inst in series.ReferencedSOPSequence
    )
    return ReportText(
        sop_instance_uid=str(ds.SOPInstanceUID),
        indication="\n".join(indication),
        findings="\n".join(findings),
        impression="\n".join(impression),
        comments=tuple(comments),
        observations=tuple(observations),
        completion_flag=str(ds.get("CompletionFlag", "")),
        verification_flag=str(ds.get("VerificationFlag", "")),
        preliminary_flag=str(ds.get("PreliminaryFlag", "")),
        verifying_observer=verifier,
        predecessors=predecessors,
        source_images=tuple(images),
        device_model=device_model,
        critical=critical,
        addenda=tuple(addenda),
        no_ai_draft=no_ai_draft,
        prior=prior,
    )


def _read_comparison(section: Any) -> PriorComparison:
    uid = accession = ""
    text: list[str] = []
    for item in section.get("ContentSequence", None) or ():
        code = _code_of(item)
        if code == (PROCEDURE_STUDY_UID.value, PROCEDURE_STUDY_UID.scheme_designator):
            uid = str(item.UID)
        elif code == (ACCESSION_NUMBER.value, ACCESSION_NUMBER.scheme_designator):
            accession = str(item.TextValue)
        elif item.ValueType == "TEXT":
            text.append(str(item.TextValue))
    return PriorComparison(description="\n".join(text), study_instance_uid=uid, accession_number=accession)


def _code_of_value(item: Any) -> tuple[str, str]:
    value = item.ConceptCodeSequence[0]
    return str(value.CodeValue), str(value.CodingSchemeDesignator)


def _parse_dt(value: str) -> dt.datetime | None:
    try:
        parsed = DT(value)
    except ValueError:
        return None
    out = dt.datetime(parsed.year, parsed.month, parsed.day, parsed.hour, parsed.minute, parsed.second,
                      parsed.microsecond, parsed.tzinfo)
    return out if out.tzinfo is not None else out.astimezone()  # no offset: the writer's local time


def _read_critical(section: Any) -> CriticalCommunication | None:
    """The "Communication of Critical Results" section as written by :func:`_critical_section`."""
    fields: dict[str, Any] = {}
    methods = {(c.value, c.scheme_designator): k for k, c in COMMUNICATION_METHODS.items()}
    for item in section.get("ContentSequence", None) or ():
        code = _code_of(item)
        if item.ValueType == "CODE" and code == (RESULTS_COMMUNICATED.value, RESULTS_COMMUNICATED.scheme_designator):
            fields["method"] = methods.get(_code_of_value(item), "")
        elif item.ValueType == "TEXT" and code == (RECIPIENT.value, RECIPIENT.scheme_designator):
            fields["recipient"] = str(item.TextValue)
        elif item.ValueType == "TEXT" and code == (RECIPIENT_ROLE.value, RECIPIENT_ROLE.scheme_designator):
            fields["role"] = str(item.TextValue)
        elif item.ValueType == "DATETIME" and code == (COMMUNICATED_AT.value, COMMUNICATED_AT.scheme_designator):
            fields["communicated_at"] = _parse_dt(str(item.DateTime))
    try:
        return CriticalCommunication(**fields)
    except (TypeError, SRError):
        return None  # written by someone else, another way: the narrative is still in the SR


def _read_addendum(section: Any) -> AddendumText:
    text, byline = [], ""
    for item in section.get("ContentSequence", None) or ():
        if item.ValueType != "TEXT":
            continue
        if _code_of(item) == (ADDENDUM.value, ADDENDUM.scheme_designator):
            text.append(str(item.TextValue))
        elif _code_of(item) == (COMMENT.value, COMMENT.scheme_designator):
            byline = str(item.TextValue)
    # the byline carries the author and time as written ("Addendum by NAME on DATE TIME (UTC+hhmm).")
    author, added = "", dt.datetime.now(dt.UTC)
    if byline.startswith("Addendum by ") and " on " in byline:
        author, _, when = byline.removeprefix("Addendum by ").rpartition(" on ")
        try:
            added = dt.datetime.strptime(when.rstrip("."), "%Y-%m-%d %H:%M (UTC%z)")
        except ValueError:
            pass
    return AddendumText("\n".join(text), author, added)
