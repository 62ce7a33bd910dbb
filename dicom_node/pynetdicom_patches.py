"""Every use the node makes of pynetdicom's internals, in one place, checked at start.

The Storage SCP (:mod:`dicom_node.scp`) is fast and bounded because it changes a few things
pynetdicom does not offer as options. They are all here, written for the pynetdicom versions
in :data:`SUPPORTED` (:func:`check_version` refuses any other with the range in the message),
and :func:`fast_path_active` reports, one flag each, whether every one is in place and still
meets the upstream code it was written against (a renamed attribute upstream shows up there
as ``False`` instead of silently dropping the fast path). The SCP logs that report at start.

Process-wide, installed once by :func:`apply` (idempotent); they change nothing for any other
pynetdicom peer in the process (a test peer, the SCU):

``chunked_receive``
    ``dimse_messages._config`` is a view of ``pynetdicom._config`` whose
    ``STORE_RECV_CHUNKED_DATASET`` is true for the node's associations only (PS3.7 9.1.1
    C-STORE data sets are written to a file as their fragments arrive, never held whole in
    memory); every other association keeps the process's own setting.
``spool_file`` and ``spool_owner``
    ``dimse_messages.NamedTemporaryFile`` becomes a factory that, for the node's associations,
    returns a :class:`~dicom_node.store.SpoolFile` in the store's ``tmp/`` (hashed while it is
    written, placed by a rename on the same filesystem) and remembers it on the association so
    an abort cannot leak it; ``DIMSEMessage.decode_msg`` is wrapped to tell the factory whose
    data it is. For every other association the factory is ``tempfile.NamedTemporaryFile``.

Per object, only on the node's own AE, server and accepted associations:

``socket_read``, ``socket_wait``, ``loop_delay`` and ``acceptor_socket``
    The accepted association's socket becomes a :class:`NodeSocket` as soon as it is created
    (:class:`AcceptorHandler`): its ``recv`` reads straight into one buffer with a deadline
    (negotiation within ``acse_timeout``, each PDU within ``network_timeout``) and its
    ``ready`` waits up to 1 ms for data; the association's DUL loop delay is set to 0.
    Sockets pynetdicom opens elsewhere (the SCU's) keep upstream's ``recv``.
``server_registry``
    The SCP's server is created with its own server and handler classes and registered in
    ``AE._servers`` (as ``AE.start_server(block=False)`` does), so ``AE.shutdown`` stops it.
``calling_ae_policy`` and ``active_associations``
    The SCP's AE subclass reads ``AE._require_calling_aet`` and upstream's
    ``active_associations`` through :func:`calling_ae_titles` / :func:`all_associations`.
``received_file``
    The received spool file is taken from the C-STORE primitive (``_dataset_file``).
"""

from __future__ import annotations

import contextvars
import logging
import re
import select as io_select
import socket
import ssl
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import FunctionType
from typing import Any, cast

import pynetdicom
from pynetdicom import AE, _config
from pynetdicom import dimse as _dimse
from pynetdicom import dimse_messages as _dimse_messages
from pynetdicom import dul as _dul
from pynetdicom.association import Association
from pynetdicom.transport import AssociationSocket, RequestHandler, ThreadedAssociationServer

from dicom_node.store import SpoolFile

__all__ = [
    "MAX_PDU_READ",
    "MAX_PDU_SIZE",
    "SUPPORTED",
    "AcceptorHandler",
    "NodeSocket",
    "UnsupportedPynetdicom",
    "all_associations",
    "apply",
    "calling_ae_titles",
    "check_version",
    "fast_path_active",
    "fast_path_summary",
    "receive_into",
    "received_file",
    "register_server",
    "set_calling_ae_titles",
    "unregister_server",
]

log = logging.getLogger(__name__)

#: the pynetdicom releases these patches were written and tested for: [lowest, first excluded)
SUPPORTED: tuple[tuple[int, int], tuple[int, int]] = ((3, 0), (3, 1))

MAX_PDU_SIZE = 1 << 20  # what we advertise as our maximum receive PDU length (PS3.8 D.1)
#: the longest PDU body an accepted peer may announce: our maximum P-DATA length, with room for
#: an A-ASSOCIATE-RQ that carries large user identity items (PS3.7 D.3.3.7: up to 64 KiB each)
MAX_PDU_READ = MAX_PDU_SIZE + (256 << 10)
_READY_WAIT_S = 0.001


class UnsupportedPynetdicom(RuntimeError):
    """The installed pynetdicom is outside :data:`SUPPORTED`."""


