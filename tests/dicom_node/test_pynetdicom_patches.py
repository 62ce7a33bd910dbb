"""The pynetdicom patches: all in one module, active after the node starts, reported when an
upstream name they rely on is gone, and without effect on other pynetdicom peers in the process."""

from __future__ import annotations

import logging
import re
import threading
from pathlib import Path
from typing import Any

import pydicom
import pytest
from dcmnode_helpers import associate, make_instance, wait_for
from pydicom.uid import generate_uid
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, evt
from pynetdicom import dul as pynetdicom_dul
from pynetdicom.transport import AssociationSocket, RequestHandler

from dicom_node import pynetdicom_patches as patches

DICOM_NODE = Path(patches.__file__).parent
#: the upstream internals the node touches; only pynetdicom_patches.py may name them
INTERNALS = re.compile(r"\b(dimse_messages|_config|_servers|_require_calling_aet|_dataset_file|_run_loop_delay|"
                       r"_create_association|decode_msg|NamedTemporaryFile|AssociationSocket)\b|__class__\s*=")


def send_one(tmp_path: Path, port: int, called: str = "CXRNODE") -> pydicom.Dataset:
    """C-STORE one real radiograph (new UIDs) on its own association; assert it was stored."""
    ds = pydicom.dcmread(make_instance(tmp_path / f"{generate_uid()}.dcm", generate_uid()))
    scu = AE(ae_title="SENDER")
    scu.add_requested_context(str(ds.SOPClassUID), str(ds.file_meta.TransferSyntaxUID))
    assoc = scu.associate("127.0.0.1", port, ae_title=called)
    assert assoc.is_established
    try:
        assert int(assoc.send_c_store(ds).Status) == 0
    finally:
        assoc.release()
    return ds


@pytest.fixture
def node(make_config, start_node):  # type: ignore[no-untyped-def]
    return start_node(make_config(jobs={"workers": 0}))


def test_every_check_is_true_after_the_node_starts(node, caplog: pytest.LogCaptureFixture) -> None:  # type: ignore[no-untyped-def]
    flags = patches.fast_path_active()
    assert flags and all(flags.values()), {k: v for k, v in flags.items() if not v}
    # and an accepted association really runs on the node's socket with a sleepless DUL loop
    assoc = associate(node.port)
    try:
        assert assoc.is_established
        server = node.scp._server
        accepted = wait_for(lambda: list(server.active_associations))
        sock = accepted[0].dul.socket
        assert type(sock) is patches.NodeSocket and sock.recv.__func__ is patches._recv_exactly
        assert accepted[0].dul._run_loop_delay == 0.0
        # the requestor (our side, like the SCU) keeps pynetdicom's own socket and loop
        assert type(assoc.dul.socket) is AssociationSocket and assoc.dul._run_loop_delay > 0
    finally:
        assoc.release()


def test_the_node_logs_the_self_check_at_start(make_config, start_node, caplog: pytest.LogCaptureFixture) -> None:  # type: ignore[no-untyped-def]
    with caplog.at_level(logging.INFO, logger="dicom_node.scp"):
        start_node(make_config(jobs={"workers": 0}))
    lines = [r for r in caplog.records if "fast path" in r.getMessage()]
    assert len(lines) == 1 and lines[0].levelno == logging.INFO
    assert "fast path active (all 12 checks" in lines[0].getMessage()


def test_a_renamed_upstream_attribute_is_reported(make_config, start_node, monkeypatch: pytest.MonkeyPatch,
                                                  caplog: pytest.LogCaptureFixture) -> None:  # type: ignore[no-untyped-def]
    patches.apply()
    original_reactor = pynetdicom_dul.DULServiceProvider.run_reactor

    def run_reactor(self: Any) -> None:  # an upstream release whose loop no longer reads _run_loop_delay
        original_reactor(self)

    monkeypatch.setattr(pynetdicom_dul.DULServiceProvider, "run_reactor", run_reactor)
    monkeypatch.delattr(RequestHandler, "_create_association")  # renamed upstream
    monkeypatch.setattr(patches, "_UPSTREAM_DECODE", lambda self, primitive, assoc=None: True)  # rewritten upstream
    flags = patches.fast_path_active()
    off = {k for k, v in flags.items() if not v}
    assert off == {"loop_delay", "acceptor_socket", "chunked_receive", "spool_file"}
    ok, line = patches.fast_path_summary(flags)
    assert not ok and "NOT active for" in line and "acceptor_socket" in line and ">=3.0,<3.1" in line
    monkeypatch.undo()
    monkeypatch.setattr(pynetdicom_dul.DULServiceProvider, "run_reactor", run_reactor)
    with caplog.at_level(logging.INFO, logger="dicom_node.scp"):
        start_node(make_config(jobs={"workers": 0}))
    warned = [r for r in caplog.records if "fast path NOT active for loop_delay" in r.getMessage()]
    assert len(warned) == 1 and warned[0].levelno == logging.WARNING


