"""Checking a received C-STORE data set before it is stored (PS3.4 B.2.3, PS3.5 7, PS3.10 7).

:func:`inspect_received` parses a received Part 10 file just enough to index it and refuses
what cannot be trusted with :class:`Rejected` and the status the Storage SCP answers with:

=========  =========================================================================
0xA700     a deflated data set inflates past ``node.max_inflated_mb`` (out of resources)
0xA900     SOP Class/Instance UID in the data set differs from the C-STORE request
0xC210     the data set cannot be parsed or is truncated
0xC212     Study/Series/SOP Instance UID missing or invalid
0xC213     the encoding contradicts the transfer syntax
=========  =========================================================================

Reasons quote untrusted values with ``repr`` and never quote element values (PHI).
"""

from __future__ import annotations

import hashlib
import logging
import os
import warnings
import zlib

from pydicom import Dataset, dcmread
from pydicom.filereader import read_file_meta_info
from pydicom.tag import Tag
from pydicom.uid import UID, DeflatedExplicitVRLittleEndian

__all__ = [
    "CANNOT_UNDERSTAND",
    "ENCODING_MISMATCH",
    "MISSING_UIDS",
    "OUT_OF_RESOURCES",
    "SOP_CLASS_MISMATCH",
    "Rejected",
    "data_set_sha256",
    "inspect_received",
    "quiet_pydicom",
]

log = logging.getLogger(__name__)

OUT_OF_RESOURCES = 0xA700
SOP_CLASS_MISMATCH = 0xA900
CANNOT_UNDERSTAND = 0xC210
MISSING_UIDS = 0xC212
ENCODING_MISMATCH = 0xC213

_PIXEL_DATA = Tag(0x7FE0, 0x0010)
_UNDEFINED = 0xFFFFFFFF
_VRS = frozenset(
    b"AE AS AT CS DA DS DT FD FL IS LO LT OB OD OF OL OV OW PN SH SL SQ SS ST SV TM UC UI UL UN UR US UT UV".split()
)
_SEQ_DELIMITER = {True: b"\xfe\xff\xdd\xe0\x00\x00\x00\x00", False: b"\xff\xfe\xe0\xdd\x00\x00\x00\x00"}
_INFLATE_CHUNK = 1 << 20


