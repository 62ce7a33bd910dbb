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
import contextvars
import hashlib
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
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

from pydicom import Dataset, dcmread
from pydicom.filereader import read_file_meta_info
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
from pynetdicom.transport import AssociationSocket, RequestHandler, ThreadedAssociationServer
from pynetdicom.utils import make_target
from sqlalchemy.orm import Session, sessionmaker

from dicom_node.config import Config
from dicom_node.index import (
    InstanceConflict,
    audit,
    check_received,
    register_instance,
    register_with_retry,
)
from dicom_node.store import OutOfSpace, SpoolFile, Store, is_enospc

log = logging.getLogger(__name__)

SUCCESS = 0x0000
SOP_CLASS_NOT_SUPPORTED = 0x0122
OUT_OF_RESOURCES = 0xA700
SOP_CLASS_MISMATCH = 0xA900
CANNOT_UNDERSTAND = 0xC210
MISSING_UIDS = 0xC212
ENCODING_MISMATCH = 0xC213
INSTANCE_CONFLICT = 0xC214
NODE_OBJECT_CONFLICT = 0xC215

_PIXEL_DATA = Tag(0x7FE0, 0x0010)
_UNDEFINED = 0xFFFFFFFF
MAX_PDU_SIZE = 1 << 20  # what we advertise as our maximum receive PDU length (PS3.8 D.1)
#: the longest PDU body an accepted peer may announce: our maximum P-DATA length, with room for
#: an A-ASSOCIATE-RQ that carries large user identity items (PS3.7 D.3.3.7: up to 64 KiB each)
MAX_PDU_READ = MAX_PDU_SIZE + (256 << 10)
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
    3.0 reads 4 KiB per call and appends, 256 calls and copies per MiB of pixel data.

    It never blocks without bound on a socket the SCP accepted (see :class:`_GuardedHandler`):
    until the association is established the whole negotiation must finish by
    ``cxrnode_deadline`` (accepted + ``acse_timeout``); afterwards one call (the PDU header,
    or its body) must finish within the network timeout, however slowly the bytes trickle.
    A timeout returns what was read, as a closed connection does: pynetdicom then closes the
    transport (Evt17)."""
    sock = cast(socket.socket, self.socket)
    limit: float | None = getattr(self, "cxrnode_network_timeout", None)
    if nr_bytes > MAX_PDU_READ and limit is not None:
        # an accepted peer announcing a PDU far past the maximum we advertised: the buffer
        # alone would be up to 4 GiB. Read nothing; pynetdicom closes the transport (Evt17).
        peer = getattr(getattr(self.assoc, "requestor", None), "address", "?")
        log.warning("closing the connection from %s: a PDU of %d bytes announced (at most %d accepted)",
                    peer, nr_bytes, MAX_PDU_READ)
        return bytearray()
    buf = bytearray(nr_bytes)
    view = memoryview(buf)
    got = 0
    deadline: float | None = getattr(self, "cxrnode_deadline", None)
    negotiating = deadline is not None
    if negotiating and self.assoc.is_established:
        self.cxrnode_deadline = None  # type: ignore[attr-defined]
        negotiating = False
        sock.settimeout(limit)
    if not negotiating and limit is not None:
        deadline = time.monotonic() + limit
    try:
        while got < nr_bytes:
            if deadline is not None:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError
                if negotiating:  # syscalls per read are fine while negotiating (a few small PDUs)
                    sock.settimeout(remaining)
            n = sock.recv_into(view[got:], nr_bytes - got)
            if not n:
                break
            got += n
    except TimeoutError:
        peer = getattr(getattr(self.assoc, "requestor", None), "address", "?")
        log.warning("closing the connection from %s: %s (%d of %d bytes of a PDU received)", peer,
                    "A-ASSOCIATE not completed within node.acse_timeout_s" if negotiating
                    else "PDU not completed within node.network_timeout_s", got, nr_bytes)
    if got < nr_bytes:
        del view
        return buf[:got]
    if negotiating and nr_bytes > 6:  # a whole PDU (its body) arrived: the peer is not stalling
        pending = getattr(self, "cxrnode_pending", None)
        if pending is not None:
            pending.mark_sent(sock)
    return buf


class _PendingConnections:
    """Accepted connections that have not yet finished association negotiation.

    At most ``limit`` at once: adding one more closes the oldest of those that have not yet sent
    one whole PDU (a peer that has sent its A-ASSOCIATE-RQ is only waiting for our answer), from
    the peer address that holds the most: a half-open socket cannot keep a newer, faster peer
    out, and a flood from one address evicts its own connections first. Each is closed after ``acse_timeout`` in any case, by the
    read deadline in :func:`_recv_exactly`, the TLS handshake timeout, or pynetdicom's ARTIM
    timer for a peer that sends nothing at all.
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


