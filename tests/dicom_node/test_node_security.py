"""Issue 13, the DICOM receiving side: each test performs the attack on a running node over
real loopback connections (pynetdicom peers, raw sockets) and checks it no longer works.

1. forged C-STOREs reusing the UIDs of the node's own SRs (and of received instances);
2. half-open connections (a partial A-ASSOCIATE-RQ, half a P-DATA PDU, a silent TLS peer);
5. no patient name in the logs, no forged log lines;
6. a deflate bomb;
8. a data set sent on a presentation context of another SOP class.
"""

from __future__ import annotations

import copy
import datetime as dt
import io
import logging
import resource
import socket
import struct
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, cast

import pydicom
import pytest
from dcmnode_helpers import (
    NIH,
    PATIENT_ID,
    PATIENT_NAME,
    dataset_bytes,
    encode_body,
    make_instance,
    send_raw,
    spool_files,
    wait_for,
    write_raw,
)
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filereader import read_file_meta_info
from pydicom.uid import UID, DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE
from sqlalchemy import func, select
from test_node_tls_outbound import client_context, pki, tls_security  # noqa: F401 - pki is a fixture

from dicom_node.db import AuditEvent, Instance, Study
from dicom_node.index import register_instance

CR = "1.2.840.10008.5.1.4.1.1.1"
CT = "1.2.840.10008.5.1.4.1.1.2"
DX = "1.2.840.10008.5.1.4.1.1.1.1"
COMPREHENSIVE_SR = "1.2.840.10008.5.1.4.1.1.88.33"


@pytest.fixture
def node(make_config, start_node):  # type: ignore[no-untyped-def]
    # no promotion either: the study's state must only change if a forgery changes it
    return start_node(make_config(jobs={"workers": 0}, study={"quiet_period_s": 3600}))


def rows(node) -> list[Instance]:  # type: ignore[no-untyped-def]
    with node.sessions() as s:
        out = list(s.scalars(select(Instance).order_by(Instance.id)))
        for r in out:
            s.expunge(r)
        return out


def audits(node, action: str) -> list[AuditEvent]:  # type: ignore[no-untyped-def]
    with node.sessions() as s:
        out = list(s.scalars(select(AuditEvent).where(AuditEvent.action == action).order_by(AuditEvent.id)))
        for r in out:
            s.expunge(r)
        return out


def study_row(node, uid: str) -> tuple[int, str]:  # type: ignore[no-untyped-def]
    with node.sessions() as s:
        st = s.scalars(select(Study).where(Study.study_instance_uid == uid)).one()
        return int(st.generation), str(st.state)


# -- 1. nothing received replaces or removes what is stored ----------------------------------


def node_writes(node, ds: Dataset) -> tuple[str, bytes]:  # type: ignore[no-untyped-def]
    """Store and index an SR the way the pipeline and the review service do (generated=True)."""
    relpath = node.store.instance_relpath(str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID),
                                          str(ds.SOPInstanceUID))
    size, sha = node.store.write_dataset(ds, relpath)
    with node.sessions() as s, s.begin():
        register_instance(s, ds, relpath, size, sha, "CXRNODE", generated=True)
    return relpath, node.store.abspath(relpath).read_bytes()


@pytest.fixture
def signed_study(node, tmp_path: Path) -> dict[str, Any]:  # type: ignore[no-untyped-def]
    """A received image, the node's draft SR of it and the signed SR that replaced the draft."""
    from plugin.drafting import sr

    study = generate_uid()
    image = make_instance(tmp_path / "image.dcm", study)
    assert send_raw(node.port, [image]) == [0]
    source = pydicom.dcmread(image, stop_before_pixels=True)
    draft = sr.build_draft_sr([source], sr.DraftContent(findings="The lungs are clear.", impression="Normal chest.",
                                                        model_name="test-model", model_version="1"))
    signed = sr.build_signed_sr(draft, "The lungs are clear.", "Normal chest.", "Doe^Jane", "Radiology",
                                dt.datetime(2026, 1, 2, 3, 4, 5, tzinfo=dt.UTC))
    draft_path, draft_bytes = node_writes(node, draft)
    signed_path, signed_bytes = node_writes(node, signed)
    return {"study": study, "draft": draft, "signed": signed, "draft_path": draft_path, "signed_path": signed_path,
            "draft_bytes": draft_bytes, "signed_bytes": signed_bytes, "before": study_row(node, study)}


