"""The Storage SCP: Verification (PS3.4 A) and every Storage SOP class (PS3.4 B) over pynetdicom.

The ``EVT_C_STORE`` handler is thin (decide, persist, answer):

1. pynetdicom writes the incoming dataset chunk by chunk into a spool file in the store's
   ``tmp/`` folder (chunked receive; see :mod:`dicom_node.pynetdicom_patches`), so
   a large image is never held in memory and the final rename stays on one filesystem;
2. the file is fsynced and its top-level structure checked without decoding pixel data;
3. it is renamed into place, the directory fsynced, the index row committed (one transaction
   with its audit event, :func:`dicom_node.commit.commit_stored`; the file is removed if it fails);
4. only then the handler answers 0x0000.

Statuses returned (PS3.4 B.2.3 and Annex C of PS3.7):

=========  ===============================================================================
0x0000     stored durably and indexed, or an identical re-send of an instance already stored
0x0122     refused, SOP Class not supported: the request's SOP Class differs from the abstract
           syntax of the presentation context it came on (e.g. CT data on a CR context); the
           context is what was negotiated, so the class is not supported *there* (PS3.7 C.5.x)
0xA700     refused, out of resources: below ``node.min_free_space_mb``, ENOSPC, the index could
           not be written, or a deflated data set inflates past ``node.max_inflated_mb``
0xA900     data set does not match SOP class: SOP Class/Instance UID in the data set differs
           from the C-STORE request
0xC210     cannot understand: the data set cannot be parsed or is truncated
0xC212     cannot understand: Study/Series/SOP Instance UID missing or invalid
0xC213     cannot understand: the encoding contradicts the negotiated transfer syntax
0xC214     refused, SOP Instance UID conflict: the UID is already stored with other content or
           in another study/series
0xC215     refused, SOP Instance UID conflict with an object this node generated (its SRs)
0xC211     unexpected exception in the handler (pynetdicom's default)
=========  ===============================================================================

Every failure leaves no file and no index row. Why 0xC214/0xC215: PS3.4 B.2.3 gives a
C-STORE SCP three failure ranges; A7xx means *out of resources* (senders retry it later, and
a UID clash does not go away by waiting), A9xx means the data set does not match the SOP
class, and Cxxx ("cannot understand") is the range left to the SCP for refusing a data set it
will not take; PS3.7's 0x0111 "duplicate SOP instance" is defined for N-CREATE only. The
node already uses C210-C213 for its other refusals, so a clash takes the next two codes.

**Nothing received replaces or removes a stored instance.** A re-sent instance with the same
data set, study and series is acknowledged without rewriting (the File Meta Information may
differ: it names the sender). A received instance whose SOP Instance UID is already stored with
other content or in another study/series is refused with 0xC214; one that reuses the UID of an
object the node generated (a draft or signed SR) is refused with 0xC215 whatever it contains,
unless its data set is identical (a PACS echoing our SR). Both are audited
(``store-refused``). The file is placed with a no-replace link, so a concurrent writer of the
same path (another association, the node writing its SR) cannot be overwritten either.

Connections (PS3.8 9.1.4 ARTIM, 9.1.5): every accepted socket has a timeout. A connection
that has not completed its TLS handshake and A-ASSOCIATE within ``node.acse_timeout_s`` of
being accepted is closed, however it trickles bytes; such connections count against
``node.max_pending_associations`` (the oldest is closed when a new one would exceed it), not
against ``node.max_associations``, so half-sent association requests cannot lock senders out.
Once established, each PDU must arrive within ``node.network_timeout_s`` of its first bytes.
A peer announcing a PDU longer than the maximum we advertised (plus room for large A-ASSOCIATE
items, :data:`MAX_PDU_READ`) is disconnected before anything is allocated for it.

Association policy (A-ASSOCIATE-RJ, PS3.8 7.1.1.9): unknown calling AE title, a peer
outside ``security.allowed_networks`` (both: rejected-permanent, service-user, "calling AE
title not recognized"), a wrong called AE title ("called AE title not recognized"), more than
``node.max_associations`` (rejected-transient, local limit exceeded). TLS and mutual TLS
come from ``[security]``. Logs name AE titles, peer addresses and UIDs, never patient data.
"""

