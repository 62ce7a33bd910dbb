"""The Storage SCP over real loopback associations: DCMTK and pynetdicom senders."""

from __future__ import annotations

import logging
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pydicom
import pytest
from dcmnode_helpers import (
    NIH,
    PATIENT_ID,
    PATIENT_NAME,
    SIIM,
    associate,
    dataset_bytes,
    dcmtk,
    encode_body,
    make_encapsulated,
    make_instance,
    send_raw,
    spool_files,
    write_raw,
)
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    generate_uid,
)
from sqlalchemy import func, select

from dicom_node.db import AuditEvent, Instance, Study, StudyState

SC = "1.2.840.10008.5.1.4.1.1.7"
DX = "1.2.840.10008.5.1.4.1.1.1.1"


def count(node, model) -> int:  # type: ignore[no-untyped-def]
    with node.sessions() as s:
        return int(s.scalar(select(func.count()).select_from(model)))


def instances(node) -> list[Instance]:  # type: ignore[no-untyped-def]
    with node.sessions() as s:
        return list(s.scalars(select(Instance).order_by(Instance.id)))


def run(cmd: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, errors="replace", timeout=120)


@pytest.fixture
def node(make_config, start_node):  # type: ignore[no-untyped-def]
    return start_node(make_config(jobs={"workers": 0}))


# -- verification and association policy ----------------------------------------------------


def test_echoscu_verification(node) -> None:  # type: ignore[no-untyped-def]
    r = run([dcmtk("echoscu"), "-aet", "ECHOSCU", "-aec", "CXRNODE", "127.0.0.1", str(node.port)])
    assert r.returncode == 0, r.stderr


def test_wrong_called_ae_title_is_rejected(node) -> None:  # type: ignore[no-untyped-def]
    r = run([dcmtk("echoscu"), "-aec", "NOTUS", "127.0.0.1", str(node.port)])
    assert r.returncode != 0
    assert "Association Rejected" in r.stderr
    assert "called ae title not recogni" in r.stderr.lower()


def test_unknown_calling_ae_title_is_rejected(make_config, start_node) -> None:  # type: ignore[no-untyped-def]
    node = start_node(make_config(security={"allowed_calling_ae_titles": ["PACS", "MODALITY"]}))
    assoc = associate(node.port, calling="INTRUDER")
    assert assoc.is_rejected
    r = run([dcmtk("echoscu"), "-aet", "INTRUDER", "-aec", "CXRNODE", "127.0.0.1", str(node.port)])
    assert r.returncode != 0 and "calling ae title not recogni" in r.stderr.lower()
    r = run([dcmtk("echoscu"), "-aet", "PACS", "-aec", "CXRNODE", "127.0.0.1", str(node.port)])
    assert r.returncode == 0, r.stderr
    assert node.scp.stats.rejected_associations == 2


def test_peer_outside_allowed_networks_is_rejected(make_config, start_node) -> None:  # type: ignore[no-untyped-def]
    node = start_node(make_config(security={"allowed_networks": ["10.0.0.0/8"]}))
    r = run([dcmtk("echoscu"), "-aec", "CXRNODE", "127.0.0.1", str(node.port)])
    assert r.returncode != 0
    assert "Association Rejected" in r.stderr and "Rejected Permanent" in r.stderr

    node2 = start_node(make_config(security={"allowed_networks": ["10.0.0.0/8", "127.0.0.0/8"]}))
    r = run([dcmtk("echoscu"), "-aec", "CXRNODE", "127.0.0.1", str(node2.port)])
    assert r.returncode == 0, r.stderr


def test_max_associations(make_config, start_node) -> None:  # type: ignore[no-untyped-def]
    node = start_node(make_config(node={"max_associations": 1}))
    first = associate(node.port)
    assert first.is_established
    try:
        second = associate(node.port)
        assert second.is_rejected
        r = run([dcmtk("echoscu"), "-aec", "CXRNODE", "127.0.0.1", str(node.port)])
        assert "Rejected Transient" in r.stderr
    finally:
        first.release()


# -- storing --------------------------------------------------------------------------------


