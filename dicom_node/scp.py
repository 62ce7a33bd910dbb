"""The Storage SCP: Verification (PS3.4 A) and every Storage SOP class (PS3.4 B) over pynetdicom.

The ``EVT_C_STORE`` handler is thin (decide, persist, answer):

1. pynetdicom writes the incoming dataset chunk by chunk into a spool file in the store's
   ``tmp/`` folder (``_config.STORE_RECV_CHUNKED_DATASET``; see :func:`install_spooling`), so
   a large image is never held in memory and the final rename stays on one filesystem;
2. the file is fsynced and its top-level structure checked without decoding pixel data;
3. it is renamed into place, the directory fsynced, the index row committed;
4. only then the handler answers 0x0000.

Statuses returned (PS3.4 B.2.3 and Annex C of PS3.7):

=========  ===============================================================================
0x0000     stored durably and indexed
0xA700     refused, out of resources: below ``node.min_free_space_mb``, ENOSPC, or the index
           could not be written
0xA900     data set does not match SOP class: SOP Class/Instance UID in the data set differs
           from the C-STORE request
0xC210     cannot understand: the data set cannot be parsed or is truncated
0xC212     cannot understand: Study/Series/SOP Instance UID missing or invalid
0xC213     cannot understand: the encoding contradicts the negotiated transfer syntax
0xC211     unexpected exception in the handler (pynetdicom's default)
=========  ===============================================================================

Every failure leaves no file and no index row. A re-sent instance with the same content is
acknowledged without rewriting; with new content it replaces the old file and is re-indexed.

Association policy (A-ASSOCIATE-RJ, PS3.8 7.1.1.9): unknown calling AE title, a peer
outside ``security.allowed_networks`` (both: rejected-permanent, service-user, "calling AE
title not recognized"), a wrong called AE title ("called AE title not recognized"), more than
``node.max_associations`` (rejected-transient, local limit exceeded). TLS and mutual TLS
come from ``[security]``. Logs name AE titles, peer addresses and UIDs, never patient data.
"""

from __future__ import annotations

import contextlib
import contextvars
import ipaddress
import logging
import os
import select as io_select
import socket
import socketserver
import ssl
import tempfile
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

from pydicom import Dataset, dcmread
from pydicom.tag import Tag
from pydicom.uid import UID, DeflatedExplicitVRLittleEndian
from pynetdicom import (
    AE,
    ALL_TRANSFER_SYNTAXES,
    AllStoragePresentationContexts,
    _config,
    evt,
)
from pynetdicom import dimse_messages as _dimse_messages
from pynetdicom.association import Association
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from pynetdicom.transport import AssociationSocket, ThreadedAssociationServer
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from dicom_node.config import Config
from dicom_node.db import Instance
from dicom_node.index import audit, register_instance, register_with_retry
from dicom_node.store import OutOfSpace, SpoolFile, Store, is_enospc

log = logging.getLogger(__name__)

SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700
SOP_CLASS_MISMATCH = 0xA900
CANNOT_UNDERSTAND = 0xC210
MISSING_UIDS = 0xC212
ENCODING_MISMATCH = 0xC213

_PIXEL_DATA = Tag(0x7FE0, 0x0010)
_UNDEFINED = 0xFFFFFFFF
MAX_PDU_SIZE = 1 << 20  # what we advertise as our maximum receive PDU length (PS3.8 D.1)
_DENIED_AE = "\x00denied\x00"

# -- spooling: make pynetdicom's chunked receive write into the store's tmp/ ----------------

_spool_target: contextvars.ContextVar[tuple[Path, Any] | None] = contextvars.ContextVar("cxrnode_spool", default=None)
_installed = False
_install_lock = threading.Lock()


def _spool_factory(*args: Any, **kwargs: Any) -> Any:
    target = _spool_target.get()
    if target is None:  # another pynetdicom SCP in this process (e.g. a test peer)
        return tempfile.NamedTemporaryFile(*args, **kwargs)  # noqa: SIM115
    directory, assoc = target
    spool = SpoolFile(directory, writeback=getattr(assoc.ae, "cxrnode_writeback", False))
    # remembered on the association so an abort mid-data-set cannot leak the file
    assoc.cxrnode_spools.add(spool)
    return spool