def _supported_text() -> str:
    (a, b), (c, d) = SUPPORTED
    return f">={a}.{b},<{c}.{d}"


def check_version(version: str | None = None) -> None:
    """Refuse a pynetdicom release the patches were not written for.

    Parameters
    ----------
    version:
        The version to check; the installed ``pynetdicom.__version__`` when ``None``.

    Raises
    ------
    UnsupportedPynetdicom
        When ``version`` is outside :data:`SUPPORTED`; the message names the range and this
        module, where the patches must be reviewed before the range is widened.
    """
    text = str(pynetdicom.__version__ if version is None else version)
    numbers = [int(x) for x in re.findall(r"\d+", text)[:2]]
    key = (numbers + [0, 0])[:2]
    low, high = SUPPORTED
    if not (tuple(key) >= low and tuple(key) < high):
        raise UnsupportedPynetdicom(
            f"pynetdicom {text} is installed; the node's Storage SCP was written for pynetdicom "
            f"{_supported_text()} (its patches in dicom_node/pynetdicom_patches.py use pynetdicom internals): "
            f"install pynetdicom{_supported_text()}, or review those patches and widen SUPPORTED")


# -- process-wide: chunked receive into the store's spool files --------------------------------

_spool_target: contextvars.ContextVar[tuple[Path, Any] | None] = contextvars.ContextVar("cxrnode_spool", default=None)
_apply_lock = threading.Lock()
_UPSTREAM_DECODE: Callable[..., bool] = _dimse_messages.DIMSEMessage.decode_msg
_UPSTREAM_CONFIG = _config


class _ChunkedForNode:
    """``pynetdicom._config`` as ``dimse_messages`` sees it: the same settings, except that
    ``STORE_RECV_CHUNKED_DATASET`` is also true while one of the node's associations decodes."""

    @property
    def STORE_RECV_CHUNKED_DATASET(self) -> bool:  # noqa: N802 - upstream's name
        return _spool_target.get() is not None or bool(_UPSTREAM_CONFIG.STORE_RECV_CHUNKED_DATASET)

    def __getattr__(self, name: str) -> Any:
        return getattr(_UPSTREAM_CONFIG, name)


_CHUNKED_CONFIG = _ChunkedForNode()


def _spool_factory(*args: Any, **kwargs: Any) -> Any:
    target = _spool_target.get()
    if target is None:  # another pynetdicom SCP in this process (e.g. a test peer)
        return tempfile.NamedTemporaryFile(*args, **kwargs)  # noqa: SIM115
    directory, assoc = target
    spool = SpoolFile(directory, writeback=getattr(assoc.ae, "cxrnode_writeback", False))
    # remembered on the association so an abort mid-data-set cannot leak the file
    assoc.cxrnode_spools.add(spool)
    return spool


def _decode_msg(self: Any, primitive: Any, assoc: Any = None) -> bool:
    """``DIMSEMessage.decode_msg``, telling :func:`_spool_factory` whose data set this is: the
    node's AE carries ``cxrnode_spool_dir`` (the store's ``tmp/``)."""
    directory = getattr(getattr(assoc, "ae", None), "cxrnode_spool_dir", None)
    if directory is None:
        return _UPSTREAM_DECODE(self, primitive, assoc)
    if not hasattr(assoc, "cxrnode_spools"):
        assoc.cxrnode_spools = set()
    token = _spool_target.set((directory, assoc))
    try:
        return _UPSTREAM_DECODE(self, primitive, assoc)
    finally:
        _spool_target.reset(token)


def receive_into(ae: AE, directory: Path, writeback: bool = False) -> None:
    """Make ``ae``'s associations receive C-STORE data sets into :class:`SpoolFile` objects in
    ``directory`` (the store's ``tmp/``), with early writeback when ``writeback`` (see
    :class:`~dicom_node.store.SpoolFile`). Needs :func:`apply`."""
    ae.cxrnode_spool_dir = directory  # type: ignore[attr-defined]
    ae.cxrnode_writeback = writeback  # type: ignore[attr-defined]


def apply() -> None:
    """Install the process-wide patches (idempotent, thread-safe).

    Raises
    ------
    UnsupportedPynetdicom
        When the installed pynetdicom is outside :data:`SUPPORTED` (nothing is patched).
    """
    check_version()
    with _apply_lock:
        if _dimse_messages.DIMSEMessage.decode_msg is not _decode_msg:
            _dimse_messages.DIMSEMessage.decode_msg = _decode_msg  # type: ignore[method-assign]
        _dimse_messages.NamedTemporaryFile = _spool_factory  # type: ignore[attr-defined]
        _dimse_messages._config = _CHUNKED_CONFIG  # type: ignore[assignment]  # noqa: SLF001


