"""The priority of a study for the reading room: ``STAT``, ``ED``, ``inpatient``, ``outpatient``
(or ``""``: the request said nothing), from the request attributes of a received image.

One rule, in :func:`study_priority` (pure, no database, no Qt). The index applies it to every
received instance (:func:`dicom_node.index.register_instance`) and keeps the most urgent value seen
for the study (:func:`more_urgent`); the reviewer's worklist shows it and sorts on it
(:func:`rank`: STAT first, unknown last).

Attributes read, at the top level and in every item of the Request Attributes Sequence
(0040,0275) (PS3.3 C.7.6.1 General Study / C.4.10 Request Attributes Macro, C.4.11 Requested
Procedure, C.3.3 Patient Medical, C.3.4 Visit Admission, C.3.5 Visit Status):

1. **STAT** when Requested Procedure Priority (0040,1003) or Reporting Priority (0040,1009) is
   ``STAT`` (the defined terms are STAT, HIGH, ROUTINE, MEDIUM, LOW; only STAT is taken as urgent:
   HIGH is not the same thing at every site).
2. **ED** when a location-like attribute names the emergency department: Current Patient Location
   (0038,0300), Requesting Service (0032,1033), Patient State (0038,0500), Route of Admissions
   (0038,0016), Visit Status ID (0038,0008), Patient's Institution Residence (0038,0400) or
   Institutional Department Name (0008,1040) reads ``ED``, ``ER``, ``A&E``, ``emergency``,
   or ``casualty``.
3. **inpatient** when one of them names a ward, ICU/HDU/CCU, ``inpatient``/``admitted``, or the
   request carries an Admission ID (0038,0010) (an admitted patient).
4. **outpatient** when one of them reads ``outpatient``, ``OPD``, ``clinic``, ``GP`` or
   ``day case``.
5. ``""`` otherwise: the request says nothing the rule can read (shown as "—", sorted last).

The words are matched as whole words, case-insensitively; the first matching step wins, so a
STAT request from a clinic is STAT, and an ED patient with an Admission ID is ED.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

STAT = "STAT"
ED = "ED"
INPATIENT = "inpatient"
OUTPATIENT = "outpatient"
UNKNOWN = ""

#: most urgent first; ``""`` (unknown) after all of them
PRIORITIES: tuple[str, ...] = (STAT, ED, INPATIENT, OUTPATIENT)

#: attributes whose value is a priority (defined terms STAT, HIGH, ROUTINE, MEDIUM, LOW)
PRIORITY_ATTRIBUTES = ("RequestedProcedurePriority", "ReportingPriority")
#: attributes that name where the patient is or where the request came from
LOCATION_ATTRIBUTES = (
    "CurrentPatientLocation",
    "RequestingService",
    "PatientState",
    "RouteOfAdmissions",
    "VisitStatusID",
    "PatientInstitutionResidence",
    "InstitutionalDepartmentName",
)

_ED = re.compile(r"(?<![\w&])(?:ED|ER|A\s*&\s*E|A\s*and\s*E|emergency|emerg|casualty)(?![\w&])", re.IGNORECASE)
_INPATIENT = re.compile(
    r"(?<!\w)(?:in-?patients?|admitted|ward\w*|ICU|ITU|HDU|CCU|NICU|PICU|MICU|SICU|intensive care|critical care)(?!\w)",
    re.IGNORECASE,
)
_OUTPATIENT = re.compile(r"(?<!\w)(?:out-?patients?|OPD|clinic|GP|day case|ambulatory)(?!\w)", re.IGNORECASE)


def _value(ds: Any, keyword: str) -> str:
    try:
        value = ds.get(keyword, "")
    except Exception:  # a malformed element reads as absent, never stops indexing
        return ""
    if value is None:
        return ""
    if isinstance(value, list | tuple) or type(value).__name__ == "MultiValue":
        return " ".join(str(v) for v in value).strip()
    return str(value).strip()


def _request_levels(ds: Any) -> Iterator[Any]:
    """The data set itself, then each item of its Request Attributes Sequence."""
    yield ds
    try:
        items = ds.get("RequestAttributesSequence", None) or ()
    except Exception:
        items = ()
    yield from items


def study_priority(ds: Any) -> str:
    """The reading priority the request attributes of ``ds`` give, by the rule in this module's
    docstring (Priority ``STAT`` first, then the patient's location).

    Parameters
    ----------
    ds:
        A pydicom Dataset or any mapping-like object with ``get(keyword, default)``.

    Returns
    -------
    str
        ``STAT``, ``ED``, ``inpatient``, ``outpatient`` or ``""`` (not stated).
    """
    levels = list(_request_levels(ds))
    for level in levels:
        if any(_value(level, k).upper() == "STAT" for k in PRIORITY_ATTRIBUTES):
            return STAT
    texts = [t for level in levels for t in (_value(level, k) for k in LOCATION_ATTRIBUTES) if t]
    if any(_ED.search(t) for t in texts):
        return ED
    if any(_INPATIENT.search(t) for t in texts) or any(_value(level, "AdmissionID") for level in levels):
        return INPATIENT
    if any(_OUTPATIENT.search(t) for t in texts):
        return OUTPATIENT
    return UNKNOWN


def rank(priority: str) -> int:
    """Sort rank: 0 for STAT ... 3 for outpatient, 4 for unknown (or anything else)."""
    try:
        return PRIORITIES.index(priority)
    except ValueError:
        return len(PRIORITIES)


def more_urgent(a: str, b: str) -> str:
    """The more urgent of two priorities.

    Parameters
    ----------
    a, b:
        Priorities as :func:`study_priority` returns them.

    Returns
    -------
    str
        The more urgent one (``a`` on a tie).
    """
    return b if rank(b) < rank(a) else a


__all__ = [
    "ED",
    "INPATIENT",
    "LOCATION_ATTRIBUTES",
    "OUTPATIENT",
    "PRIORITIES",
    "PRIORITY_ATTRIBUTES",
    "STAT",
    "UNKNOWN",
    "more_urgent",
    "rank",
    "study_priority",
]