def install_spooling() -> None:
    """Receive C-STORE data sets into :class:`SpoolFile` objects in the store's ``tmp/``.

    pynetdicom (3.0) creates its chunk file with ``NamedTemporaryFile`` inside
    ``DIMSEMessage.decode_msg(primitive, assoc)``; we wrap that call to tell the factory which
    AE (and so which store) the data belongs to. Process-wide and idempotent.
    """
    global _installed
    with _install_lock:
        if _installed:
            return
        _config.STORE_RECV_CHUNKED_DATASET = True
        original = _dimse_messages.DIMSEMessage.decode_msg

        def decode_msg(self: Any, primitive: Any, assoc: Any = None) -> bool:
            directory = getattr(getattr(assoc, "ae", None), "cxrnode_spool_dir", None)
            if directory is not None and not hasattr(assoc, "cxrnode_spools"):
                assoc.cxrnode_spools = set()
            token = _spool_target.set((directory, assoc) if directory is not None else None)
            try:
                return original(self, primitive, assoc)
            finally:
                _spool_target.reset(token)

        _dimse_messages.DIMSEMessage.decode_msg = decode_msg  # type: ignore[method-assign]
        _dimse_messages.NamedTemporaryFile = _spool_factory  # type: ignore[attr-defined]
        AssociationSocket.recv = _recv_exactly  # type: ignore[method-assign]
        _installed = True


_READY_WAIT_S = 0.001


class _WaitingSocket(AssociationSocket):
    """The socket of an accepted association. pynetdicom's DUL loop checks ``ready`` with an
    instant ``select`` and, when nothing is there, sleeps a fixed 1 ms: while a large data set
    streams in, that sleep fires whenever the sender is a moment behind (about 7 ms per 8 MB
    image here). This ``ready`` instead waits up to 1 ms for data and returns as soon as some
    arrives; the loop's own sleep is set to 0, so an idle association still wakes about once a
    millisecond, as before, and outgoing messages wait no longer than before."""

    @property
    def ready(self) -> bool:
        sock = self.socket
        if sock is None or self._is_connected is False:
            return False
        if isinstance(sock, ssl.SSLSocket) and sock.pending():  # buffered TLS data select() cannot see
            return True
        try:
            readable, _, _ = io_select.select([sock], [], [], _READY_WAIT_S)
        except (OSError, TimeoutError, ValueError):
            self.event_queue.put("Evt17")  # transport connection closed, as pynetdicom does
            return False
        return bool(readable)


def _wait_for_data(assoc: Association) -> None:
    dul: Any = assoc.dul
    if type(dul.socket) is AssociationSocket:
        dul.socket.__class__ = _WaitingSocket
        dul._run_loop_delay = 0.0


def _recv_exactly(self: AssociationSocket, nr_bytes: int) -> bytearray:
    """``AssociationSocket.recv`` with the same contract (block until ``nr_bytes`` were read,
    return what there is if the peer closes) but reading straight into one buffer: pynetdicom
    3.0 reads 4 KiB per call and appends, 256 calls and copies per MiB of pixel data."""
    sock = cast(socket.socket, self.socket)
    buf = bytearray(nr_bytes)
    view = memoryview(buf)
    got = 0
    while got < nr_bytes:
        n = sock.recv_into(view[got:], nr_bytes - got)
        if not n:
            del view
            return buf[:got]
        got += n
    return buf


# -- checking what was received --------------------------------------------------------------