# -- per association: the accepted socket ------------------------------------------------------


def _recv_exactly(self: AssociationSocket, nr_bytes: int) -> bytearray:
    """``AssociationSocket.recv`` with the same contract (block until ``nr_bytes`` were read,
    return what there is if the peer closes) but reading straight into one buffer: pynetdicom
    3.0 reads 4 KiB per call and appends, 256 calls and copies per MiB of pixel data.

    It never blocks without bound on a socket the SCP accepted (see :class:`AcceptorHandler`):
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


class NodeSocket(AssociationSocket):
    """The socket of an association the node's SCP accepted.

    ``recv`` is :func:`_recv_exactly` (one buffer, deadlines). ``ready``: pynetdicom's DUL loop
    checks it with an instant ``select`` and, when nothing is there, sleeps a fixed 1 ms: while
    a large data set streams in, that sleep fires whenever the sender is a moment behind (about
    7 ms per 8 MB image here). This ``ready`` instead waits up to 1 ms for data and returns as
    soon as some arrives; the loop's own sleep is set to 0 (:func:`_adopt`), so an idle
    association still wakes about once a millisecond, and outgoing messages wait no longer."""

    recv = _recv_exactly  # type: ignore[assignment]

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


def _adopt(assoc: Association) -> NodeSocket:
    """Make a just-created acceptor's socket a :class:`NodeSocket` and its DUL loop sleepless
    (before its thread starts: nothing has been read yet)."""
    dul: Any = assoc.dul
    sock = dul.socket
    if type(sock) is AssociationSocket:
        sock.__class__ = NodeSocket
    dul._run_loop_delay = 0.0  # noqa: SLF001
    return cast(NodeSocket, sock)


class AcceptorHandler(RequestHandler):
    """pynetdicom's request handler for the node's server: the new association's socket is a
    :class:`NodeSocket` carrying its negotiation deadline (accepted + ``acse_timeout``), the
    network timeout and the server's tracker of pending connections (``mark_sent``), all read
    from the server's ``cxrnode_acse_timeout``, ``cxrnode_network_timeout``, ``cxrnode_pending``."""

    def _create_association(self) -> Association:
        assoc = super()._create_association()
        server: Any = self.server
        sock: Any = _adopt(assoc)
        pending = server.cxrnode_pending
        accepted = pending.accepted_at(self.request) or time.monotonic()
        sock.cxrnode_deadline = accepted + server.cxrnode_acse_timeout
        sock.cxrnode_pending = pending
        sock.cxrnode_network_timeout = server.cxrnode_network_timeout
        return assoc


# -- the node's AE and server ------------------------------------------------------------------


def register_server(ae: AE, server: ThreadedAssociationServer) -> None:
    """Register a server started outside ``AE.start_server`` so that ``AE.shutdown`` stops it."""
    ae._servers.append(server)  # noqa: SLF001


def unregister_server(ae: AE, server: ThreadedAssociationServer) -> None:
    """Forget a server registered with :func:`register_server` (no error if it is not there)."""
    try:
        ae._servers.remove(server)  # noqa: SLF001
    except ValueError:
        pass


def calling_ae_titles(ae: AE) -> list[str]:
    """The calling AE titles ``ae`` was configured to accept (upstream's stored list, read
    without going through a subclass's ``require_calling_aet`` property)."""
    return list(ae._require_calling_aet)  # noqa: SLF001


def set_calling_ae_titles(ae: AE, titles: list[str]) -> None:
    """Set the accepted calling AE titles through upstream's setter (which validates them)."""
    AE.require_calling_aet.fset(ae, titles)  # type: ignore[attr-defined]


def all_associations(ae: AE) -> list[Association]:
    """Upstream's ``AE.active_associations`` for ``ae``, bypassing a subclass's override."""
    return list(AE.active_associations.fget(ae))  # type: ignore[attr-defined]


def received_file(request: Any) -> Any:
    """The file a C-STORE request's data set was received into (a :class:`SpoolFile` on the
    node's associations), or ``None`` when it was not received chunked."""
    return getattr(request, "_dataset_file", None)


# -- the self-check ----------------------------------------------------------------------------


def _names(fn: Any) -> frozenset[str]:
    """The global and attribute names a function's code refers to (empty if it is not one)."""
    fn = getattr(fn, "fget", fn)
    code = getattr(fn, "__code__", None)
    return frozenset(code.co_names) if code is not None else frozenset()


