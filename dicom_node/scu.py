"""The Storage SCU: send one stored file to a destination with C-STORE (PS3.4 B, PS3.7 9.1.1).

Proposes the file's own transfer syntax first (so it is sent as stored), with explicit and
implicit VR little endian as fall-backs for uncompressed files. TLS, when the destination asks
for it, uses ``[security]``'s certificate and key (our client identity for mutual TLS) and
verifies the peer against ``tls_ca`` (or the system store when that is empty).
"""

from __future__ import annotations

import logging
import os
import socket
import ssl
import threading
from dataclasses import dataclass

from pydicom import dcmread
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from sqlalchemy.orm import sessionmaker

from dicom_node.config import Config, Destination
from dicom_node.jobs import default_worker_id
from dicom_node.outbound import Sender, process_one
from dicom_node.store import Store

log = logging.getLogger(__name__)

# success and the warning statuses of PS3.4 B.2.3: the object is stored
STORED_STATUSES = {0x0000, 0xB000, 0xB006, 0xB007}


class SendError(RuntimeError):
    """A C-STORE to a destination did not store the object; the message says why."""


def client_ssl_context(config: Config) -> ssl.SSLContext:
    sec = config.security
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=sec.tls_ca or None)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if sec.tls_certificate:
        ctx.load_cert_chain(sec.tls_certificate, sec.tls_private_key)
    return ctx


def send_file(config: Config, destination: Destination, path: str | os.PathLike[str]) -> int:
    """C-STORE the DICOM file at ``path`` to ``destination`` (PS3.4 B, PS3.7 9.1.1).

    Parameters
    ----------
    config:
        The node's configuration (its AE title, timeouts and, for TLS, ``[security]``).
    destination:
        Where to send it (``destination.tls``: TLS, verified against ``security.tls_ca``).
    path:
        The file to send, as stored (its transfer syntax is proposed first).

    Returns
    -------
    int
        The C-STORE response status (one of :data:`STORED_STATUSES`).

    Raises
    ------
    SendError
        No connection, association refused or aborted, no response, or a failure status; the
        message says which.
    """
    ds = dcmread(path)
    sop_class = str(ds.SOPClassUID)
    ts = UID(str(ds.file_meta.TransferSyntaxUID))
    syntaxes = [ts] + ([] if ts.is_compressed else [s for s in (ExplicitVRLittleEndian, ImplicitVRLittleEndian) if s != ts])
    ae = AE(ae_title=config.node.ae_title)
    ae.acse_timeout = config.node.acse_timeout_s
    ae.dimse_timeout = config.node.dimse_timeout_s
    ae.network_timeout = config.node.network_timeout_s
    ae.add_requested_context(sop_class, syntaxes)
    tls_args = (client_ssl_context(config), destination.host) if destination.tls else None
    try:
        assoc = ae.associate(destination.host, destination.port, ae_title=destination.ae_title, tls_args=tls_args)
    except (OSError, ssl.SSLError) as exc:
        raise SendError(f"cannot connect to {destination.name} ({destination.host}:{destination.port}): {exc}") from exc
    if not assoc.is_established:
        what = "rejected" if assoc.is_rejected else "aborted" if assoc.is_aborted else "not established"
        raise SendError(f"association with {destination.name} ({destination.ae_title}@{destination.host}:"
                        f"{destination.port}) {what}")
    try:
        status = assoc.send_c_store(ds)
    except Exception as exc:
        assoc.abort()
        raise SendError(f"C-STORE to {destination.name} failed: {type(exc).__name__}: {exc}") from exc
    try:
        if not status or "Status" not in status:
            assoc.abort()
            raise SendError(f"C-STORE to {destination.name}: no response (timeout or abort)")
        code = int(status.Status)
        if code not in STORED_STATUSES:
            raise SendError(f"C-STORE to {destination.name} refused with status 0x{code:04X}")
        log.info("sent %s to %s (status 0x%04X)", ds.SOPInstanceUID, destination.name, code)
        return code
    finally:
        if assoc.is_established:
            assoc.release()


@dataclass(frozen=True)
class EchoResult:
    """Outcome of a C-ECHO: ``ok``; ``message`` for people; ``answered``: a DICOM peer
    responded at all (an association rejection counts, a refused TCP connection does not)."""

    ok: bool
    message: str
    answered: bool


def echo(config: Config, destination: Destination, timeout_s: float | None = None) -> EchoResult:
    """C-ECHO (PS3.7 9.1.5) ``destination`` with our AE title, timeouts and TLS settings."""
    node = config.node

    def limit(value: float) -> float:
        return min(value, timeout_s) if timeout_s else value

    ae = AE(ae_title=node.ae_title)
    ae.acse_timeout = limit(node.acse_timeout_s)
    ae.dimse_timeout = limit(node.dimse_timeout_s)
    ae.network_timeout = limit(node.network_timeout_s)
    if timeout_s:
        ae.connection_timeout = timeout_s
    ae.add_requested_context(Verification)
    host, port = destination.host, destination.port
    try:
        tls_args = (client_ssl_context(config), host) if destination.tls else None
        assoc = ae.associate(host, port, ae_title=destination.ae_title, tls_args=tls_args)
    except (OSError, ssl.SSLError) as exc:
        return EchoResult(False, f"cannot connect: {exc}", False)
    if not assoc.is_established:
        if assoc.is_rejected:
            return EchoResult(False, f"the peer rejected the association (does it accept our AE title {node.ae_title}?)", True)
        try:  # say why: nothing listening, or something that is not a DICOM node
            with socket.create_connection((host, port), timeout=timeout_s or node.acse_timeout_s):
                pass
        except OSError as exc:
            return EchoResult(False, f"cannot connect: {exc.strerror or exc}", False)
        return EchoResult(False, "connected, but no DICOM association (aborted: not a DICOM node, or TLS mismatch?)", False)
    try:
        status = assoc.send_c_echo()
    finally:
        if assoc.is_established:
            assoc.release()
    if not status or "Status" not in status:
        return EchoResult(False, "no C-ECHO response (timeout or abort)", True)
    code = int(status.Status)
    return EchoResult(code == 0, "C-ECHO succeeded" if code == 0 else f"C-ECHO status 0x{code:04X}", True)


class OutboundSender(threading.Thread):
    """Sends due transfers until stopped; polls every ``jobs.poll_interval_s``."""

    def __init__(self, config: Config, sessions: sessionmaker, store: Store, stop: threading.Event,
                 send: Sender | None = None) -> None:
        super().__init__(name="cxrnode-outbound", daemon=True)
        self.config, self.sessions, self.store, self.stop_event, self.send = config, sessions, store, stop, (send or send_file)
        self.sender_id = f"{default_worker_id(config.node.host_id)}:outbound"

    def run(self) -> None:
        while not self.stop_event.is_set():
            try:
                t = process_one(self.sessions, self.config, self.store, self.sender_id, self.send)
            except Exception:
                log.exception("outbound sender failed")
                t = None
            if t is None:
                self.stop_event.wait(self.config.jobs.poll_interval_s)