from __future__ import annotations

import collections
import contextlib
import ipaddress
import logging
import os
import socket
import socketserver
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

from pydicom import Dataset
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts, evt
from pynetdicom.association import Association
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from pynetdicom.transport import ThreadedAssociationServer
from pynetdicom.utils import make_target
from sqlalchemy.orm import Session, sessionmaker

from dicom_node import pynetdicom_patches as patches
from dicom_node.commit import StoredFile, commit_stored
from dicom_node.config import Config
from dicom_node.index import InstanceConflict, audit, check_received, register_with_retry
from dicom_node.pynetdicom_patches import MAX_PDU_READ, MAX_PDU_SIZE
from dicom_node.received import (
    CANNOT_UNDERSTAND,
    ENCODING_MISMATCH,
    MISSING_UIDS,
    OUT_OF_RESOURCES,
    SOP_CLASS_MISMATCH,
    Rejected,
    data_set_sha256,
    inspect_received,
    quiet_pydicom,
)
from dicom_node.store import OutOfSpace, SpoolFile, Store, is_enospc

__all__ = [
    "CANNOT_UNDERSTAND",
    "ENCODING_MISMATCH",
    "INSTANCE_CONFLICT",
    "MAX_PDU_READ",
    "MAX_PDU_SIZE",
    "MISSING_UIDS",
    "NODE_OBJECT_CONFLICT",
    "OUT_OF_RESOURCES",
    "SOP_CLASS_MISMATCH",
    "SOP_CLASS_NOT_SUPPORTED",
    "SUCCESS",
    "Rejected",
    "ScpStats",
    "StorageSCP",
    "inspect_received",
    "server_ssl_context",
]

log = logging.getLogger(__name__)

SUCCESS = 0x0000
SOP_CLASS_NOT_SUPPORTED = 0x0122
INSTANCE_CONFLICT = 0xC214
NODE_OBJECT_CONFLICT = 0xC215
# OUT_OF_RESOURCES (0xA700), SOP_CLASS_MISMATCH (0xA900), CANNOT_UNDERSTAND (0xC210),
# MISSING_UIDS (0xC212), ENCODING_MISMATCH (0xC213): see dicom_node.received

_DENIED_AE = "\x00denied\x00"
_INDEX_ATTEMPTS = 5  # a lost race on a new Study/Series row, or a busy database, is retried