class Rejected(Exception):
    """The received data set is refused with ``status``."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


def inspect_received(path: str | os.PathLike[str], request_sop_class: str, request_sop_instance: str,
                     max_inflated: int | None = None) -> Dataset:
    """Parse a received file just enough to index it and to refuse what cannot be trusted.

    Large values (pixel data) are not read (``defer_size``); the check is structural: every
    top-level element must lie inside the file, the file must end where the last element ends
    (or, when that is of undefined length, with a Sequence Delimitation Item), and the first
    element's encoding must agree with the transfer syntax. A deflated body is first inflated
    as a stream and refused past ``max_inflated`` bytes.

    Parameters
    ----------
    path:
        The received Part 10 file (File Meta Information written by pynetdicom).
    request_sop_class, request_sop_instance:
        Affected SOP Class / Instance UID of the C-STORE request.
    max_inflated:
        The largest inflated size of a deflated data set, in bytes (``None``: no limit).

    Returns
    -------
    pydicom.Dataset
        The data set, pixel data deferred.

    Raises
    ------
    Rejected
        With the status to answer and a reason that quotes no element value.
    """
    size = os.path.getsize(path)
    meta_ts = _transfer_syntax(path)
    body_offset, little = _check_encoding(path, meta_ts)
    deflated = meta_ts == DeflatedExplicitVRLittleEndian
    if deflated and max_inflated is not None:
        _check_inflated_size(path, body_offset, max_inflated)
    ds = _parse(path, size, body_offset)
    _check_top_level(ds, path, size, little, deflated)
    _check_pixel_encoding(ds)
    _check_identifiers(ds, request_sop_class, request_sop_instance)
    return ds


def _transfer_syntax(path: str | os.PathLike[str]) -> UID:
    """The Transfer Syntax UID of the File Meta Information (read without the body:
    ``dcmread(specific_tags=[])`` would inflate a deflated body)."""
    try:
        return UID(str(read_file_meta_info(path).get("TransferSyntaxUID", "")))
    except Exception as exc:
        log.debug("unreadable File Meta Information: %r", exc)
        raise Rejected(CANNOT_UNDERSTAND, f"unreadable File Meta Information ({type(exc).__name__})") from None


def _parse(path: str | os.PathLike[str], size: int, body_offset: int) -> Dataset:
    """Read the data set with large values deferred. pydicom's warnings about what is checked
    here are dropped by a filter (see :func:`quiet_pydicom`)."""
    try:
        ds = dcmread(path, defer_size=64 * 1024)
    except Exception as exc:
        log.debug("unreadable data set: %r", exc)
        raise Rejected(CANNOT_UNDERSTAND, f"unreadable data set ({type(exc).__name__})") from None
    if not ds._dict and size > body_offset:  # noqa: SLF001
        # pydicom gives up silently on e.g. encapsulated data cut before its delimiter
        raise Rejected(CANNOT_UNDERSTAND, "unreadable data set: no element could be read")
    return ds


def _check_top_level(ds: Dataset, path: str | os.PathLike[str], size: int, little: bool, deflated: bool) -> None:
    """Walk the raw top level before anything converts it: every element inside the file, no
    stray bytes after the last one. Offsets of a deflated data set refer to the inflated
    stream, so only the short-read checks apply there."""
    last_end = 0
    tags = sorted(ds._dict)  # noqa: SLF001 - raw elements carry their file offsets
    for tag in tags:
        raw = ds._dict[tag]  # noqa: SLF001
        tell = getattr(raw, "value_tell", None)
        length = getattr(raw, "length", None)
        if length == _UNDEFINED:
            if tag == tags[-1] and not deflated:
                _check_delimited(path, size, little, tag)
                last_end = -1
            continue
        if tell is None or length is None:
            if tag == tags[-1]:
                last_end = -1  # already converted: nothing to measure
            continue
        value = getattr(raw, "value", None)
        if value is not None and len(value) < length:
            raise Rejected(CANNOT_UNDERSTAND, f"truncated data set: element {Tag(tag)} is short")
        if deflated:
            continue
        end = tell + length
        if end > size:
            raise Rejected(CANNOT_UNDERSTAND, f"truncated data set: element {Tag(tag)} ends past the end of the file")
        last_end = max(last_end, end)
    if not deflated and last_end >= 0 and tags and last_end != size:
        raise Rejected(CANNOT_UNDERSTAND, f"truncated data set: {size - last_end} stray bytes after the last element")


def _check_delimited(path: str | os.PathLike[str], size: int, little: bool, tag: int) -> None:
    """A last element of undefined length must end the file with a Sequence Delimitation Item."""
    with open(path, "rb") as f:
        f.seek(max(size - 8, 0))
        if f.read(8) != _SEQ_DELIMITER[little]:
            raise Rejected(CANNOT_UNDERSTAND, f"truncated data set: {Tag(tag)} has no delimiter")


def _check_pixel_encoding(ds: Dataset) -> None:
    """Pixel Data must be encapsulated exactly when the transfer syntax is (PS3.5 A.4)."""
    ts = UID(str(ds.file_meta.get("TransferSyntaxUID", "")))
    pixel = ds._dict.get(_PIXEL_DATA)  # noqa: SLF001
    if pixel is None or not ts:
        return
    undefined = getattr(pixel, "length", 0) == _UNDEFINED or getattr(pixel, "is_undefined_length", False)
    if ts.is_compressed and not undefined:
        raise Rejected(ENCODING_MISMATCH, f"transfer syntax {str(ts)!r} is encapsulated but Pixel Data is native")
    if not ts.is_compressed and undefined:
        raise Rejected(ENCODING_MISMATCH, f"transfer syntax {str(ts)!r} is native but Pixel Data is encapsulated")


def _check_identifiers(ds: Dataset, request_sop_class: str, request_sop_instance: str) -> None:
    """The UIDs the index needs are there and valid, and the SOP UIDs match the request."""
    try:
        sop_class = str(ds.SOPClassUID)
        sop_instance = str(ds.SOPInstanceUID)
        study_uid = str(ds.StudyInstanceUID)
        series_uid = str(ds.SeriesInstanceUID)
    except AttributeError as exc:
        raise Rejected(MISSING_UIDS, f"required identifier missing: {exc}") from None
    except Exception as exc:
        raise Rejected(CANNOT_UNDERSTAND, f"identifiers unreadable ({type(exc).__name__})") from None
    for name, value in (("StudyInstanceUID", study_uid), ("SeriesInstanceUID", series_uid),
                        ("SOPInstanceUID", sop_instance)):
        if not UID(value).is_valid:
            raise Rejected(MISSING_UIDS, f"{name} is not a valid UID")
    if sop_class != request_sop_class:
        raise Rejected(SOP_CLASS_MISMATCH,
                       f"SOP Class UID {sop_class!r} differs from the request's {request_sop_class!r}")
    if sop_instance != request_sop_instance:
        raise Rejected(
            SOP_CLASS_MISMATCH, f"SOP Instance UID {sop_instance!r} differs from the request's {request_sop_instance!r}"
        )


def _check_inflated_size(path: str | os.PathLike[str], offset: int, limit: int) -> int:
    """Inflate a Deflated Explicit VR Little Endian body (PS3.5 A.5) as a stream, keeping
    nothing, and refuse it (0xA700) as soon as it grows past ``limit`` bytes: pydicom would
    inflate the whole body in memory (a 300 KB bomb is 300 MB). Returns the inflated size."""
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    total = 0
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            while not inflater.eof and (chunk := f.read(_INFLATE_CHUNK)):
                while chunk and not inflater.eof:  # after the end, a pad byte stays in the tail
                    total += len(inflater.decompress(chunk, _INFLATE_CHUNK))
                    if total > limit:
                        raise Rejected(OUT_OF_RESOURCES, f"deflated data set inflates past node.max_inflated_mb "
                                                         f"({limit // (1 << 20)} MB)")
                    chunk = inflater.unconsumed_tail
            total += len(inflater.flush())
    except zlib.error as exc:
        raise Rejected(CANNOT_UNDERSTAND, f"deflated data set does not inflate ({exc})") from None
    if total > limit:
        raise Rejected(OUT_OF_RESOURCES, f"deflated data set inflates past node.max_inflated_mb ({limit // (1 << 20)} MB)")
    return total


def _check_encoding(path: str | os.PathLike[str], ts: UID) -> tuple[int, bool]:
    """Refuse a body whose first element contradicts the transfer syntax (explicit vs implicit VR).

    Returns ``(offset of the data set, little endian)``. Done by hand rather than through
    pydicom's warnings, which are process-global and so not safe across receiving threads.
    """
    with open(path, "rb") as f:
        head = f.read(132 + 12)
        if len(head) < 144 or head[128:132] != b"DICM" or head[132:136] != b"\x02\x00\x00\x00":
            raise Rejected(CANNOT_UNDERSTAND, "no File Meta Information group length")
        offset = 144 + int.from_bytes(head[140:144], "little")
        f.seek(offset)
        first = f.read(8)
    if not ts or ts == DeflatedExplicitVRLittleEndian or len(first) < 6:
        return offset, True
    little = ts.is_little_endian
    looks_explicit = first[4:6] in _VRS
    if ts.is_implicit_VR and looks_explicit:
        raise Rejected(ENCODING_MISMATCH, f"transfer syntax {str(ts)!r} is implicit VR but the data set is explicit VR")
    if not ts.is_implicit_VR and not looks_explicit:
        raise Rejected(ENCODING_MISMATCH, f"transfer syntax {str(ts)!r} is explicit VR but the data set is implicit VR")
    return offset, little


def data_set_sha256(path: str | os.PathLike[str]) -> str:
    """SHA-256 of a Part 10 file's data set: everything after its File Meta Information.

    Raises
    ------
    ValueError
        When ``path`` is not a Part 10 file; ``OSError`` when it cannot be read.
    """
    h = hashlib.sha256()
    with open(path, "rb") as f:
        head = f.read(144)
        if len(head) < 144 or head[128:132] != b"DICM":
            raise ValueError("not a Part 10 file")
        f.seek(144 + int.from_bytes(head[140:144], "little"))
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def quiet_pydicom() -> None:
    """Drop pydicom's warnings (and the log records it writes for them) in this process. They
    quote element values (a malformed PatientName is printed whole) and they are process-global:
    ``warnings.catch_warnings`` around one receiving thread's parse also silences, or
    un-silences, every other thread's and drops filters other threads install meanwhile. The
    SCP checks what those warnings are about itself and refuses with a status instead.
    Idempotent."""
    warnings.filterwarnings("ignore", module=r"pydicom(\..*)?$")
    # pydicom also logs each such warning (misc.warn_and_log) with the value it quotes
    pydicom_log = logging.getLogger("pydicom")
    if pydicom_log.level == logging.NOTSET:
        pydicom_log.setLevel(logging.ERROR)