def test_storescu_stores_byte_identical_and_indexes(node, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    study = generate_uid()
    a = make_instance(tmp_path / "a.dcm", study, source=NIH)
    b = make_instance(tmp_path / "b.dcm", study, source=SIIM)
    r = run([dcmtk("storescu"), "-xy", "-aet", "MODALITY", "-aec", "CXRNODE", "127.0.0.1", str(node.port), str(a), str(b)])
    assert r.returncode == 0, r.stderr
    rows = instances(node)
    assert len(rows) == 2
    for row, sent in zip(rows, (a, b), strict=True):
        ds = pydicom.dcmread(sent, stop_before_pixels=True)
        assert row.sop_instance_uid == ds.SOPInstanceUID
        assert row.transfer_syntax_uid == ds.file_meta.TransferSyntaxUID
        assert row.calling_ae_title == "MODALITY"
        stored = node.store.abspath(row.path)
        assert dataset_bytes(stored) == dataset_bytes(sent)
        import hashlib

        assert hashlib.sha256(stored.read_bytes()).hexdigest() == row.sha256
        assert stored.stat().st_size == row.size
    with node.sessions() as s:
        st = s.scalars(select(Study)).one()
        assert st.study_instance_uid == study and st.generation == 2 and st.state == StudyState.RECEIVING
        assert st.patient_id == PATIENT_ID  # stored for the reviewer ...
        assert s.scalar(select(func.count()).select_from(AuditEvent).where(AuditEvent.action == "received")) == 2
    assert spool_files(node.store.root) == []


TRANSFER_SYNTAXES = {
    "jpeg-baseline": "1.2.840.10008.1.2.4.50",
    "jpeg-extended": "1.2.840.10008.1.2.4.51",
    "jpeg-lossless": "1.2.840.10008.1.2.4.57",
    "jpeg-lossless-sv1": "1.2.840.10008.1.2.4.70",
    "jpeg-ls-lossless": "1.2.840.10008.1.2.4.80",
    "jpeg-ls-near-lossless": "1.2.840.10008.1.2.4.81",
    "jpeg2000-lossless": "1.2.840.10008.1.2.4.90",
    "jpeg2000": "1.2.840.10008.1.2.4.91",
    "rle": "1.2.840.10008.1.2.5",
}


def test_transfer_syntaxes_stored_as_sent(node, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    study = generate_uid()
    files = [make_encapsulated(tmp_path / f"{name}.dcm", study, ts) for name, ts in TRANSFER_SYNTAXES.items()]
    # native ones: implicit, explicit, deflated
    files.append(make_instance(tmp_path / "implicit.dcm", study, source=NIH))
    ds = pydicom.dcmread(NIH)
    for name, ts in (("explicit", ExplicitVRLittleEndian), ("deflated", DeflatedExplicitVRLittleEndian)):
        ds.SOPInstanceUID = generate_uid()
        ds.StudyInstanceUID = study
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.file_meta.TransferSyntaxUID = ts
        ds.save_as(tmp_path / f"{name}.dcm", enforce_file_format=True)
        files.append(tmp_path / f"{name}.dcm")
    statuses = send_raw(node.port, files)
    assert statuses == [0] * len(files)
    by_uid = {r.sop_instance_uid: r for r in instances(node)}
    for f in files:
        sent = pydicom.dcmread(f, stop_before_pixels=True)
        row = by_uid[str(sent.SOPInstanceUID)]
        assert row.transfer_syntax_uid == sent.file_meta.TransferSyntaxUID
        assert dataset_bytes(node.store.abspath(row.path)) == dataset_bytes(f)


def test_parallel_senders(node, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    template = pydicom.dcmread(NIH)
    batches = []
    for s in range(4):
        study = generate_uid()
        batches.append([make_instance(tmp_path / f"s{s}" / f"{i}.dcm", study, template=template) for i in range(6)])

    def send(batch: list[Path]) -> subprocess.CompletedProcess[str]:
        return run([dcmtk("storescu"), "-aec", "CXRNODE", "127.0.0.1", str(node.port), *map(str, batch)])

    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(send, batches))
    assert all(r.returncode == 0 for r in results), [r.stderr for r in results]
    assert count(node, Instance) == 24
    assert count(node, Study) == 4
    with node.sessions() as s:
        assert sorted(s.scalars(select(Study.generation))) == [6, 6, 6, 6]


def test_resend_is_idempotent_and_clashing_content_is_refused(node, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """Issue 13: a received instance never replaces a stored one (see test_node_security.py)."""
    study, sop = generate_uid(), generate_uid()
    series = generate_uid()
    f = make_instance(tmp_path / "a.dcm", study, series, sop)
    assert send_raw(node.port, [f, f]) == [0, 0]
    assert count(node, Instance) == 1
    with node.sessions() as s:
        assert s.scalars(select(Study.generation)).one() == 1
    # same SOP Instance UID, other content: refused (a corrected image needs a new UID, PS3.4)
    g = make_instance(tmp_path / "b.dcm", study, series, sop, ImageComments="corrected")
    assert send_raw(node.port, [g]) == [0xC214]
    # same SOP Instance UID in another series: refused too; the stored file is untouched
    h = make_instance(tmp_path / "c.dcm", study, generate_uid(), sop)
    assert send_raw(node.port, [h]) == [0xC214]
    rows = instances(node)
    assert len(rows) == 1 and len(list((node.store.root / "instances").rglob("*.dcm"))) == 1
    assert dataset_bytes(node.store.abspath(rows[0].path)) == dataset_bytes(f)
    with node.sessions() as s:
        assert s.scalars(select(Study.generation)).one() == 1


# -- refusals: specific status, no file, no row ----------------------------------------------


def assert_nothing_kept(node) -> None:  # type: ignore[no-untyped-def]
    assert count(node, Instance) == 0
    assert count(node, Study) == 0
    assert not (node.store.root / "instances").exists() or not any((node.store.root / "instances").rglob("*.dcm"))
    assert spool_files(node.store.root) == []


def test_truncated_dataset_refused(node, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    full = make_instance(tmp_path / "full.dcm", generate_uid())
    data = full.read_bytes()
    cut_pixels = tmp_path / "cut-pixels.dcm"
    cut_pixels.write_bytes(data[: len(data) // 2])
    cut_header = tmp_path / "cut-header.dcm"
    cut_header.write_bytes(data[:700])
    jpeg = make_instance(tmp_path / "jpeg.dcm", generate_uid(), source=SIIM)
    cut_jpeg = tmp_path / "cut-jpeg.dcm"
    cut_jpeg.write_bytes(jpeg.read_bytes()[:-5000])
    no_delimiter = tmp_path / "no-delimiter.dcm"
    no_delimiter.write_bytes(jpeg.read_bytes()[:-8])
    statuses = send_raw(node.port, [cut_pixels, cut_header, cut_jpeg, no_delimiter])
    assert statuses == [0xC210, 0xC210, 0xC210, 0xC210]
    assert_nothing_kept(node)


def test_garbage_dataset_refused(node, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    meta = pydicom.dcmread(make_instance(tmp_path / "ok.dcm", generate_uid()), stop_before_pixels=True).file_meta
    bad = write_raw(tmp_path / "bad.dcm", meta, b"\x08\x00\x16\x00\xff\xff\xff\x7f" + b"\xab" * 1000)
    assert send_raw(node.port, [bad]) == [0xC210]
    assert_nothing_kept(node)


def test_file_lying_about_its_transfer_syntax(node, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    ds = pydicom.dcmread(make_instance(tmp_path / "ok.dcm", generate_uid()))
    # says explicit VR, is implicit VR
    meta = ds.file_meta
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    lie_vr = write_raw(tmp_path / "lie-vr.dcm", meta, encode_body(ds, implicit=True))
    # says JPEG baseline, pixel data is native
    meta2 = pydicom.dcmread(tmp_path / "ok.dcm", stop_before_pixels=True).file_meta
    meta2.TransferSyntaxUID = "1.2.840.10008.1.2.4.50"
    lie_jpeg = write_raw(tmp_path / "lie-jpeg.dcm", meta2, encode_body(ds, implicit=False))
    # says implicit VR, is explicit VR
    meta3 = pydicom.dcmread(tmp_path / "ok.dcm", stop_before_pixels=True).file_meta
    meta3.TransferSyntaxUID = ImplicitVRLittleEndian
    lie_imp = write_raw(tmp_path / "lie-implicit.dcm", meta3, encode_body(ds, implicit=False))
    assert send_raw(node.port, [lie_vr, lie_jpeg, lie_imp]) == [0xC213, 0xC213, 0xC213]
    assert_nothing_kept(node)


def test_sop_class_mismatch_refused(node, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    ds = pydicom.dcmread(make_instance(tmp_path / "ok.dcm", generate_uid()))
    assert ds.SOPClassUID == SC
    meta = ds.file_meta
    meta.MediaStorageSOPClassUID = DX  # the request will say DX; the data set says SC
    f = write_raw(tmp_path / "mismatch.dcm", meta, encode_body(ds, implicit=True))
    assert send_raw(node.port, [f]) == [0xA900]
    assert_nothing_kept(node)


def test_missing_study_uid_refused(node, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    ds = pydicom.dcmread(make_instance(tmp_path / "ok.dcm", generate_uid()))
    del ds.StudyInstanceUID
    f = write_raw(tmp_path / "nostudy.dcm", ds.file_meta, encode_body(ds, implicit=True))
    assert send_raw(node.port, [f]) == [0xC212]
    assert_nothing_kept(node)


def test_free_space_floor_refuses_with_a700(make_config, start_node, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    node = start_node(make_config(node={"min_free_space_mb": 100_000_000}, jobs={"workers": 0}))
    f = make_instance(tmp_path / "a.dcm", generate_uid())
    assert send_raw(node.port, [f]) == [0xA700]
    r = run([dcmtk("storescu"), "-v", "-aec", "CXRNODE", "127.0.0.1", str(node.port), str(f)])
    assert r.returncode != 0
    assert "OutOfResources" in r.stderr
    assert_nothing_kept(node)


@pytest.fixture
def tiny_fs(tmp_path: Path):  # type: ignore[no-untyped-def]
    """A real 4 MB tmpfs (needs root and mount); skipped where mounting is not allowed."""
    mnt = tmp_path / "tiny"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mnt)], capture_output=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.decode(errors='replace').strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_full_disk_enospc_refuses_with_a700(make_config, start_node, tiny_fs: Path, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    config = make_config(node={"storage_dir": str(tiny_fs / "store"),
                               "database_url": f"sqlite:///{tmp_path / 'index.db'}"}, jobs={"workers": 0})
    node = start_node(config)
    template = pydicom.dcmread(NIH)
    study = generate_uid()
    files = [make_instance(tmp_path / f"{i}.dcm", study, template=template) for i in range(6)]  # 6 x 1 MB > 4 MB
    statuses = send_raw(node.port, files)
    assert statuses[0] == 0
    assert 0xA700 in statuses
    assert set(statuses) <= {0, 0xA700}
    stored = {r.sop_instance_uid: r for r in instances(node)}
    for f, st in zip(files, statuses, strict=True):
        uid = str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID)
        if st == 0:
            assert dataset_bytes(node.store.abspath(stored[uid].path)) == dataset_bytes(f)
        else:
            assert uid not in stored
    assert len(list((node.store.root / "instances").rglob("*.dcm"))) == statuses.count(0)
    assert spool_files(node.store.root) == []


# -- logs -----------------------------------------------------------------------------------


def test_logs_never_contain_patient_name_or_id(make_config, start_node, tmp_path: Path, caplog) -> None:  # type: ignore[no-untyped-def]
    caplog.set_level(logging.DEBUG, logger="dicom_node")
    node = start_node(make_config(jobs={"workers": 0}))
    study = generate_uid()
    good = make_instance(tmp_path / "a.dcm", study)
    data = good.read_bytes()
    bad = tmp_path / "bad.dcm"
    bad.write_bytes(data[: len(data) // 2])
    assert send_raw(node.port, [good, bad]) == [0, 0xC210]
    text = caplog.text
    assert study in text  # UIDs are logged ...
    for phi in (PATIENT_NAME, PATIENT_ID, "Secret"):
        assert phi not in text  # ... patient identity never


def test_refusals_are_per_instance_under_parallel_senders(node, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """Checks on one association never leak into another (no process-global state)."""
    template = pydicom.dcmread(NIH)
    jobs = []
    for k in range(4):
        good = make_instance(tmp_path / f"good{k}.dcm", generate_uid(), template=template)
        ds = pydicom.dcmread(good)
        meta = ds.file_meta
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID = generate_uid()
        lie = write_raw(tmp_path / f"lie{k}.dcm", meta, encode_body(ds, implicit=True))
        jobs.append([good, lie, good] if k % 2 else [lie, good, lie])
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda files: send_raw(node.port, files), jobs))
    for files, statuses in zip(jobs, results, strict=True):
        assert statuses == [0 if f.name.startswith("good") else 0xC213 for f in files]
    assert count(node, Instance) == 4


def test_stop_lets_in_flight_associations_finish(make_config, start_node, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """stop() closes the port at once but answers every request of an open association."""
    import threading

    node = start_node(make_config(jobs={"workers": 0}))
    template = pydicom.dcmread(NIH)
    study = generate_uid()
    files = [make_instance(tmp_path / f"{i}.dcm", study, template=template) for i in range(12)]
    statuses: list[int | None] = []
    first_acked = threading.Event()

    ae = __import__("pynetdicom").AE(ae_title="MODALITY")
    ae.add_requested_context(template.SOPClassUID, [str(template.file_meta.TransferSyntaxUID)])
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    assoc = ae.associate("127.0.0.1", node.port, ae_title="CXRNODE")
    assert assoc.is_established

    def send() -> None:
        for f in files:
            rsp = assoc.send_c_store(pydicom.dcmread(f))
            statuses.append(int(rsp.Status) if rsp and "Status" in rsp else None)
            first_acked.set()
        assoc.release()

    t = threading.Thread(target=send)
    t.start()
    first_acked.wait(60)
    port = node.port
    node.stop(grace_s=60)  # returns once the association is released
    t.join(60)
    assert statuses == [0] * len(files)
    assert not associate(port).is_established  # no new associations after stop
    engine_rows = len(list((node.store.root / "instances").rglob("*.dcm")))
    assert engine_rows == len(files)


def test_abort_mid_dataset_leaves_no_spool_file(node, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """A peer that aborts halfway through a C-STORE data set leaves nothing behind."""
    from io import BytesIO

    from pynetdicom import AE
    from pynetdicom.dimse_messages import C_STORE_RQ
    from pynetdicom.dimse_primitives import C_STORE

    f = make_instance(tmp_path / "a.dcm", generate_uid())
    ds = pydicom.dcmread(f)
    ae = AE(ae_title="SENDER")
    ae.add_requested_context(ds.SOPClassUID, [ImplicitVRLittleEndian])
    assoc = ae.associate("127.0.0.1", node.port, ae_title="CXRNODE")
    assert assoc.is_established
    req = C_STORE()
    req.MessageID = 1
    req.AffectedSOPClassUID = ds.SOPClassUID
    req.AffectedSOPInstanceUID = ds.SOPInstanceUID
    req.Priority = 2
    req.DataSet = BytesIO(encode_body(ds, implicit=True))
    msg = C_STORE_RQ()
    msg.primitive_to_message(req)
    pdvs = list(msg.encode_msg(assoc.accepted_contexts[0].context_id, 16382))
    for p in pdvs[: len(pdvs) // 2]:  # command and about half of the data set
        assoc.dul.send_pdu(p)
    from dcmnode_helpers import wait_for

    wait_for(lambda: spool_files(node.store.root))  # the node is receiving into a spool file
    assoc.abort()
    wait_for(lambda: not spool_files(node.store.root))
    assert_nothing_kept(node)