class Rejected(Exception):
    """The received data set is refused with ``status``."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


_VRS = frozenset(
    b"AE AS AT CS DA DS DT FD FL IS LO LT OB OD OF OL OV OW PN SH SL SQ SS ST SV TM UC UI UL UN UR US UT UV".split()
)
_SEQ_DELIMITER = {True: b"\xfe\xff\xdd\xe0\x00\x00\x00\x00", False: b"\xff\xfe\xe0\xdd\x00\x00\x00\x00"}


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
        raise Rejected(ENCODING_MISMATCH, f"transfer syntax {ts} is implicit VR but the data set is explicit VR")
    if not ts.is_implicit_VR and not looks_explicit:
        raise Rejected(ENCODING_MISMATCH, f"transfer syntax {ts} is explicit VR but the data set is implicit VR")
    return offset, little


def inspect_received(path: str | os.PathLike[str], request_sop_class: str, request_sop_instance: str) -> Dataset:
    """Parse a received file just enough to index it and to refuse what cannot be trusted.

    Large values (pixel data) are not read (``defer_size``); the check is structural: every
    top-level element must lie inside the file, the file must end where the last element ends
    (or, when that is of undefined length, with a Sequence Delimitation Item), and the first
    element's encoding must agree with the transfer syntax. Raises :class:`Rejected`.
    """
    size = os.path.getsize(path)
    try:
        meta_ts = UID(str(dcmread(path, stop_before_pixels=True, specific_tags=[]).file_meta.get("TransferSyntaxUID", "")))
    except Exception as exc:
        raise Rejected(CANNOT_UNDERSTAND, f"unreadable File Meta Information: {type(exc).__name__}: {exc}") from None
    body_offset, little = _check_encoding(path, meta_ts)
    with warnings.catch_warnings():
        # pydicom warns about what we check ourselves; keep that noise out of the logs
        warnings.simplefilter("ignore")
        try:
            ds = dcmread(path, defer_size=64 * 1024)
        except Exception as exc:
            raise Rejected(CANNOT_UNDERSTAND, f"unreadable data set: {type(exc).__name__}: {exc}") from None
    if not ds._dict and size > body_offset:  # noqa: SLF001
        # pydicom gives up silently on e.g. encapsulated data cut before its delimiter
        raise Rejected(CANNOT_UNDERSTAND, "unreadable data set: no element could be read")
    # walk the raw top level before anything converts it; offsets of a deflated data set
    # refer to the inflated stream, so only the short-read checks apply there
    deflated = meta_ts == DeflatedExplicitVRLittleEndian
    last_end = 0
    tags = sorted(ds._dict)  # noqa: SLF001 - raw elements carry their file offsets
    for tag in tags:
        raw = ds._dict[tag]  # noqa: SLF001
        tell = getattr(raw, "value_tell", None)
        length = getattr(raw, "length", None)
        if length == _UNDEFINED:
            if tag == tags[-1] and not deflated:
                with open(path, "rb") as f:
                    f.seek(max(size - 8, 0))
                    if f.read(8) != _SEQ_DELIMITER[little]:
                        raise Rejected(CANNOT_UNDERSTAND, f"truncated data set: {Tag(tag)} has no delimiter")
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

    ts = UID(str(ds.file_meta.get("TransferSyntaxUID", "")))
    pixel = ds._dict.get(_PIXEL_DATA)  # noqa: SLF001
    if pixel is not None and ts:
        undefined = getattr(pixel, "length", 0) == _UNDEFINED or getattr(pixel, "is_undefined_length", False)
        if ts.is_compressed and not undefined:
            raise Rejected(ENCODING_MISMATCH, f"transfer syntax {ts} is encapsulated but Pixel Data is native")
        if not ts.is_compressed and undefined:
            raise Rejected(ENCODING_MISMATCH, f"transfer syntax {ts} is native but Pixel Data is encapsulated")

    try:
        sop_class = str(ds.SOPClassUID)
        sop_instance = str(ds.SOPInstanceUID)
        study_uid = str(ds.StudyInstanceUID)
        series_uid = str(ds.SeriesInstanceUID)
    except AttributeError as exc:
        raise Rejected(MISSING_UIDS, f"required identifier missing: {exc}") from None
    except Exception as exc:
        raise Rejected(CANNOT_UNDERSTAND, f"identifiers unreadable: {exc}") from None
    for name, value in (("StudyInstanceUID", study_uid), ("SeriesInstanceUID", series_uid),
                        ("SOPInstanceUID", sop_instance)):
        if not UID(value).is_valid:
            raise Rejected(MISSING_UIDS, f"{name} is not a valid UID")
    if sop_class != request_sop_class:
        raise Rejected(SOP_CLASS_MISMATCH, f"SOP Class UID {sop_class} differs from the request's {request_sop_class}")
    if sop_instance != request_sop_instance:
        raise Rejected(
            SOP_CLASS_MISMATCH, f"SOP Instance UID {sop_instance} differs from the request's {request_sop_instance}"
        )
    return ds


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
        titles: list[str] = list(self._require_calling_aet)
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
        AE.require_calling_aet.fset(self, ae_titles)  # type: ignore[attr-defined]


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
        install_spooling()
        n = self.config.node
        ae = _PolicyAE(ae_title=n.ae_title)
        ae.allowed_networks = tuple(ipaddress.ip_network(x, strict=False) for x in self.config.security.allowed_networks)
        ae.cxrnode_spool_dir = self.store.tmp_dir  # type: ignore[attr-defined]
        ae.cxrnode_writeback = self.store.fsync  # type: ignore[attr-defined]
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
        server = self.ae.start_server((n.host, n.port), block=False, evt_handlers=handlers,
                                      ssl_context=server_ssl_context(self.config))
        assert server is not None
        # accepted sockets inherit this on Linux: small C-STORE responses go out at once
        # instead of waiting for a delayed ACK (40 ms per instance on loopback otherwise)
        with contextlib.suppress(OSError):
            server.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # type: ignore[union-attr]
        self._server = server
        port = int(server.server_address[1])
        log.info("Storage SCP %s listening on %s:%d%s", n.ae_title, n.host, port,
                 " (TLS)" if self.config.security.tls_certificate else "")
        return port

    @property
    def port(self) -> int:
        assert self._server is not None
        return int(self._server.server_address[1])

    def active_associations(self) -> int:
        if self._server is None:
            return 0
        return len(self._server.active_associations)

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
            log.warning("aborting association with %s at shutdown", assoc.requestor.ae_title)
            assoc.abort()
        try:
            self.ae._servers.remove(server)  # noqa: SLF001
        except ValueError:
            pass
        log.info("Storage SCP stopped (%d stored, %d failed)", self.stats.stored, self.stats.failed)

    # -- handlers ----------------------------------------------------------------------------
    def _handle_echo(self, event: evt.Event) -> int:
        return SUCCESS

    def _handle_accepted(self, event: evt.Event) -> None:
        with self._lock:
            self.stats.associations += 1
        a = event.assoc
        _wait_for_data(a)
        log.info("association accepted from %s (%s:%s)", a.requestor.ae_title, a.requestor.address, a.requestor.port)

    def _handle_rejected(self, event: evt.Event) -> None:
        with self._lock:
            self.stats.rejected_associations += 1
        a = event.assoc
        called = getattr(getattr(a.requestor, "primitive", None), "called_ae_title", "?")
        log.warning("association rejected: calling AE %r, called AE %r, peer %s",
                    a.requestor.ae_title, called, a.requestor.address)

    def _handle_closed(self, event: evt.Event) -> None:
        log.debug("association with %s closed", event.assoc.requestor.ae_title)

    def _handle_conn_close(self, event: evt.Event) -> None:
        """Delete spool files of data sets that never arrived completely (abort, lost peer)."""
        leftovers = getattr(event.assoc, "cxrnode_spools", None)
        while leftovers:
            spool = leftovers.pop()
            spool.discard()
            log.warning("incomplete data set from %s discarded (connection closed)", event.assoc.requestor.ae_title)

    def _handle_store(self, event: evt.Event) -> int:
        req: Any = event.request
        spool = getattr(req, "_dataset_file", None)
        calling = str(event.assoc.requestor.ae_title).strip()
        sop_uid = str(req.AffectedSOPInstanceUID)
        try:
            status = self._store(event, spool, calling)
        except Exception:
            log.exception("C-STORE of %s from %s failed unexpectedly", sop_uid, calling)
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
        if not isinstance(spool, SpoolFile):
            return self._store_path(Path(event.dataset_path), sop_class, sop_uid, calling)
        try:
            spool.finish(self.store.fsync)
        except OSError as exc:
            if is_enospc(exc):
                log.error("C-STORE of %s refused: disk full (ENOSPC)", sop_uid)
                return OUT_OF_RESOURCES
            raise
        try:
            self.store.check_space()
        except OutOfSpace as exc:
            log.error("C-STORE of %s refused: %s", sop_uid, exc.strerror)
            return OUT_OF_RESOURCES
        try:
            ds = inspect_received(spool.name, sop_class, sop_uid)
        except Rejected as exc:
            log.warning("C-STORE of %s from %s refused with 0x%04X: %s", sop_uid, calling, exc.status, exc.reason)
            return exc.status
        relpath = self.store.instance_relpath(ds.StudyInstanceUID, ds.SeriesInstanceUID, sop_uid)
        sha = spool.sha256.hexdigest()
        existed = self.store.abspath(relpath).exists()
        if existed and self._already_stored(sop_uid, sha, relpath):
            log.info("instance %s re-sent by %s: identical, kept", sop_uid, calling)
            return SUCCESS
        try:
            self.store.commit_spool(spool, relpath)
        except OSError as exc:
            if is_enospc(exc):
                log.error("C-STORE of %s refused: disk full (ENOSPC) while committing", sop_uid)
                return OUT_OF_RESOURCES
            raise
        return self._index(ds, relpath, spool.size, sha, calling, existed)

    def _store_path(self, path: Path, sop_class: str, sop_uid: str, calling: str) -> int:
        """Fallback when pynetdicom spooled elsewhere (spooling not installed)."""
        try:
            self.store.check_space(os.path.getsize(path))
            ds = inspect_received(path, sop_class, sop_uid)
        except OutOfSpace:
            return OUT_OF_RESOURCES
        except Rejected as exc:
            log.warning("C-STORE of %s refused with 0x%04X: %s", sop_uid, exc.status, exc.reason)
            return exc.status
        relpath = self.store.instance_relpath(ds.StudyInstanceUID, ds.SeriesInstanceUID, sop_uid)
        existed = self.store.abspath(relpath).exists()
        try:
            size, sha = self.store.commit_file(path, relpath)
        except OSError as exc:
            if is_enospc(exc):
                return OUT_OF_RESOURCES
            raise
        return self._index(ds, relpath, size, sha, calling, existed)

    def _already_stored(self, sop_uid: str, sha: str, relpath: str) -> bool:
        with self.sessions() as s:
            row = s.scalars(select(Instance).where(Instance.sop_instance_uid == sop_uid)).one_or_none()
            return row is not None and row.sha256 == sha and row.path == relpath and self.store.abspath(relpath).exists()

    def _index(self, ds: Dataset, relpath: str, size: int, sha: str, calling: str, existed: bool) -> int:
        sop_uid = str(ds.SOPInstanceUID)
        study_uid = str(ds.StudyInstanceUID)

        def write(session: Session) -> str | None:
            old = session.scalar(select(Instance.path).where(Instance.sop_instance_uid == sop_uid))
            register_instance(session, ds, relpath, size, sha, calling)
            audit(session, calling, "received", study_uid, sop_uid, f"{size} bytes")
            return old

        try:
            old_path = register_with_retry(self.sessions, write)
        except Exception:
            log.exception("C-STORE of %s refused: the index could not be written", sop_uid)
            if not existed:
                self.store.remove(relpath)
            return OUT_OF_RESOURCES
        if old_path and old_path != relpath:  # re-sent under another study/series: one copy only
            self.store.remove(old_path)
        log.debug("stored %s (study %s) from %s, %d bytes", sop_uid, study_uid, calling, size)
        if self.on_stored is not None:
            self.on_stored(study_uid)
        return SUCCESS