class _PendingConnections:
    """Accepted connections that have not yet finished association negotiation.

    At most ``limit`` at once: adding one more closes the oldest of those that have not yet sent
    one whole PDU (a peer that has sent its A-ASSOCIATE-RQ is only waiting for our answer), from
    the peer address that holds the most: a half-open socket cannot keep a newer, faster peer
    out, and a flood from one address evicts its own connections first. Each is closed after
    ``acse_timeout`` in any case, by the read deadline of the accepted socket
    (:class:`~dicom_node.pynetdicom_patches.NodeSocket`), the TLS handshake timeout, or
    pynetdicom's ARTIM timer for a peer that sends nothing at all.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._lock = threading.Lock()
        self._socks: dict[int, tuple[socket.socket, float]] = {}  # insertion order = age
        self._sent: set[int] = set()  # connections whose A-ASSOCIATE-RQ arrived whole
        self.evicted = 0

    def add(self, sock: socket.socket) -> float:
        now = time.monotonic()
        with self._lock:
            for key, (s, _) in list(self._socks.items()):
                if s.fileno() < 0:
                    del self._socks[key]  # closed without telling us
                    self._sent.discard(key)
            victims = []
            while len(self._socks) >= self.limit:
                stalling = {k: v for k, v in self._socks.items() if k not in self._sent} or self._socks
                # the oldest of the peer holding the most: a flood from one address evicts its own
                by_peer = collections.Counter(_peer(s) for s, _ in stalling.values())
                top = by_peer.most_common(1)[0][0]
                key = next(k for k, (s, _) in stalling.items() if _peer(s) == top)
                victims.append(self._socks.pop(key)[0])
                self._sent.discard(key)
            self._socks[id(sock)] = (sock, now)
            self.evicted += len(victims)
        for victim in victims:
            _hard_close(victim)
            log.warning("closed a connection still negotiating from %s: more than "
                        "node.max_pending_associations (%d) at once", _peer(victim), self.limit)
        return now

    def discard(self, sock: Any) -> None:
        with self._lock:
            self._socks.pop(id(sock), None)
            self._sent.discard(id(sock))

    def mark_sent(self, sock: Any) -> None:
        with self._lock:
            if id(sock) in self._socks:
                self._sent.add(id(sock))

    def accepted_at(self, sock: Any) -> float | None:
        with self._lock:
            entry = self._socks.get(id(sock))
        return entry[1] if entry is not None else None

    def __len__(self) -> int:
        with self._lock:
            return sum(1 for s, _ in self._socks.values() if s.fileno() >= 0)


def _peer(sock: socket.socket) -> str:
    try:
        return str(sock.getpeername()[0])
    except (OSError, IndexError):
        return "?"


def _hard_close(sock: socket.socket) -> None:
    """Shut a socket down from another thread: its blocked reads return at once."""
    with contextlib.suppress(OSError):
        socket.socket.shutdown(sock, socket.SHUT_RDWR)  # the plain socket's, also under TLS


class _GuardedServer(ThreadedAssociationServer):
    """pynetdicom's threaded server, with no unbounded wait on an accepted connection.

    pynetdicom accepts on one thread and does the TLS handshake there too, on a socket with
    no timeout: one silent TLS peer stops all accepts. Here the accept thread only accepts;
    the accepted socket gets ``acse_timeout`` as its timeout, the handshake runs on the
    connection's own thread, and the connection is tracked in :class:`_PendingConnections`
    until the association is accepted or rejected.
    """

    cxrnode_acse_timeout: float = 30.0
    cxrnode_network_timeout: float = 120.0
    cxrnode_pending: _PendingConnections
    request_queue_size = 128  # listen backlog (socketserver's default is 5: a burst fills it)

    def get_request(self) -> tuple[socket.socket, tuple[str, int]]:
        listener = cast(socket.socket, self.socket)
        client, address = listener.accept()
        client.settimeout(self.cxrnode_acse_timeout)
        if self.ssl_context:
            client = self.ssl_context.wrap_socket(client, server_side=True, do_handshake_on_connect=False)
        self.cxrnode_pending.add(client)
        return client, address

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        if isinstance(request, ssl.SSLSocket):
            try:
                request.do_handshake()  # bounded by the socket's timeout (acse_timeout)
            except (OSError, ValueError) as exc:
                self.cxrnode_pending.discard(request)
                log.warning("TLS handshake with %s failed: %s", client_address[0], type(exc).__name__)
                self.shutdown_request(request)
                return
        try:
            super().process_request_thread(request, client_address)
        except BaseException:
            self.cxrnode_pending.discard(request)
            raise


# -- the SCP ---------------------------------------------------------------------------------


@dataclass
class ScpStats:
    stored: int = 0
    duplicates: int = 0
    failed: int = 0
    associations: int = 0
    rejected_associations: int = 0


class _PolicyAE(AE):
    """An AE whose calling-AE check also refuses peers outside the allowed networks.

    pynetdicom checks ``require_calling_aet`` in the association's own thread during
    negotiation; for a peer outside ``allowed_networks`` we answer with a list no AE title can
    match, which yields a proper A-ASSOCIATE-RJ (1, 1, 3).
    """

    allowed_networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()

    @property  # type: ignore[override]
    def require_calling_aet(self) -> list[str]:
        titles = patches.calling_ae_titles(self)
        current = threading.current_thread()
        if self.allowed_networks and isinstance(current, Association) and current.is_acceptor:
            try:
                peer = ipaddress.ip_address(current.requestor.address)
            except ValueError:
                return [_DENIED_AE]
            if isinstance(peer, ipaddress.IPv6Address) and peer.ipv4_mapped:
                peer = peer.ipv4_mapped
            if not any(peer in net for net in self.allowed_networks):
                log.warning("association from %s refused: not in security.allowed_networks", peer)
                return [_DENIED_AE]
        return titles

    @require_calling_aet.setter
    def require_calling_aet(self, ae_titles: list[str]) -> None:
        patches.set_calling_ae_titles(self, ae_titles)

    @property
    def active_associations(self) -> list[Association]:
        """As pynetdicom's, except while an acceptor negotiates (pynetdicom's
        ``maximum_associations`` check, PS3.8 A-ASSOCIATE-RJ 2/3/2): then only established
        associations and itself count, so connections still negotiating (half-sent requests)
        cannot use up ``node.max_associations``; they have their own limit."""
        assocs = patches.all_associations(self)
        current = threading.current_thread()
        if isinstance(current, Association) and current.is_acceptor and not current.is_established:
            return [a for a in assocs if a.is_established or a is current]
        return assocs


def server_ssl_context(config: Config) -> ssl.SSLContext | None:
    sec = config.security
    if not sec.tls_certificate:
        return None
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(sec.tls_certificate, sec.tls_private_key)
    if sec.tls_ca:
        ctx.load_verify_locations(sec.tls_ca)
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


class StorageSCP:
    """A running Storage SCP bound to a :class:`Store` and an index."""

    def __init__(self, config: Config, store: Store, sessions: sessionmaker,
                 on_stored: Callable[[str], None] | None = None) -> None:
        self.config = config
        self.store = store
        self.sessions = sessions
        self.on_stored = on_stored
        self.stats = ScpStats()
        self._server: ThreadedAssociationServer | None = None
        self._lock = threading.Lock()
        self.ae = self._build_ae()

    def _build_ae(self) -> AE:
        patches.apply()
        quiet_pydicom()
        n = self.config.node
        ae = _PolicyAE(ae_title=n.ae_title)
        ae.allowed_networks = tuple(ipaddress.ip_network(x, strict=False) for x in self.config.security.allowed_networks)
        patches.receive_into(ae, self.store.tmp_dir, writeback=self.store.fsync)
        ae.maximum_associations = n.max_associations
        # large PDUs: fewer Python-level PDU decodes per megabyte (peers cap it to their own limit)
        ae.maximum_pdu_size = MAX_PDU_SIZE
        ae.acse_timeout = n.acse_timeout_s
        ae.dimse_timeout = n.dimse_timeout_s
        ae.network_timeout = n.network_timeout_s
        ae.require_called_aet = True
        ae.require_calling_aet = list(self.config.security.allowed_calling_ae_titles)
        ae.add_supported_context(Verification, ALL_TRANSFER_SYNTAXES)
        for cx in AllStoragePresentationContexts:
            ae.add_supported_context(str(cx.abstract_syntax), ALL_TRANSFER_SYNTAXES)
        return ae

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self) -> int:
        """Start listening (non-blocking); return the bound port."""
        n = self.config.node
        handlers: list[Any] = [
            (evt.EVT_C_STORE, self._handle_store),
            (evt.EVT_C_ECHO, self._handle_echo),
            (evt.EVT_ACCEPTED, self._handle_accepted),
            (evt.EVT_REJECTED, self._handle_rejected),
            (evt.EVT_RELEASED, self._handle_closed),
            (evt.EVT_ABORTED, self._handle_closed),
            (evt.EVT_CONN_CLOSE, self._handle_conn_close),
        ]
        server = cast(_GuardedServer, self.ae.make_server(
            (n.host, n.port), evt_handlers=handlers, ssl_context=server_ssl_context(self.config),
            server_class=_GuardedServer, request_handler=patches.AcceptorHandler,
        ))
        server.cxrnode_acse_timeout = n.acse_timeout_s
        server.cxrnode_network_timeout = n.network_timeout_s
        server.cxrnode_pending = _PendingConnections(n.max_pending_associations)
        # as AE.start_server(block=False) does, with our server class
        threading.Thread(target=make_target(server.serve_forever), name="cxrnode-scp-accept", daemon=True).start()
        patches.register_server(self.ae, server)
        # accepted sockets inherit this on Linux: small C-STORE responses go out at once
        # instead of waiting for a delayed ACK (40 ms per instance on loopback otherwise)
        with contextlib.suppress(OSError):
            server.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # type: ignore[union-attr]
        self._server = server
        port = int(server.server_address[1])
        log.info("Storage SCP %s listening on %s:%d%s", n.ae_title, n.host, port,
                 " (TLS)" if self.config.security.tls_certificate else "")
        active, line = patches.fast_path_summary()
        log.log(logging.INFO if active else logging.WARNING, "%s", line)
        return port

    @property
    def port(self) -> int:
        assert self._server is not None
        return int(self._server.server_address[1])

    def active_associations(self) -> int:
        if self._server is None:
            return 0
        return len(self._server.active_associations)

    def pending_connections(self) -> int:
        """Connections accepted but still negotiating (TLS handshake, A-ASSOCIATE)."""
        server = self._server
        return len(server.cxrnode_pending) if isinstance(server, _GuardedServer) else 0

    def _negotiated(self, assoc: Any) -> None:
        server = self._server
        sock = getattr(getattr(getattr(assoc, "dul", None), "socket", None), "socket", None)
        if isinstance(server, _GuardedServer) and sock is not None:
            server.cxrnode_pending.discard(sock)

    def stop(self, grace_s: float | None = None) -> None:
        """Stop accepting, let in-flight associations finish (up to ``grace_s``), then close."""
        server = self._server
        if server is None:
            return
        self._server = None
        grace = self.config.node.network_timeout_s if grace_s is None else grace_s
        # stop the accept loop and close the listening socket: no new associations
        socketserver.BaseServer.shutdown(server)
        server.server_close()
        deadline = time.monotonic() + grace
        while server.active_associations and time.monotonic() < deadline:
            time.sleep(0.05)
        for assoc in list(server.active_associations):
            log.warning("aborting association with %r at shutdown", assoc.requestor.ae_title)
            assoc.abort()
        patches.unregister_server(self.ae, server)
        log.info("Storage SCP stopped (%d stored, %d failed)", self.stats.stored, self.stats.failed)

    # -- handlers ----------------------------------------------------------------------------
    def _handle_echo(self, event: evt.Event) -> int:
        return SUCCESS

    def _handle_accepted(self, event: evt.Event) -> None:
        with self._lock:
            self.stats.associations += 1
        a = event.assoc
        self._negotiated(a)
        log.info("association accepted from %r (%s:%s)", a.requestor.ae_title, a.requestor.address, a.requestor.port)

    def _handle_rejected(self, event: evt.Event) -> None:
        with self._lock:
            self.stats.rejected_associations += 1
        a = event.assoc
        self._negotiated(a)
        called = getattr(getattr(a.requestor, "primitive", None), "called_ae_title", "?")
        log.warning("association rejected: calling AE %r, called AE %r, peer %s",
                    a.requestor.ae_title, called, a.requestor.address)

    def _handle_closed(self, event: evt.Event) -> None:
        log.debug("association with %r closed", event.assoc.requestor.ae_title)

    def _handle_conn_close(self, event: evt.Event) -> None:
        """Delete spool files of data sets that never arrived completely (abort, lost peer)."""
        self._negotiated(event.assoc)
        leftovers = getattr(event.assoc, "cxrnode_spools", None)
        while leftovers:
            spool = leftovers.pop()
            spool.discard()
            log.warning("incomplete data set from %r discarded (connection closed)", event.assoc.requestor.ae_title)

    def _handle_store(self, event: evt.Event) -> int:
        req: Any = event.request
        spool = patches.received_file(req)
        calling = str(event.assoc.requestor.ae_title).strip()
        sop_uid = str(req.AffectedSOPInstanceUID)
        try:
            status = self._store(event, spool, calling)
        except Exception:
            log.exception("C-STORE of %r from %r failed unexpectedly", sop_uid, calling)
            status = 0xC211
        finally:
            if isinstance(spool, SpoolFile):
                spool.discard()  # a committed spool was renamed away; discard leaves it alone
                getattr(event.assoc, "cxrnode_spools", set()).discard(spool)
        with self._lock:
            if status == SUCCESS:
                self.stats.stored += 1
            else:
                self.stats.failed += 1
        return status

    def _store(self, event: evt.Event, spool: Any, calling: str) -> int:
        req: Any = event.request
        sop_uid = str(req.AffectedSOPInstanceUID)
        sop_class = str(req.AffectedSOPClassUID)
        context_class = str(getattr(event.context, "abstract_syntax", "") or "")
        if sop_class != context_class:
            log.warning("C-STORE of %r from %r refused with 0x%04X: SOP Class %r sent on a presentation context "
                        "for %r", sop_uid, calling, SOP_CLASS_NOT_SUPPORTED, sop_class, context_class)
            return SOP_CLASS_NOT_SUPPORTED
        if isinstance(spool, SpoolFile):
            return self._store_spool(spool, sop_class, sop_uid, calling)
        # the fast path is off (see the start-up self-check): pynetdicom kept the data set
        # elsewhere; copy it into a spool file in tmp/ so it is checked and placed the same way
        spool = self._copy_to_spool(event)
        try:
            return self._store_spool(spool, sop_class, sop_uid, calling)
        finally:
            spool.discard()

    def _store_spool(self, spool: SpoolFile, sop_class: str, sop_uid: str, calling: str) -> int:
        """Check a received data set in ``spool`` and place and index it (or refuse it)."""
        try:
            spool.finish(self.store.fsync)
        except OSError as exc:
            if is_enospc(exc):
                log.error("C-STORE of %r refused: disk full (ENOSPC)", sop_uid)
                return OUT_OF_RESOURCES
            raise
        try:
            self.store.check_space()
        except OutOfSpace as exc:
            log.error("C-STORE of %r refused: %s", sop_uid, exc.strerror)
            return OUT_OF_RESOURCES
        try:
            ds = inspect_received(spool.name, sop_class, sop_uid, self._max_inflated)
        except Rejected as exc:
            log.warning("C-STORE of %r from %r refused with 0x%04X: %s", sop_uid, calling, exc.status, exc.reason)
            return exc.status
        relpath = self.store.instance_relpath(ds.StudyInstanceUID, ds.SeriesInstanceUID, sop_uid)
        sha = spool.sha256.hexdigest()

        def place() -> None:
            self.store.commit_spool(spool, relpath, replace=False)

        return self._accept(ds, relpath, spool.size, sha, calling, place, spool.name)

    @property
    def _max_inflated(self) -> int:
        return self.config.node.max_inflated_mb * (1 << 20)

    def _copy_to_spool(self, event: evt.Event) -> SpoolFile:
        """The received data set as a Part 10 file in a new spool file (not yet finished): from
        the file pynetdicom wrote (chunked receive without our spool files) or from memory."""
        spool = self.store.new_spool()
        try:
            try:
                received = event.dataset_path
            except AttributeError:
                received = None
            path = Path(received) if received else None  # None: not received chunked, in memory
            if path is None:
                spool.write(event.encoded_dataset(include_meta=True))
            else:
                with open(path, "rb") as f:
                    while chunk := f.read(1 << 20):
                        spool.write(chunk)
        except BaseException:
            spool.discard()
            raise
        return spool

    def _same_data_set(self, relpath: str, received: str | os.PathLike[str]) -> bool:
        """Whether the stored file at ``relpath`` and the received file hold the same data set
        (File Meta Information aside: it names the sender, so an echo differs there)."""
        try:
            return data_set_sha256(self.store.abspath(relpath)) == data_set_sha256(received)
        except (OSError, ValueError):
            return False

    def _accept(self, ds: Dataset, relpath: str, size: int, sha: str, calling: str,
                place: Callable[[], Any], received: str | os.PathLike[str]) -> int:
        """Place and index a checked instance unless its SOP Instance UID is taken (see the
        module docstring); ``place()`` puts the file at ``relpath`` or raises FileExistsError.
        ``received`` is the received file (still in tmp/)."""
        sop_uid = str(ds.SOPInstanceUID)
        try:
            with self.sessions() as s:
                identical = check_received(s, sop_uid, relpath, sha)
        except InstanceConflict as exc:
            if exc.stored_path == relpath and self._same_data_set(relpath, received):
                log.info("instance %r re-sent by %r: identical data set, kept", sop_uid, calling)
                return SUCCESS
            return self._refuse(ds, exc, calling)
        if identical and self.store.file_sha256(relpath) == sha:
            log.info("instance %r re-sent by %r: identical, kept", sop_uid, calling)
            return SUCCESS
        placed = True
        try:
            place()
        except FileExistsError:
            # a file without a matching index row: another association or the node itself is
            # storing it right now, or a crash left it; it is not ours to replace
            placed = False
            if self.store.file_sha256(relpath) != sha:
                return self._refuse(ds, InstanceConflict(sop_uid, "is being stored with different content", False,
                                                         str(ds.StudyInstanceUID), relpath), calling)
        except OSError as exc:
            if is_enospc(exc):
                log.error("C-STORE of %r refused: disk full (ENOSPC) while committing", sop_uid)
                return OUT_OF_RESOURCES
            raise
        return self._index(ds, relpath, size, sha, calling, placed)

    def _refuse(self, ds: Dataset, exc: InstanceConflict, calling: str) -> int:
        """Refuse a SOP Instance UID clash with 0xC214/0xC215 and audit it (UIDs only)."""
        status = NODE_OBJECT_CONFLICT if exc.node_object else INSTANCE_CONFLICT
        sop_uid = str(ds.SOPInstanceUID)
        study_uid = str(ds.StudyInstanceUID)
        log.warning("C-STORE of %r (study %r) from %r refused with 0x%04X: the SOP Instance UID %s (stored in study %r)",
                    sop_uid, study_uid, calling, status, exc.reason, exc.study_uid)
        detail = (f"0x{status:04X}: {exc.reason}; stored in study {exc.study_uid!r}, sent for study {study_uid!r} "
                  f"series {str(ds.SeriesInstanceUID)!r}")
        try:
            register_with_retry(self.sessions, lambda s: audit(s, calling, "store-refused", study_uid, sop_uid, detail))
        except Exception:
            log.exception("audit of a refused C-STORE of %r failed", sop_uid)
        return status

    def _index(self, ds: Dataset, relpath: str, size: int, sha: str, calling: str, placed: bool) -> int:
        """Record a placed instance with the commit service (the file is removed again if that
        fails and ``placed`` says this association put it there)."""
        sop_uid = str(ds.SOPInstanceUID)
        study_uid = str(ds.StudyInstanceUID)

        def recorded(session: Session) -> bool:
            # checked again in the transaction that writes: the index is the arbiter
            return not check_received(session, sop_uid, relpath, sha)

        def received(session: Session, stored: StoredFile) -> None:
            audit(session, calling, "received", study_uid, sop_uid, f"{stored.size} bytes")

        try:
            done = commit_stored(self.store, self.sessions, ds, StoredFile(relpath, size, sha), received,
                                 registered_by=calling, generated=False, prepare=recorded,
                                 remove_on_failure=placed, attempts=_INDEX_ATTEMPTS)
        except InstanceConflict as exc:
            return self._refuse(ds, exc, calling)
        except Exception:
            log.exception("C-STORE of %r refused: the index could not be written", sop_uid)
            return OUT_OF_RESOURCES
        if not done.new:
            log.info("instance %r re-sent by %r: identical, kept", sop_uid, calling)
            return SUCCESS
        log.debug("stored %r (study %r) from %r, %d bytes", sop_uid, study_uid, calling, size)
        if self.on_stored is not None:
            self.on_stored(study_uid)
        return SUCCESS
