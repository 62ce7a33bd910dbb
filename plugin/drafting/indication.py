"""The clinical indication of a study: why the chest radiograph was requested.

Searched in the attributes named by ``[pipeline] indication_sources`` (in that order), each at
the top level of the instances and inside the Request Attributes Sequence (0040,0275) of the
Request Attributes Macro (PS3.3 Table 10-9, used by the General Series Module C.7.3.1):

- ReasonForTheRequestedProcedure (0040,1002)
- ReasonForRequestedProcedureCodeSequence (0040,100A): the Code Meanings
- ReasonForStudy (0032,1030, retired but still sent)
- AdditionalPatientHistory (0010,21B0): where many sites put the longer history
- AdmittingDiagnosesDescription (0008,1080), AdmittingDiagnosesCodeSequence (0008,1084)
- RequestedProcedureDescription (0032,1060)

The first source with text wins. The text shown to people (the SR, the reviewer) is cleaned
of de-identification marks (``XXXX``, ``[REDACTED]``, ``***``), control characters and repeated
spaces, then cut at a word boundary to ``indication_max_chars``. The model reads the same
source's text as it was trained on it, only with control characters and spacing normalised
(``Indication.model_text``): the training reports keep their de-identification marks, and
removing them changed half the drafts of a val run through the node (BLEU-4 0.161 -> 0.111,
``benchmarks/node_vs_eval.py``). No indication is fine: the result is empty.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from pydicom.datadict import tag_for_keyword

from dicom_node.config import PipelineConfig

DEFAULT_SOURCES = PipelineConfig().indication_sources  # one list, defined with the config

# Marks left by de-identification tools in free text.
_DEID_MARKS = re.compile(
    r"\bX{2,}(?:-X+)*\b|\bx{4,}\b|\[\s*(?:REDACTED|REMOVED|ANONYMI[SZ]ED|DE-?IDENTIFIED|NAME|DATE|ID)\s*\]"
    r"|<\s*(?:REDACTED|REMOVED|NAME|DATE)\s*>|\*{3,}|_{3,}",
    re.IGNORECASE,
)
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


class IndicationError(ValueError):
    """A configured source is not a DICOM attribute keyword."""


@dataclass(frozen=True)
class Indication:
    """The clinical indication of a study, from its request attributes (:func:`extract`).

    Attributes
    ----------
    text:
        Cleaned and length-limited, for people (the SR and the reviewer); ``""`` when absent.
    source:
        The attribute it came from (``""`` when absent), e.g.
        ``RequestAttributesSequence/ReasonForTheRequestedProcedure``.
    truncated:
        ``text`` was cut to ``[pipeline] indication_max_chars``.
    model_text:
        What the model reads: the same source's text as training saw it (de-identification
        marks kept), control characters and spacing normalised, length-limited.
    """
    text: str  # cleaned, length-limited; "" when absent (for people: the SR and the reviewer)
    source: str  # the attribute it came from ("" when absent), e.g. "RequestAttributesSequence/ReasonForTheRequestedProcedure"
    truncated: bool = False
    #: what the model reads: the same source's text as training saw it (de-identification marks
    #: kept), control characters and spacing normalised, length-limited
    model_text: str = ""

    def __bool__(self) -> bool:
        return bool(self.text)


def check_sources(sources: Sequence[str]) -> None:
    """Every source must be a DICOM keyword (fail early, naming the wrong one)."""
    for name in sources:
        if tag_for_keyword(name) is None:
            raise IndicationError(f"pipeline.indication_sources: {name!r} is not a DICOM attribute keyword")


def clean(text: str) -> str:
    """Remove de-identification marks, control characters and the punctuation they strand."""
    text = _CONTROL.sub(" ", text.replace("\r\n", "\n").replace("\r", "\n"))
    text = text.replace("\\", "; ")  # multi-valued LO joined by backslash
    text = re.sub(r"\bX{2,}[- ]years?[- ]old\b", " ", text, flags=re.IGNORECASE)
    text = _DEID_MARKS.sub(" ", text)
    text = re.sub(r"(\w)-(?=[\s,.;:]|$)", r"\1", text)  # "non-XXXX" -> "non"
    text = re.sub(r"[ \t]+", " ", text)
    text = re.sub(r"\s*\n\s*", "\n", text)
    # punctuation stranded by removed words: "after a , , steps" -> "after a, steps"
    text = re.sub(r"\s+([,.;:!?])", r"\1", text)
    text = re.sub(r"([,;:])(?:\s*[,;:])+", r"\1", text)
    text = re.sub(r"^[\s,.;:-]+", "", text)
    text = re.sub(r"[\s,;:-]+$", "", text)
    text = re.sub(r"\(\s*\)", "", text)
    text = re.sub(r"[ \t]+", " ", text).strip()
    # nothing but punctuation or a single letter left
    if not re.search(r"[A-Za-z0-9]{2,}", text):
        return ""
    return text


def as_trained(text: str) -> str:
    """The text as the model was trained on it: control characters and spacing normalised,
    multi-valued LO joined, nothing removed."""
    text = _CONTROL.sub(" ", text.replace("\r\n", "\n").replace("\r", "\n")).replace("\\", "; ")
    return re.sub(r"\s+", " ", text).strip()


def limit(text: str, max_chars: int) -> tuple[str, bool]:
    """Cut at a word boundary to at most ``max_chars`` characters (ellipsis included)."""
    if max_chars <= 0:
        raise ValueError(f"max_chars must be positive, got {max_chars}")
    if len(text) <= max_chars:
        return text, False
    if max_chars == 1:
        return "\u2026", True
    cut = text[: max_chars - 1]
    space = cut.rfind(" ")
    if space >= max_chars // 2:
        cut = cut[:space]
    return cut.rstrip(" ,;:.-") + "\u2026", True


def _text_of(ds: Any, keyword: str) -> str:
    if keyword not in ds:
        return ""
    value = ds[keyword].value
    if value is None:
        return ""
    if ds[keyword].VR == "SQ":  # code sequences: the meanings
        meanings = []
        for item in value:
            meaning = str(item.get("CodeMeaning", "") or "").strip()
            if meaning:
                meanings.append(meaning)
        return "; ".join(meanings)
    if isinstance(value, bytes | bytearray):
        return value.decode("latin-1", "replace")
    if isinstance(value, str):
        return value
    try:
        return "; ".join(str(v) for v in value)
    except TypeError:
        return str(value)


def _candidates(ds: Any, keyword: str) -> list[tuple[str, str]]:
    """(text, source) at the top level, then in each Request Attributes Sequence item."""
    out = [(_text_of(ds, keyword), keyword)]
    for item in ds.get("RequestAttributesSequence", None) or ():
        out.append((_text_of(item, keyword), f"RequestAttributesSequence/{keyword}"))
    return out


def _first(dss: list[Any], sources: Sequence[str], treat: Any) -> tuple[str, str] | None:
    """(text, source) of the first source with text after ``treat``; texts of that source that
    differ between instances or request items are joined with "; "."""
    for keyword in sources:
        found: list[str] = []
        where = ""
        for ds in dss:
            for raw, source in _candidates(ds, keyword):
                text = treat(raw)
                if text and text.lower() not in (f.lower() for f in found):
                    found.append(text)
                    where = where or source
        if found:
            return "; ".join(found), where
    return None


def extract(
    datasets: Iterable[Any],
    sources: Sequence[str] = DEFAULT_SOURCES,
    max_chars: int = 300,
) -> Indication:
    """The study's indication from its instances (first source, in order, that has text).

    Texts of one source that differ between instances or request items are joined with "; ".
    """
    check_sources(sources)
    dss = list(datasets)
    shown = _first(dss, sources, clean)
    read = _first(dss, sources, as_trained)  # training read the field even when it was all marks
    model_text = limit(read[0], max_chars)[0] if read else ""
    if shown:
        text, truncated = limit(shown[0], max_chars)
        return Indication(text=text, source=shown[1], truncated=truncated, model_text=model_text)
    return Indication(text="", source="", model_text=model_text)  # source: of the text shown