def save(ds: Dataset, path: Path) -> Path:
    ds.save_as(path, enforce_file_format=True)
    return path


def test_forged_signed_sr_is_refused_and_audited(node, signed_study, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """The attack of issue 13 item 1: same SOP/Study/Series UIDs as the signed SR, forged text."""
    forged = copy.deepcopy(signed_study["signed"])
    forged.VerifyingObserverSequence[0].VerifyingObserverName = "Mallory^Eve"
    assert send_raw(node.port, [save(forged, tmp_path / "forged.dcm")]) == [0xC215]
    # the node's file, its index row and the study are untouched
    assert node.store.abspath(signed_study["signed_path"]).read_bytes() == signed_study["signed_bytes"]
    signed_row = next(r for r in rows(node) if r.sop_instance_uid == str(forged.SOPInstanceUID))
    assert signed_row.generated == 1 and signed_row.calling_ae_title == "CXRNODE"
    assert study_row(node, signed_study["study"]) == signed_study["before"]
    [event] = audits(node, "store-refused")
    assert event.actor == "SENDER" and event.object_uid == str(forged.SOPInstanceUID)
    assert event.study_instance_uid == signed_study["study"] and "0xC215" in event.detail
    assert spool_files(node.store.root) == []


def test_draft_uid_reused_in_another_study_does_not_delete_the_draft(node, signed_study, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    forged = copy.deepcopy(signed_study["draft"])
    forged.StudyInstanceUID = generate_uid()
    forged.SeriesInstanceUID = generate_uid()
    assert send_raw(node.port, [save(forged, tmp_path / "moved.dcm")]) == [0xC215]
    assert node.store.abspath(signed_study["draft_path"]).read_bytes() == signed_study["draft_bytes"]
    assert not (node.store.root / "instances" / str(forged.StudyInstanceUID)).exists()
    with node.sessions() as s:  # no study was created for the forgery
        assert s.scalar(select(func.count()).select_from(Study).where(
            Study.study_instance_uid == str(forged.StudyInstanceUID))) == 0
    assert study_row(node, signed_study["study"]) == signed_study["before"]


def test_identical_echo_of_a_node_sr_is_a_success(node, signed_study, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """A PACS sending our own signed SR back (same data set, its own File Meta Information)."""
    echo = save(copy.deepcopy(signed_study["signed"]), tmp_path / "echo.dcm")
    assert send_raw(node.port, [echo, echo], calling="PACS") == [0, 0]
    assert node.store.abspath(signed_study["signed_path"]).read_bytes() == signed_study["signed_bytes"]
    assert study_row(node, signed_study["study"]) == signed_study["before"]
    assert all(r.generated == 1 for r in rows(node) if r.sop_instance_uid == str(signed_study["signed"].SOPInstanceUID))
    assert audits(node, "store-refused") == []


def test_received_instance_is_never_replaced(node, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    study, series, sop = generate_uid(), generate_uid(), generate_uid()
    first = make_instance(tmp_path / "first.dcm", study, series, sop)
    other = make_instance(tmp_path / "other.dcm", study, series, sop, ImageComments="forged")
    moved = make_instance(tmp_path / "moved.dcm", generate_uid(), generate_uid(), sop)
    assert send_raw(node.port, [first, other, moved, first]) == [0, 0xC214, 0xC214, 0]
    [row] = rows(node)
    assert dataset_bytes(node.store.abspath(row.path)) == dataset_bytes(first)
    assert len(list((node.store.root / "instances").rglob("*.dcm"))) == 1
    assert [e.object_uid for e in audits(node, "store-refused")] == [sop, sop]
    assert study_row(node, study)[0] == 1


def test_concurrent_senders_of_one_uid_cannot_overwrite_each_other(make_config, start_node, database_url: str,  # type: ignore[no-untyped-def]
                                                                    tmp_path: Path) -> None:
    """Two associations racing with different content for one new SOP Instance UID: exactly
    one is acknowledged, and what is on disk is what was acknowledged (SQLite and PostgreSQL)."""
    node = start_node(make_config(node={"database_url": database_url}, jobs={"workers": 0},
                                  study={"quiet_period_s": 3600}))
    template = pydicom.dcmread(NIH)
    for k in range(4):
        study, series, sop = generate_uid(), generate_uid(), generate_uid()
        files = [make_instance(tmp_path / f"{k}-{c}.dcm", study, series, sop, template=template,
                               ImageComments=f"version {c}") for c in "ab"]
        barrier = threading.Barrier(2)

        def send(f: Path, barrier: threading.Barrier = barrier) -> int | None:
            barrier.wait()
            return send_raw(node.port, [f])[0]

        with ThreadPoolExecutor(2) as pool:
            statuses = list(pool.map(send, files))
        assert sorted(s or 0 for s in statuses) == [0, 0xC214], statuses
        winner = files[statuses.index(0)]
        [row] = [r for r in rows(node) if r.sop_instance_uid == sop]
        assert dataset_bytes(node.store.abspath(row.path)) == dataset_bytes(winner)
    assert spool_files(node.store.root) == []


# -- 8. SOP class / presentation context mismatch --------------------------------------------


def send_on_context(port: int, context_class: str, request_class: str, ds: Dataset | Path,
                    transfer_syntax: str = ExplicitVRLittleEndian) -> int:
    """C-STORE ``ds`` on a presentation context negotiated for ``context_class``, the request
    naming ``request_class`` (pynetdicom's send_c_store would refuse to do this). A path is
    sent as its data set bytes, untouched (send_c_store would parse, so inflate, it)."""
    from pynetdicom.dimse_primitives import C_STORE

    if isinstance(ds, Path):
        data = ds.read_bytes()
        body = data[144 + int.from_bytes(data[140:144], "little"):]  # no parsing: it would inflate
        meta = read_file_meta_info(ds)
        ds = Dataset()
        ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    else:
        body = encode_body(ds, implicit=False)
    ae = AE(ae_title="SENDER")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 20
    ae.add_requested_context(context_class, [transfer_syntax])
    assoc = ae.associate("127.0.0.1", port, ae_title="CXRNODE")
    assert assoc.is_established
    try:
        req = C_STORE()
        req.MessageID = 1
        req.AffectedSOPClassUID = request_class
        req.AffectedSOPInstanceUID = ds.SOPInstanceUID
        req.Priority = 2
        req.DataSet = io.BytesIO(body)
        assoc._reactor_checkpoint.clear()  # noqa: SLF001 - as send_c_echo does: we read the response
        try:
            assoc.dimse.send_msg(req, cast(int, assoc.accepted_contexts[0].context_id))
            _, rsp = assoc.dimse.get_msg(block=True)
        finally:
            assoc._reactor_checkpoint.set()  # noqa: SLF001
        return int(cast(Any, rsp).Status)
    finally:
        assoc.release()


def test_ct_image_on_a_cr_context_is_refused(node, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    ct = pydicom.dcmread(make_instance(tmp_path / "ct.dcm", generate_uid(), SOPClassUID=CT, Modality="CT"))
    ct.file_meta.MediaStorageSOPClassUID = UID(CT)
    # the request says CT, the context was negotiated for CR
    assert send_on_context(node.port, CR, CT, ct) == 0x0122
    # the request says CR (as the context), the data set says CT
    assert send_on_context(node.port, CR, CR, ct) == 0xA900
    assert rows(node) == []
    assert not (node.store.root / "instances").exists() or not any((node.store.root / "instances").rglob("*.dcm"))
    assert spool_files(node.store.root) == []


# -- 6. deflate bomb -------------------------------------------------------------------------


def deflate_bomb(out: Path, inflated_mb: int) -> Path:
    """A Deflated Explicit VR Little Endian file whose data set inflates to ``inflated_mb`` MiB
    (a valid header, then Pixel Data of zeros), built without holding it inflated."""
    header = Dataset()
    header.SOPClassUID = CR
    header.SOPInstanceUID = generate_uid()
    header.StudyInstanceUID = generate_uid()
    header.SeriesInstanceUID = generate_uid()
    header.Modality = "CR"
    header.PatientName = PATIENT_NAME
    header.Rows = header.Columns = 16384
    header.BitsAllocated = header.BitsStored = 16
    header.HighBit = 15
    header.SamplesPerPixel = 1
    header.PhotometricInterpretation = "MONOCHROME2"
    header.PixelRepresentation = 0
    length = inflated_mb << 20
    body = encode_body(header, implicit=False) + struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OW", 0, length)
    z = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    parts = [z.compress(body)]
    zeros = bytes(1 << 20)
    for _ in range(inflated_mb):
        parts.append(z.compress(zeros))
    parts.append(z.flush())
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(CR)
    meta.MediaStorageSOPInstanceUID = header.SOPInstanceUID
    meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    return write_raw(out, meta, b"".join(parts))


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / (1 << 20)


def test_deflate_bomb_is_refused_without_inflating(make_config, start_node, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    node = start_node(make_config(node={"max_inflated_mb": 8}, jobs={"workers": 0}))
    bomb = deflate_bomb(tmp_path / "bomb.dcm", 768)
    assert bomb.stat().st_size < 2 << 20  # under 2 MB on the wire
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    samples: list[float] = []
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            samples.append(rss_mb())
            time.sleep(0.01)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        status = send_on_context(node.port, CR, CR, bomb, DeflatedExplicitVRLittleEndian)
    finally:
        done.set()
        sampler.join()
    assert status == 0xA700
    peak_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    # pydicom would hold the inflated 768 MiB (and more); the streaming check holds 1 MiB
    assert peak_after - peak_before < 200, (peak_before, peak_after)
    assert max(samples) - samples[0] < 200
    assert rows(node) == [] and spool_files(node.store.root) == []
    # a normal deflated instance under the cap is still stored
    ds = pydicom.dcmread(NIH)
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    ok = save(ds, tmp_path / "deflated.dcm")
    assert send_raw(node.port, [ok]) == [0]


# -- 2. half-open connections ----------------------------------------------------------------


def partial_associate_rq() -> bytes:
    """The first 40 bytes of an A-ASSOCIATE-RQ (PS3.8 9.3.2) that announces 200."""
    pdu = struct.pack(">BBI", 0x01, 0, 200) + struct.pack(">HH", 1, 0) + b"CXRNODE".ljust(16) + b"SENDER".ljust(16)
    return pdu[:40]


def closed_by_peer(sock: socket.socket, timeout: float) -> bool:
    sock.settimeout(timeout)
    try:
        while True:
            data = sock.recv(4096)
            if not data:
                return True
    except (ConnectionResetError, BrokenPipeError):
        return True
    except TimeoutError:
        return False


def acceptor_threads() -> int:
    return sum(1 for t in threading.enumerate() if "AcceptorThread" in t.name)


HALF_OPEN = {"acse_timeout_s": 2.0, "network_timeout_s": 3.0, "max_associations": 4, "max_pending_associations": 4}


def test_half_sent_association_requests_do_not_lock_senders_out(make_config, start_node, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    node = start_node(make_config(node=HALF_OPEN, jobs={"workers": 0}))
    template = pydicom.dcmread(NIH)
    held: list[socket.socket] = []
    try:
        for _ in range(10):  # more than max_associations and max_pending_associations
            s = socket.create_connection(("127.0.0.1", node.port))
            s.sendall(partial_associate_rq())
            held.append(s)
        time.sleep(0.3)
        t0 = time.monotonic()
        for i in range(3):  # a good sender keeps storing, one association after another
            f = make_instance(tmp_path / f"good{i}.dcm", generate_uid(), template=template)
            assert send_raw(node.port, [f]) == [0]
        assert time.monotonic() - t0 < 10
        assert node.scp.pending_connections() <= HALF_OPEN["max_pending_associations"]
        # every half-open socket is closed by the node within acse_timeout (plus slack)
        deadline = time.monotonic() + HALF_OPEN["acse_timeout_s"] + 5
        for s in held:
            assert closed_by_peer(s, max(deadline - time.monotonic(), 0.1))
    finally:
        for s in held:
            s.close()
    wait_for(lambda: acceptor_threads() == 0, timeout=10)
    assert node.scp.pending_connections() == 0


def test_half_a_pdata_pdu_is_cut_off_after_the_network_timeout(make_config, start_node, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    node = start_node(make_config(node=HALF_OPEN, jobs={"workers": 0}))
    staller = AE(ae_title="SENDER")
    staller.acse_timeout = staller.dimse_timeout = staller.network_timeout = 60
    staller.add_requested_context(DX, [ExplicitVRLittleEndian])
    stalled = []
    for _ in range(2):
        assoc = staller.associate("127.0.0.1", node.port, ae_title="CXRNODE")
        assert assoc.is_established
        # P-DATA-TF announcing 100000 bytes, 50 of them sent, then silence
        cast(Any, assoc.dul.socket).socket.sendall(struct.pack(">BBI", 0x04, 0, 100000) + bytes(50))
        stalled.append(assoc)
    t0 = time.monotonic()
    f = make_instance(tmp_path / "good.dcm", generate_uid())
    assert send_raw(node.port, [f]) == [0]  # room left under max_associations
    wait_for(lambda: node.scp.active_associations() == 0, timeout=HALF_OPEN["network_timeout_s"] + 8)
    assert time.monotonic() - t0 >= HALF_OPEN["network_timeout_s"] - 0.5
    wait_for(lambda: not any(a.is_alive() for a in stalled), timeout=10)
    assert spool_files(node.store.root) == []


def test_silent_tls_peers_do_not_block_accepting(make_config, start_node, pki, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]  # noqa: F811
    """pynetdicom does the TLS handshake on its accept thread without a timeout: one peer that
    connects and says nothing stops every other connection."""
    node = start_node(make_config(node=HALF_OPEN, security=tls_security(pki, mutual=False), jobs={"workers": 0}))
    silent = [socket.create_connection(("127.0.0.1", node.port)) for _ in range(3)]
    try:
        time.sleep(0.3)
        f = make_instance(tmp_path / "a.dcm", generate_uid())
        assert send_raw(node.port, [f], tls_args=(client_context(pki, with_cert=False), "127.0.0.1")) == [0]
        for s in silent:
            assert closed_by_peer(s, HALF_OPEN["acse_timeout_s"] + 5)
    finally:
        for s in silent:
            s.close()


# -- 5. no PHI in logs, no forged log lines --------------------------------------------------

ONE_COMPONENT_NAME = "Quaxleywhite"  # a one-component person name: highdicom quoted it in a warning


def test_no_patient_name_in_logs_and_no_forged_lines(make_config, start_node, tmp_path: Path, caplog, capfd,  # type: ignore[no-untyped-def]
                                                     recwarn) -> None:
    caplog.set_level(logging.INFO)
    node = start_node(make_config(jobs={"workers": 1}, study={"quiet_period_s": 0.5}))
    template = pydicom.dcmread(NIH)
    study = generate_uid()
    files = [make_instance(tmp_path / f"{v}.dcm", study, template=template, PatientName=ONE_COMPONENT_NAME,
                           ViewPosition=v) for v in ("PA", "LL")]
    assert send_raw(node.port, files) == [0, 0]
    # an untrusted UID with a newline reaches a log line through the SOP class check
    forged = pydicom.dcmread(files[0])
    forged.SOPInstanceUID = forged.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    forged.SOPClassUID = DX + "\n2026-01-01 00:00:00 INFO dicom_node.scp: forged"
    bad = write_raw(tmp_path / "forged.dcm", forged.file_meta, encode_body(forged, implicit=True))
    assert send_raw(node.port, [bad]) == [0xA900]
    # the node drafts the study (the SR copies the one-component name)
    from dicom_node.db import Draft

    def drafted() -> bool:
        with node.sessions() as s:
            return bool(s.scalar(select(func.count()).select_from(Draft)))

    wait_for(drafted, timeout=120)
    out, err = capfd.readouterr()
    records = [r for r in caplog.records if r.levelno >= logging.INFO]
    assert any(study in r.getMessage() for r in records)  # UIDs are logged ...
    text = "\n".join(r.getMessage() for r in records) + out + err
    for phi in (ONE_COMPONENT_NAME, PATIENT_ID):
        assert phi not in text  # ... the patient never
        assert not any(phi in str(w.message) for w in recwarn)
    assert "forged" in text  # the forged value was logged, escaped on one line
    for r in records:
        if r.name.startswith(("dicom_node", "plugin")):
            assert "\n" not in r.getMessage(), r.getMessage()
    assert not any(line.startswith("2026-01-01") for line in (out + err).splitlines())


def test_a_pdu_announced_past_the_maximum_is_cut_off_at_once(make_config, start_node, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """A 6-byte header announcing a 4 GiB A-ASSOCIATE-RQ: nothing is allocated for it and the
    connection is closed at once, not after the negotiation timeout."""
    node = start_node(make_config(node={"acse_timeout_s": 30.0}, jobs={"workers": 0}))
    s = socket.create_connection(("127.0.0.1", node.port))
    try:
        t0 = time.monotonic()
        s.sendall(struct.pack(">BBI", 0x01, 0, 0xFFFFFFF0) + bytes(4096))
        assert closed_by_peer(s, 10)
        assert time.monotonic() - t0 < 5
    finally:
        s.close()
    f = make_instance(tmp_path / "a.dcm", generate_uid())
    assert send_raw(node.port, [f]) == [0]
