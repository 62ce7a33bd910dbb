"""TLS and mutual TLS on the SCP; the outbound queue sending to real SCPs (one of them over TLS)."""

from __future__ import annotations

import datetime as dt
import ipaddress
import ssl
import subprocess
from pathlib import Path

import pydicom
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from dcmnode_helpers import associate, dataset_bytes, dcmtk, make_instance, send_raw, wait_for
from pydicom.uid import generate_uid
from pynetdicom import AE, AllStoragePresentationContexts, evt
from sqlalchemy import select

from dicom_node.db import (
    AuditEvent,
    Instance,
    Transfer,
    TransferState,
    make_engine,
    session_factory,
)
from dicom_node.outbound import enqueue, process_one
from dicom_node.scu import SendError, send_file


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _write_key(key: ec.EllipticCurvePrivateKey, path: Path) -> None:
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A test CA, a server certificate for 127.0.0.1/localhost and a client certificate."""
    d = tmp_path_factory.mktemp("pki")
    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (x509.CertificateBuilder().subject_name(_name("cxrnode test CA")).issuer_name(_name("cxrnode test CA"))
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - dt.timedelta(days=1)).not_valid_after(now + dt.timedelta(days=30))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                       content_commitment=False, key_encipherment=False, data_encipherment=False,
                                       key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
          .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
          .sign(ca_key, hashes.SHA256()))
    out = {"ca": d / "ca.pem"}
    out["ca"].write_bytes(ca.public_bytes(serialization.Encoding.PEM))

    def leaf(name: str, usage: x509.ObjectIdentifier) -> None:
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (x509.CertificateBuilder().subject_name(_name(name)).issuer_name(ca.subject)
                .public_key(key.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(now - dt.timedelta(days=1)).not_valid_after(now + dt.timedelta(days=30))
                .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                            x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                               critical=False)
                .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
                .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
                .sign(ca_key, hashes.SHA256()))
        out[f"{name}_cert"] = d / f"{name}.pem"
        out[f"{name}_key"] = d / f"{name}.key"
        out[f"{name}_cert"].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        _write_key(key, out[f"{name}_key"])

    leaf("server", ExtendedKeyUsageOID.SERVER_AUTH)
    leaf("client", ExtendedKeyUsageOID.CLIENT_AUTH)
    return out


def client_context(pki: dict[str, Path], with_cert: bool) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(pki["ca"]))
    if with_cert:
        ctx.load_cert_chain(str(pki["client_cert"]), str(pki["client_key"]))
    return ctx


def tls_security(pki: dict[str, Path], mutual: bool) -> dict[str, str]:
    sec = {"tls_certificate": str(pki["server_cert"]), "tls_private_key": str(pki["server_key"])}
    if mutual:
        sec["tls_ca"] = str(pki["ca"])
    return sec


def test_tls_store(make_config, start_node, pki, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    node = start_node(make_config(security=tls_security(pki, mutual=False), jobs={"workers": 0}))
    f = make_instance(tmp_path / "a.dcm", generate_uid())
    assert send_raw(node.port, [f], tls_args=(client_context(pki, with_cert=False), "127.0.0.1")) == [0]
    with node.sessions() as s:
        row = s.scalars(select(Instance)).one()
    assert dataset_bytes(node.store.abspath(row.path)) == dataset_bytes(f)
    # plain DICOM to a TLS port does not get an association
    assert not associate(node.port).is_established
    # DCMTK over TLS
    r = subprocess.run([dcmtk("echoscu"), "+tls", str(pki["client_key"]), str(pki["client_cert"]),
                        "+cf", str(pki["ca"]), "-aec", "CXRNODE", "127.0.0.1", str(node.port)],
                       capture_output=True, text=True, timeout=60)
    if "unknown option" in r.stderr.lower() or "tls" in r.stderr.lower() and "not" in r.stderr.lower():
        pytest.skip(f"this DCMTK has no TLS: {r.stderr.strip()}")
    assert r.returncode == 0, r.stderr


def test_mutual_tls_requires_a_client_certificate(make_config, start_node, pki, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    node = start_node(make_config(security=tls_security(pki, mutual=True), jobs={"workers": 0}))
    f = make_instance(tmp_path / "a.dcm", generate_uid())
    assert send_raw(node.port, [f], tls_args=(client_context(pki, with_cert=True), "127.0.0.1")) == [0]
    with pytest.raises((ConnectionRefusedError, ssl.SSLError, OSError)):
        send_raw(node.port, [f], tls_args=(client_context(pki, with_cert=False), "127.0.0.1"))
    with node.sessions() as s:
        assert len(s.scalars(select(Instance)).all()) == 1


# -- outbound -------------------------------------------------------------------------------


class FakePacs:
    """A pynetdicom Storage SCP that records what it receives (stands in for the PACS)."""

    def __init__(self, ae_title: str = "PACS", status: int = 0x0000, port: int = 0) -> None:
        self.received: list[pydicom.Dataset] = []
        self.status = status
        self.ae = AE(ae_title=ae_title)
        for cx in AllStoragePresentationContexts:
            self.ae.add_supported_context(cx.abstract_syntax, ["1.2.840.10008.1.2", "1.2.840.10008.1.2.1"])
        self.server = self.ae.start_server(("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_STORE, self._store)])
        self.port = int(self.server.server_address[1])

    def _store(self, event: evt.Event) -> int:
        self.received.append(event.dataset)
        return self.status

    def stop(self) -> None:
        self.server.shutdown()


@pytest.fixture
def pacs():  # type: ignore[no-untyped-def]
    p = FakePacs()
    yield p
    p.stop()


def destination(name: str, port: int, send: str = "signed", tls: bool = False, ae: str = "PACS") -> dict[str, object]:
    return {"name": name, "ae_title": ae, "host": "127.0.0.1", "port": port, "send": send, "tls": tls}


def test_enqueue_follows_send_policy(make_config, database_url: str) -> None:  # type: ignore[no-untyped-def]
    config = make_config(destinations=[destination("a", 1, "signed"), destination("b", 2, "drafts_and_signed")])
    sessions = session_factory(make_engine(database_url))
    with sessions() as s:
        assert [t.destination for t in enqueue(s, config, "1.2.3", "x.dcm", "draft")] == ["b"]
        assert sorted(t.destination for t in enqueue(s, config, "1.2.4", "y.dcm", "signed")) == ["a", "b"]
        s.commit()
        assert len(s.scalars(select(Transfer)).all()) == 3
    with pytest.raises(ValueError):
        with sessions() as s:
            enqueue(s, config, "1.2.5", "z.dcm", "other")


def _stored_sr(node, tmp_path: Path) -> tuple[str, str]:  # type: ignore[no-untyped-def]
    f = make_instance(tmp_path / "sr.dcm", generate_uid())
    ds = pydicom.dcmread(f)
    rel = node.store.instance_relpath(ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID)
    node.store.write_dataset(ds, rel)
    return str(ds.SOPInstanceUID), rel


def test_outbound_sender_delivers(make_config, start_node, pacs: FakePacs, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    node = start_node(make_config(destinations=[destination("pacs", pacs.port)], jobs={"workers": 0}))
    uid, rel = _stored_sr(node, tmp_path)
    with node.sessions() as s:
        enqueue(s, node.config, uid, rel, "signed")
        s.commit()
    wait_for(lambda: pacs.received)
    assert str(pacs.received[0].SOPInstanceUID) == uid

    def done() -> Transfer | None:
        with node.sessions() as s:
            return s.scalars(select(Transfer).where(Transfer.state == TransferState.DONE)).one_or_none()

    t = wait_for(done)
    assert t.attempts == 1 and t.sent_at is not None and t.last_error is None
    with node.sessions() as s:
        assert s.scalars(select(AuditEvent).where(AuditEvent.action == "sent")).one().object_uid == uid


def test_outbound_retries_with_backoff_then_fails_visibly(make_config, start_node, free_port, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    dead = free_port()  # nothing listens there
    config = make_config(destinations=[destination("down", dead)], jobs={"workers": 0, "poll_interval_s": 3600},
                         outbound={"max_attempts": 3, "backoff_s": 0.0})
    node = start_node(config)  # the sender thread sleeps; we drive the queue by hand
    uid, rel = _stored_sr(node, tmp_path)
    with node.sessions() as s:
        enqueue(s, config, uid, rel, "signed")
        s.commit()
    states = []
    for _ in range(3):
        t = process_one(node.sessions, config, node.store, "test", send_file)
        assert t is not None
        states.append((t.state, t.attempts))
        assert "cannot connect" in (t.last_error or "") or "down" in (t.last_error or "")
    assert states == [(TransferState.PENDING, 1), (TransferState.PENDING, 2), (TransferState.FAILED, 3)]
    assert process_one(node.sessions, config, node.store, "test", send_file) is None


def test_outbound_backoff_is_exponential_and_capped(make_config, database_url: str, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    config = make_config(destinations=[destination("pacs", 1)], outbound={"max_attempts": 20, "backoff_s": 600.0})
    sessions = session_factory(make_engine(database_url))
    from dicom_node.store import Store

    store = Store(tmp_path / "s")
    with sessions() as s:
        enqueue(s, config, "1.2.3", "x.dcm", "signed")
        s.commit()

    def refuse(*_a: object) -> int:
        raise SendError("refused with status 0xA700")

    delays = []
    for _ in range(5):
        with sessions() as s:  # make it due now
            s.execute(Transfer.__table__.update().values(next_attempt_at=dt.datetime(2000, 1, 1)))
            s.commit()
        before = dt.datetime.now(dt.UTC).replace(tzinfo=None)
        t = process_one(sessions, config, store, "test", refuse)
        assert t is not None and t.state == TransferState.PENDING
        delays.append(round((t.next_attempt_at - before).total_seconds() / 600))
    assert delays == [1, 2, 4, 6, 6]  # 600, 1200, 2400 s, then capped at 3600 s


def test_outbound_survives_restart(make_config, start_node, free_port, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    port = free_port()
    config = make_config(destinations=[destination("pacs", port)], jobs={"workers": 0})
    node = start_node(config)
    uid, rel = _stored_sr(node, tmp_path)
    with node.sessions() as s:
        enqueue(s, config, uid, rel, "signed")
        s.commit()
    wait_for(lambda: _transfer(node).attempts >= 1)  # the PACS is down: first attempt fails
    node.stop()
    assert _transfer_state(config) == TransferState.PENDING
    pacs = FakePacs(port=port)  # the PACS comes back; a restarted node delivers the queued row
    try:
        node2 = start_node(config)
        with node2.sessions() as s:  # due now rather than after the backoff
            s.execute(Transfer.__table__.update().values(next_attempt_at=dt.datetime(2000, 1, 1)))
            s.commit()
        wait_for(lambda: pacs.received)
        wait_for(lambda: _transfer(node2).state == TransferState.DONE)
        assert str(pacs.received[0].SOPInstanceUID) == uid
    finally:
        pacs.stop()


def _transfer(node) -> Transfer:  # type: ignore[no-untyped-def]
    with node.sessions() as s:
        return s.scalars(select(Transfer)).one()


def _transfer_state(config) -> str:  # type: ignore[no-untyped-def]
    engine = make_engine(config.node.resolved_database_url())
    try:
        with session_factory(engine)() as s:
            return s.scalars(select(Transfer.state)).one()
    finally:
        engine.dispose()


def test_outbound_over_mutual_tls_to_another_node(make_config, start_node, pki, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """Node A sends to node B (standing in for a TLS PACS); both authenticate with certificates."""
    b_dir = tmp_path / "b"
    b_dir.mkdir()
    sec = tls_security(pki, mutual=True)
    node_b = start_node(make_config(node={"ae_title": "PACS", "storage_dir": str(b_dir / "store")},
                                    security=sec, jobs={"workers": 0}))
    a_sec = {"tls_certificate": str(pki["client_cert"]), "tls_private_key": str(pki["client_key"]),
             "tls_ca": str(pki["ca"])}
    node_a = start_node(make_config(security=a_sec, destinations=[destination("pacs", node_b.port, tls=True)],
                                    jobs={"workers": 0}))
    uid, rel = _stored_sr(node_a, tmp_path)
    with node_a.sessions() as s:
        enqueue(s, node_a.config, uid, rel, "signed")
        s.commit()
    wait_for(lambda: _transfer(node_a).state in (TransferState.DONE, TransferState.FAILED))
    assert _transfer(node_a).state == TransferState.DONE, _transfer(node_a).last_error
    with node_b.sessions() as s:
        got = s.scalars(select(Instance)).one()
    assert got.sop_instance_uid == uid and got.calling_ae_title == "CXRNODE"


def test_sender_thread_handles_refusal_status(make_config, start_node, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    refusing = FakePacs(status=0xA700)
    try:
        config = make_config(destinations=[destination("pacs", refusing.port)], jobs={"workers": 0},
                             outbound={"max_attempts": 1})
        node = start_node(config)
        uid, rel = _stored_sr(node, tmp_path)
        with node.sessions() as s:
            enqueue(s, config, uid, rel, "signed")
            s.commit()
        wait_for(lambda: _transfer(node).state == TransferState.FAILED)
        assert "0xA700" in (_transfer(node).last_error or "")
    finally:
        refusing.stop()