def test_the_version_range_is_asserted() -> None:
    patches.check_version("3.0.4")
    for version in ("3.1.0", "4.0.0", "2.1.2"):
        with pytest.raises(patches.UnsupportedPynetdicom, match=re.escape(">=3.0,<3.1")) as err:
            patches.check_version(version)
        assert version in str(err.value) and "pynetdicom_patches.py" in str(err.value)


def test_apply_is_idempotent() -> None:
    patches.apply()
    decode = patches._dimse_messages.DIMSEMessage.decode_msg
    patches.apply()
    assert patches._dimse_messages.DIMSEMessage.decode_msg is decode
    assert all(patches.fast_path_active().values())


def test_another_scp_in_the_process_is_not_affected(node, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """A plain pynetdicom SCP next to the node (a test peer, a PACS simulator) keeps upstream's
    behaviour: data sets in memory, not chunked into the node's spool folder."""
    seen: dict[str, Any] = {}

    def on_store(event: evt.Event) -> int:
        seen["file"] = patches.received_file(event.request)
        seen["uid"] = str(event.dataset.SOPInstanceUID)
        return 0x0000

    peer = AE(ae_title="PEER")
    peer.add_supported_context(pydicom.dcmread(make_instance(tmp_path / "x.dcm", generate_uid())).SOPClassUID,
                               ALL_TRANSFER_SYNTAXES)
    server = peer.start_server(("127.0.0.1", 0), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)])
    try:
        ds = send_one(tmp_path, server.server_address[1], called="PEER")
        assert seen == {"file": None, "uid": str(ds.SOPInstanceUID)}
        assert not any(Path(node.store.tmp_dir).iterdir())
    finally:
        server.shutdown()


def test_only_the_patches_module_touches_pynetdicom_internals() -> None:
    offenders = []
    for path in sorted(DICOM_NODE.rglob("*.py")):
        if path.name == "pynetdicom_patches.py":
            continue
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            code = line.split("#", 1)[0]
            if INTERNALS.search(code) and not code.lstrip().startswith(('"', "'")):
                offenders.append(f"{path.relative_to(DICOM_NODE.parent)}:{number}: {line.strip()}")
    assert not offenders, "pynetdicom internals outside dicom_node/pynetdicom_patches.py:\n" + "\n".join(offenders)


def test_threads_of_the_node_use_the_spool(node, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """The chunked receive is on for the node's own associations (its spool files, not /tmp)."""
    created: list[Any] = []
    original = patches.SpoolFile.__init__

    def spy(self: Any, *args: Any, **kwargs: Any) -> None:
        original(self, *args, **kwargs)
        created.append((threading.current_thread().name, Path(self.name).parent))

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(patches.SpoolFile, "__init__", spy)
        send_one(tmp_path, node.port)
    assert len(created) == 1 and created[0][1] == Path(node.store.tmp_dir)


@pytest.mark.parametrize("lost", ["chunked_receive", "spool_file"])
def test_the_node_still_stores_when_a_patch_is_lost(node, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                    lost: str) -> None:  # type: ignore[no-untyped-def]
    """Slower, not broken: without the chunked receive (data set in memory) or without the spool
    factory (pynetdicom's own temporary file) the SCP copies the data set into its spool folder."""
    import tempfile

    from sqlalchemy import select

    from dicom_node.db import Instance

    if lost == "chunked_receive":
        monkeypatch.setattr(patches._dimse_messages, "_config", patches._UPSTREAM_CONFIG)
        monkeypatch.setattr(patches._UPSTREAM_CONFIG, "STORE_RECV_CHUNKED_DATASET", False)
    else:
        monkeypatch.setattr(patches._dimse_messages, "NamedTemporaryFile", tempfile.NamedTemporaryFile)
    assert not patches.fast_path_active()[lost]
    ds = send_one(tmp_path, node.port)
    with node.sessions() as s:
        inst = s.scalars(select(Instance).where(Instance.sop_instance_uid == str(ds.SOPInstanceUID))).one()
    stored = pydicom.dcmread(node.store.abspath(inst.path))
    assert stored.PixelData == ds.PixelData and node.store.file_sha256(inst.path) == inst.sha256
    wait_for(lambda: not any(Path(node.store.tmp_dir).iterdir()), timeout=10)
