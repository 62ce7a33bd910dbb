"""Helpers for the dicom_node tests: sample instances with fresh UIDs, senders, DCMTK paths."""

from __future__ import annotations

import copy
import io
import os
import shutil
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset, write_file_meta_info
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian, generate_uid
from pynetdicom import AE, _config

SAMPLES = Path("/work/shared/data/dicom_samples")
NIH = SAMPLES / "nih_chestxray_dx_implicit_le.dcm"  # implicit VR LE, 1 MB
SIIM = SAMPLES / "siim_chestxray14_pa_jpeg_baseline.dcm"  # JPEG baseline
PATIENT_NAME = "Secret^Patient^Name"
PATIENT_ID = "PID-SECRET-4711"


def dcmtk(tool: str) -> str:
    """Path of a DCMTK tool. pyenv shims shadow storescu/echoscu with pynetdicom's apps."""
    for d in ("/usr/bin", "/bin", "/usr/local/bin"):
        p = Path(d) / tool
        if p.exists():
            return str(p)
    pytest.skip(f"DCMTK {tool} not installed")
    raise AssertionError  # pragma: no cover


def dataset_bytes(path: Path) -> bytes:
    """The data set of a Part 10 file, without preamble and File Meta Information."""
    data = path.read_bytes()
    ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)
    meta = ds.file_meta
    meta_len = int(meta.FileMetaInformationGroupLength)
    return data[132 + 12 + meta_len:]


def load_template(source: Path = NIH) -> Dataset:
    return pydicom.dcmread(source)


def make_instance(
    out: Path,
    study_uid: str,
    series_uid: str | None = None,
    sop_uid: str | None = None,
    source: Path = NIH,
    template: Dataset | None = None,
    **attrs: Any,
) -> Path:
    """Write a copy of a real sample with new UIDs (and PHI we can look for in logs)."""
    ds = copy.deepcopy(template) if template is not None else pydicom.dcmread(source)
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid or generate_uid()
    ds.SOPInstanceUID = sop_uid or generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.PatientName = PATIENT_NAME
    ds.PatientID = PATIENT_ID
    for k, v in attrs.items():
        setattr(ds, k, v)
    out.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(out, enforce_file_format=True)
    return out


def write_raw(out: Path, meta: FileMetaDataset, body: bytes) -> Path:
    """A Part 10 file with exactly ``body`` after the given file meta (no re-encoding)."""
    buf = io.BytesIO()
    buf.write(b"\x00" * 128 + b"DICM")
    write_file_meta_info(buf, meta, enforce_standard=True)
    buf.write(body)
    out.write_bytes(buf.getvalue())
    return out


def encode_body(ds: Dataset, implicit: bool) -> bytes:
    fp = DicomBytesIO()
    fp.is_little_endian = True
    fp.is_implicit_VR = implicit
    write_dataset(fp, ds)
    return fp.getvalue()


def make_encapsulated(out: Path, study_uid: str, transfer_syntax: str, source: Path = SIIM) -> Path:
    """An instance whose Pixel Data is encapsulated and labelled ``transfer_syntax``.

    The node stores what is sent without decoding, so the fragments are the JPEG baseline
    stream of the shared sample whatever the label says.
    """
    ds = pydicom.dcmread(source)
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = generate_uid()
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = UID(transfer_syntax)
    ds["PixelData"].is_undefined_length = True
    ds["PixelData"].VR = "OB"
    body = encode_body(ds, implicit=False)
    return write_raw(out, ds.file_meta, body)


def send_raw(
    port: int,
    paths: Iterable[Path],
    calling: str = "SENDER",
    called: str = "CXRNODE",
    tls_args: Any = None,
    contexts: list[tuple[str, str]] | None = None,
) -> list[int | None]:
    """C-STORE each file's bytes as they are (pynetdicom chunked send); return the statuses.

    ``None`` marks a request that got no response. Raises if the association is not accepted.
    """
    paths = list(paths)
    ae = AE(ae_title=calling)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 20
    metas = [pydicom.dcmread(p, stop_before_pixels=True, specific_tags=[]).file_meta for p in paths]
    wanted = contexts or sorted({(str(m.MediaStorageSOPClassUID), str(m.TransferSyntaxUID)) for m in metas})
    for sop_class, ts in wanted:
        ae.add_requested_context(sop_class, [ts])
    _chunked_send(+1)
    try:
        assoc = ae.associate("127.0.0.1", port, ae_title=called, tls_args=tls_args)
        if not assoc.is_established:
            raise ConnectionRefusedError(f"association not established (rejected={assoc.is_rejected})")
        out: list[int | None] = []
        for p in paths:
            rsp = assoc.send_c_store(p)
            out.append(int(rsp.Status) if rsp and "Status" in rsp else None)
        assoc.release()
        return out
    finally:
        _chunked_send(-1)


_chunked_users = 0
_chunked_lock = threading.Lock()


def _chunked_send(delta: int) -> None:
    """pynetdicom's chunked send is a process-wide switch; keep it on while any sender needs it."""
    global _chunked_users
    with _chunked_lock:
        _chunked_users += delta
        _config.STORE_SEND_CHUNKED_DATASET = _chunked_users > 0


def associate(port: int, calling: str = "SENDER", called: str = "CXRNODE", tls_args: Any = None) -> Any:
    ae = AE(ae_title=calling)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 20
    ae.add_requested_context("1.2.840.10008.1.1", [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
    return ae.associate("127.0.0.1", port, ae_title=called, tls_args=tls_args)


def wait_for(predicate: Callable[[], Any], timeout: float = 60.0, interval: float = 0.05) -> Any:
    """Poll until ``predicate()`` is truthy; fail (not a timing assertion: a hang guard)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s: {predicate}")
        time.sleep(interval)


def files_under(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file())


def spool_files(store_root: Path) -> list[Path]:
    tmp = store_root / "tmp"  # every host's spool folder (tmp/<host id>/)
    return sorted(p for p in tmp.rglob("*") if p.is_file()) if tmp.exists() else []


def copy_tree(src: Path, dst: Path) -> None:
    shutil.copytree(src, dst)


__all__ = [name for name in dir() if not name.startswith("_")] + ["os"]