class _GuardedHandler(RequestHandler):
    """Marks the association's socket with its negotiation deadline (read by _recv_exactly)."""

    server: _GuardedServer

    def _create_association(self) -> Association:
        assoc = super()._create_association()
        server = self.server
        sock: Any = assoc.dul.socket
        accepted = server.cxrnode_pending.accepted_at(self.request) or time.monotonic()
        sock.cxrnode_deadline = accepted + server.cxrnode_acse_timeout
        sock.cxrnode_pending = server.cxrnode_pending
        sock.cxrnode_network_timeout = server.cxrnode_network_timeout
        return assoc


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


_INFLATE_CHUNK = 1 << 20


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


def _data_set_sha256(path: str | os.PathLike[str]) -> str:
    """SHA-256 of a Part 10 file's data set: everything after its File Meta Information."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        head = f.read(144)
        if len(head) < 144 or head[128:132] != b"DICM":
            raise ValueError("not a Part 10 file")
        f.seek(144 + int.from_bytes(head[140:144], "little"))
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


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


def inspect_received(path: str | os.PathLike[str], request_sop_class: str, request_sop_instance: str,
                     max_inflated: int | None = None) -> Dataset:
    """Parse a received file just enough to index it and to refuse what cannot be trusted.

    Large values (pixel data) are not read (``defer_size``); the check is structural: every
    top-level element must lie inside the file, the file must end where the last element ends
    (or, when that is of undefined length, with a Sequence Delimitation Item), and the first
    element's encoding must agree with the transfer syntax. A deflated body is first inflated
    as a stream and refused past ``max_inflated`` bytes. Raises :class:`Rejected`; its reason
    quotes untrusted values with ``repr`` and never quotes element values (PHI).
    """
    size = os.path.getsize(path)
    try:
        # the File Meta Information only: dcmread(specific_tags=[]) would inflate a deflated body
        meta_ts = UID(str(read_file_meta_info(path).get("TransferSyntaxUID", "")))
    except Exception as exc:
        log.debug("unreadable File Meta Information: %r", exc)
        raise Rejected(CANNOT_UNDERSTAND, f"unreadable File Meta Information ({type(exc).__name__})") from None
    body_offset, little = _check_encoding(path, meta_ts)
    if meta_ts == DeflatedExplicitVRLittleEndian and max_inflated is not None:
        _check_inflated_size(path, body_offset, max_inflated)
    # pydicom's warnings about what we check here are dropped by a filter (see _quiet_pydicom)
    try:
        ds = dcmread(path, defer_size=64 * 1024)
    except Exception as exc:
        log.debug("unreadable data set: %r", exc)
        raise Rejected(CANNOT_UNDERSTAND, f"unreadable data set ({type(exc).__name__})") from None
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
            raise Rejected(ENCODING_MISMATCH, f"transfer syntax {str(ts)!r} is encapsulated but Pixel Data is native")
        if not ts.is_compressed and undefined:
            raise Rejected(ENCODING_MISMATCH, f"transfer syntax {str(ts)!r} is native but Pixel Data is encapsulated")

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
    return ds


def _quiet_pydicom() -> None:
    """Drop pydicom's warnings (and the log records it writes for them) in this process. They
    quote element values (a malformed
    PatientName is printed whole) and they are process-global: ``warnings.catch_warnings``
    around one receiving thread's parse also silences, or un-silences, every other thread's
    and drops filters other threads install meanwhile. The SCP checks what those warnings
    are about itself and refuses with a status instead. Idempotent."""
    warnings.filterwarnings("ignore", module=r"pydicom(\..*)?$")
    # pydicom also logs each such warning (misc.warn_and_log) with the value it quotes
    pydicom_log = logging.getLogger("pydicom")
    if pydicom_log.level == logging.NOTSET:
        pydicom_log.setLevel(logging.ERROR)


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

    @property
    def active_associations(self) -> list[Association]:
        """As pynetdicom's, except while an acceptor negotiates (pynetdicom's
        ``maximum_associations`` check, PS3.8 A-ASSOCIATE-RJ 2/3/2): then only established
        associations and itself count, so connections still negotiating (half-sent requests)
        cannot use up ``node.max_associations``; they have their own limit."""
        assocs = list(AE.active_associations.fget(self))  # type: ignore[attr-defined]
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
        install_spooling()
        _quiet_pydicom()
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
        server = cast(_GuardedServer, self.ae.make_server(
            (n.host, n.port), evt_handlers=handlers, ssl_context=server_ssl_context(self.config),
            server_class=_GuardedServer, request_handler=_GuardedHandler,
        ))
        server.cxrnode_acse_timeout = n.acse_timeout_s
        server.cxrnode_network_timeout = n.network_timeout_s
        server.cxrnode_pending = _PendingConnections(n.max_pending_associations)
        # as AE.start_server(block=False) does, with our server class
        threading.Thread(target=make_target(server.serve_forever), name="cxrnode-scp-accept", daemon=True).start()
        self.ae._servers.append(server)  # noqa: SLF001
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
        self._negotiated(a)
        _wait_for_data(a)
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
        spool = getattr(req, "_dataset_file", None)
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
        if not isinstance(spool, SpoolFile):
            return self._store_path(Path(event.dataset_path), sop_class, sop_uid, calling)
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

    def _store_path(self, path: Path, sop_class: str, sop_uid: str, calling: str) -> int:
        """Fallback when pynetdicom spooled elsewhere (spooling not installed)."""
        try:
            self.store.check_space(os.path.getsize(path))
            ds = inspect_received(path, sop_class, sop_uid, self._max_inflated)
        except OutOfSpace:
            return OUT_OF_RESOURCES
        except Rejected as exc:
            log.warning("C-STORE of %r refused with 0x%04X: %s", sop_uid, exc.status, exc.reason)
            return exc.status
        relpath = self.store.instance_relpath(ds.StudyInstanceUID, ds.SeriesInstanceUID, sop_uid)
        spool = self.store.new_spool()  # a copy in tmp/, so placing it is one no-replace link
        try:
            with open(path, "rb") as f:
                while chunk := f.read(1 << 20):
                    spool.write(chunk)
            spool.finish(self.store.fsync)
        except BaseException:
            spool.discard()
            raise
        try:
            return self._accept(ds, relpath, spool.size, spool.sha256.hexdigest(), calling,
                                lambda: self.store.commit_spool(spool, relpath, replace=False), spool.name)
        finally:
            spool.discard()

    def _same_data_set(self, relpath: str, received: str | os.PathLike[str]) -> bool:
        """Whether the stored file at ``relpath`` and the received file hold the same data set
        (File Meta Information aside: it names the sender, so an echo differs there)."""
        try:
            return _data_set_sha256(self.store.abspath(relpath)) == _data_set_sha256(received)
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
        sop_uid = str(ds.SOPInstanceUID)
        study_uid = str(ds.StudyInstanceUID)

        def write(session: Session) -> bool:
            # checked again in the transaction that writes: the index is the arbiter
            if check_received(session, sop_uid, relpath, sha):
                return False
            register_instance(session, ds, relpath, size, sha, calling)
            audit(session, calling, "received", study_uid, sop_uid, f"{size} bytes")
            return True

        try:
            new = register_with_retry(self.sessions, write)
        except InstanceConflict as exc:
            if placed:
                self.store.remove(relpath)
            return self._refuse(ds, exc, calling)
        except Exception:
            log.exception("C-STORE of %r refused: the index could not be written", sop_uid)
            if placed:
                self.store.remove(relpath)
            return OUT_OF_RESOURCES
        if not new:
            log.info("instance %r re-sent by %r: identical, kept", sop_uid, calling)
            return SUCCESS
        log.debug("stored %r (study %r) from %r, %d bytes", sop_uid, study_uid, calling, size)
        if self.on_stored is not None:
            self.on_stored(study_uid)
        return SUCCESS