def _uses(owner: Any, attribute: str, *names: str) -> bool:
    fn = owner.__dict__.get(attribute) if isinstance(owner, type) else getattr(owner, attribute, None)
    if fn is None:
        return False
    if isinstance(fn, (staticmethod, classmethod)):
        fn = fn.__func__
    if not isinstance(fn, (FunctionType, property)):
        return False
    return set(names) <= _names(fn)


def _version_ok() -> bool:
    try:
        check_version()
    except UnsupportedPynetdicom:
        return False
    return True


def fast_path_active() -> dict[str, bool]:
    """Whether each patch is in place and upstream still has what it relies on.

    Each flag is ``True`` only when (a) the patch is installed where it applies (after
    :func:`apply`; the per-association ones are installed by :class:`AcceptorHandler`, so for
    those the handler is checked) and (b) the pynetdicom code it was written against still
    reads or calls what the patch replaces (checked on the code objects, so a renamed
    attribute upstream turns a flag ``False`` instead of leaving a silent slow path).

    Returns
    -------
    dict[str, bool]
        ``version``, ``chunked_receive``, ``spool_file``, ``spool_owner``, ``socket_read``,
        ``socket_wait``, ``loop_delay``, ``acceptor_socket``, ``server_registry``,
        ``calling_ae_policy``, ``active_associations``, ``received_file`` (see the module
        docstring for what each one is).
    """
    decode = _UPSTREAM_DECODE
    dul_cls = _dul.DULServiceProvider
    sock_init = AssociationSocket.__dict__.get("__init__")
    return {
        "version": _version_ok(),
        "chunked_receive": (getattr(_dimse_messages, "_config", None) is _CHUNKED_CONFIG
                            and {"_config", "STORE_RECV_CHUNKED_DATASET"} <= _names(decode)
                            and hasattr(_UPSTREAM_CONFIG, "STORE_RECV_CHUNKED_DATASET")),
        "spool_file": (getattr(_dimse_messages, "NamedTemporaryFile", None) is _spool_factory
                       and "NamedTemporaryFile" in _names(decode)),
        "spool_owner": (_dimse_messages.DIMSEMessage.__dict__.get("decode_msg") is _decode_msg
                        and _uses(_dimse.DIMSEServiceProvider, "receive_primitive", "decode_msg")),
        "socket_read": (_uses(dul_cls, "_read_pdu_data", "recv")
                        and "recv" in AssociationSocket.__dict__ and NodeSocket.recv is _recv_exactly),
        "socket_wait": (_uses(dul_cls, "_is_transport_event", "ready")
                        and isinstance(AssociationSocket.__dict__.get("ready"), property)
                        and "_is_connected" in _names(sock_init) and "event_queue" in dir(AssociationSocket)),
        "loop_delay": (_uses(dul_cls, "run_reactor", "_run_loop_delay")
                       and "_run_loop_delay" in _names(dul_cls.__dict__.get("__init__"))),
        "acceptor_socket": (_uses(RequestHandler, "handle", "_create_association")
                            and _uses(RequestHandler, "_create_association", "AssociationSocket", "set_socket")
                            and AcceptorHandler.__dict__.get("_create_association") is not None),
        "server_registry": (_uses(AE, "shutdown", "_servers") and "_servers" in _names(AE.__dict__.get("__init__"))),
        "calling_ae_policy": (isinstance(AE.__dict__.get("require_calling_aet"), property)
                              and AE.__dict__["require_calling_aet"].fset is not None
                              and "_require_calling_aet" in _names(AE.__dict__.get("__init__"))),
        "active_associations": isinstance(AE.__dict__.get("active_associations"), property),
        "received_file": _uses(_dimse_messages.DIMSEMessage, "message_to_primitive", "_dataset_file"),
    }


def fast_path_summary(flags: dict[str, bool] | None = None) -> tuple[bool, str]:
    """One log line for :func:`fast_path_active`: ``(all active, text)``."""
    flags = fast_path_active() if flags is None else flags
    off = [name for name, ok in flags.items() if not ok]
    version = str(pynetdicom.__version__)
    if not off:
        return True, f"pynetdicom {version}: fast path active (all {len(flags)} checks of dicom_node.pynetdicom_patches)"
    return False, (f"pynetdicom {version}: fast path NOT active for {', '.join(off)} "
                   f"(written for pynetdicom{_supported_text()}; see dicom_node/pynetdicom_patches.py)")
