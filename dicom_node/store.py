"""The durable file store: every object the node acknowledges or writes lives here.

Layout under ``storage_dir``::

    instances/<StudyInstanceUID>/<SeriesInstanceUID>/<SOPInstanceUID>.dcm   DICOM files (PS3.10)
    tmp/<host id>/                                                            spool files being received by that host

Durability protocol (what "stored" means before the SCP answers 0x0000, PS3.4 B.2.3):
the object is first written to a spool file in ``tmp/<host id>/`` (same filesystem as its final
place), the file is fsynced, atomically renamed into place, and the directory that now holds
it is fsynced. A crash at any point leaves either no file or the complete file at its final
path; leftovers in this host's spool folder are removed at start (:meth:`Store.clean_spool`).
Several hosts may share one storage folder (a shared POSIX folder, e.g. NFS): each spools into
its own ``tmp/<host id>/`` (``node.host_id``, else the host name) and cleans only that one, so
starting one host never deletes another host's files in flight.

Received instances are kept *as sent*: the dataset bytes are those of the C-STORE request, in
the negotiated transfer syntax, behind a File Meta Information header (PS3.10 7.1).

Backends: this module is the POSIX backend (a local disk or a shared folder such as NFS). What the
rest of the node needs of a store is :class:`ObjectStore`: objects are named by a relative path
(the index keeps only those), written durably, read back as data sets or byte streams, hashed and
removed. An S3-compatible backend can implement it as it is (the spool stays a local folder; its
commit becomes a multipart upload, ``exists`` a HEAD request); ``abspath`` is the POSIX backend's
own and is used only where a tool needs a file on disk (DCMTK, the SCU sending a file, the reviewer
loading a file, the prior store's permissions).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import hashlib
import io
import os
import re
import shutil
import tempfile
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import IO, BinaryIO, Protocol

from pydicom import Dataset
from pydicom.filewriter import dcmwrite

from dicom_node.config import resolve_host_id

_UID_SAFE = re.compile(r"^[0-9.]{1,64}$")
_CHUNK = 1 << 20
FILE_MODE = 0o640  # owner writes, the service group (e.g. the reviewer) reads
WRITEBACK_EVERY = 1 << 20  # start writing a spool file back to disk after every MiB received


def _sync_file_range() -> object | None:
    """libc ``sync_file_range`` (Linux), or None where it does not exist."""
    try:
        fn = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


_SYNC_FILE_RANGE = _sync_file_range()
#: hashes spool data beside the receiving thread (hashlib releases the GIL on large buffers);
#: one thread, so the updates of each spool file stay in order
_HASHER = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cxrnode-sha256")
_SYNC_FILE_RANGE_WRITE = 2


def start_writeback(fd: int) -> None:
    """Ask the kernel to start writing ``fd``'s dirty pages now, without waiting (Linux
    ``sync_file_range(SYNC_FILE_RANGE_WRITE)``, as RocksDB's ``bytes_per_sync`` does). It is
    only a head start: durability still comes from the fsync before the answer, which then
    has little left to wait for. A no-op where the call does not exist."""
    if _SYNC_FILE_RANGE is not None:
        _SYNC_FILE_RANGE(fd, 0, 0, _SYNC_FILE_RANGE_WRITE)  # type: ignore[operator]


class StoreError(OSError):
    """A file could not be stored durably."""


class OutOfSpace(StoreError):
    """Free space is below the configured floor, or the filesystem is full (ENOSPC)."""


def _safe_component(uid: str) -> str:
    """A UID as a path component; anything that is not a plain UID is rejected."""
    uid = uid.strip().rstrip("\x00")
    if not _UID_SAFE.match(uid) or uid in {".", ".."}:
        raise ValueError(f"not a valid UID for a file name: {uid!r}")
    return uid


def fsync_dir(path: Path) -> None:
    """fsync a directory so a rename or a new entry in it survives a crash."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def is_enospc(exc: BaseException) -> bool:
    return isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)


class SpoolFile:
    """A write-only spool file in the store's ``tmp/`` folder that hashes what it is given.

    A write error (e.g. ENOSPC) does not raise: it is remembered in :attr:`error`, the file
    is truncated and later writes are dropped, so the receiver of a C-STORE can finish reading
    the request and then answer with a specific failure status instead of aborting.
    With ``writeback`` the kernel is told to start writing every MiB back while the rest is
    still arriving (see :func:`start_writeback`), so the final fsync is short.
    """

    def __init__(self, directory: Path, suffix: str = ".dcm", writeback: bool = False) -> None:
        fd, name = tempfile.mkstemp(dir=directory, suffix=suffix, prefix="rx-")
        self.name = name
        self.path = Path(name)
        os.fchmod(fd, FILE_MODE)
        self._ino = os.fstat(fd).st_ino
        self._fh: IO[bytes] = os.fdopen(fd, "wb", buffering=0)  # PDVs are large; no second copy
        self._sha256 = hashlib.sha256()
        self._hashing: Future[None] | None = None
        self.size = 0
        self.error: OSError | None = None
        self.closed = False
        self._writeback = writeback
        self._unsynced = 0

    def write(self, data: bytes | bytearray | memoryview) -> int:
        if self.error is not None:
            return len(data)
        try:
            view = memoryview(data)
            while view:  # a raw write may be partial
                n = self._fh.write(view) or 0
                view = view[n:]
        except OSError as exc:
            self._fail(exc)
            return len(data)
        if isinstance(data, bytes):  # immutable: safe to hash later, on the hasher thread
            self._hashing = _HASHER.submit(self._sha256.update, data)
        else:
            self.sha256.update(data)  # after whatever is still queued
        self.size += len(data)
        self._unsynced += len(data)
        if self._writeback and self._unsynced >= WRITEBACK_EVERY:
            self._unsynced = 0
            start_writeback(self._fh.fileno())
        return len(data)

    @property
    def sha256(self) -> hashlib._Hash:
        """The SHA-256 of everything written (waits for the hasher to catch up)."""
        if self._hashing is not None:
            self._hashing.result()
        return self._sha256

    def _fail(self, exc: OSError) -> None:
        self.error = exc
        with contextlib.suppress(OSError):
            self._fh.close()
        # free the space right away; the name is kept so close() and unlink() stay harmless
        with contextlib.suppress(OSError):
            os.truncate(self.name, 0)

    def flush(self) -> None:
        """Nothing to do: writes are unbuffered (pynetdicom calls this after every PDV)."""

    def finish(self, fsync: bool) -> None:
        """Flush, fsync (if asked) and close; raises the remembered write error if any."""
        if self.error is None and not self.closed:
            try:
                self._fh.flush()
                if fsync:  # data and the size: all a reader needs (as PostgreSQL's WAL does)
                    getattr(os, "fdatasync", os.fsync)(self._fh.fileno())
            except OSError as exc:
                self._fail(exc)
        self.close()
        if self.error is not None:
            raise self.error

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            with contextlib.suppress(OSError):
                self._fh.close()

    def discard(self) -> None:
        """Close and delete the spool file, unless it was already renamed into the store."""
        self.close()
        with contextlib.suppress(FileNotFoundError):
            # after a commit the name may belong to a newer spool file: check it is still ours
            if os.stat(self.name).st_ino == self._ino:
                os.unlink(self.name)

    @property
    def file(self) -> SpoolFile:
        """pynetdicom calls ``.file.flush()`` on what it takes for a NamedTemporaryFile."""
        return self


class ObjectStore(Protocol):
    """What the node needs of a store, whatever keeps the bytes (see the module docstring).

    Objects are named by ``relpath`` (``instances/<study>/<series>/<sop>.dcm``, ``priors/...``).
    """

    def write_dataset(self, ds: Dataset, relpath: str, replace: bool = True) -> tuple[int, str]:
        """Write ``ds`` durably at ``relpath``; (size, sha256). ``replace=False``: FileExistsError
        rather than touch an object already there (checked and placed in one atomic step)."""
        ...

    def read_dataset(self, relpath: str, stop_before_pixels: bool = False) -> Dataset:
        """The data set stored at ``relpath`` (FileNotFoundError if there is none)."""
        ...

    def open(self, relpath: str) -> BinaryIO:
        """The stored bytes at ``relpath`` for reading."""
        ...

    def exists(self, relpath: str) -> bool:
        """Whether an object is stored at ``relpath``."""
        ...

    def file_sha256(self, relpath: str) -> str | None:
        """SHA-256 of the object at ``relpath``, None if there is none."""
        ...

    def remove(self, relpath: str) -> None:
        """Remove the object at ``relpath`` (nothing if there is none)."""
        ...


class Store:
    """Durable files under ``storage_dir`` (see the module docstring for the layout): the POSIX
    :class:`ObjectStore`.

    Parameters
    ----------
    storage_dir:
        The store's root (created if missing).
    fsync:
        ``fsync`` files and folders before a write counts as done (off only in tests).
    min_free_space_mb:
        Refuse writes (:class:`OutOfSpace`) when less than this is free.
    host_id:
        This host's name in the shared spool (``""``: from the host).
    spool_subdir:
        Keeps another role's temporary files apart (e.g. ``"workers"``).
    """

    def __init__(self, storage_dir: str | os.PathLike[str], fsync: bool = True, min_free_space_mb: int = 0,
                 host_id: str = "", spool_subdir: str = "") -> None:
        self.root = Path(storage_dir).resolve()
        self.fsync = fsync
        self.min_free_space_mb = min_free_space_mb
        self.host_id = resolve_host_id(host_id)
        self.spool_root = self.root / "tmp"
        # this host's spool folder; ``spool_subdir`` (e.g. "workers") keeps another role's files apart
        self.host_spool = self.spool_root / self.host_id
        self.tmp_dir = self.host_spool / spool_subdir if spool_subdir else self.host_spool
        self.root.mkdir(parents=True, exist_ok=True)
        self.spool_root.mkdir(exist_ok=True)
        self.tmp_dir.mkdir(parents=True, exist_ok=True)
        self._dev = os.stat(self.root).st_dev

    # -- paths ------------------------------------------------------------------------------
    @staticmethod
    def instance_relpath(study_uid: str, series_uid: str, sop_uid: str) -> str:
        return "/".join(
            ("instances", _safe_component(study_uid), _safe_component(series_uid), _safe_component(sop_uid) + ".dcm")
        )

    def abspath(self, relpath: str) -> Path:
        p = (self.root / relpath).resolve()
        if self.root not in p.parents:
            raise ValueError(f"path outside the store: {relpath!r}")
        return p

    # -- reading ----------------------------------------------------------------------------
    def read_dataset(self, relpath: str, stop_before_pixels: bool = False) -> Dataset:
        """The data set stored at ``relpath``.

        Parameters
        ----------
        relpath:
            The object's name in the store (as kept in the index).
        stop_before_pixels:
            Read the header only.

        Raises
        ------
        FileNotFoundError
            Nothing is stored there.
        ValueError
            ``relpath`` points outside the store.
        """
        from pydicom import dcmread

        return dcmread(self.abspath(relpath), stop_before_pixels=stop_before_pixels)

    def open(self, relpath: str) -> BinaryIO:
        """The stored bytes at ``relpath`` for reading (the caller closes the stream)."""
        return open(self.abspath(relpath), "rb")  # noqa: SIM115 - the caller owns the stream

    def exists(self, relpath: str) -> bool:
        """Whether an object is stored at ``relpath``."""
        return self.abspath(relpath).is_file()

    # -- space ------------------------------------------------------------------------------
    def free_mb(self) -> float:
        return shutil.disk_usage(self.root).free / (1024 * 1024)

    def check_space(self, incoming_bytes: int = 0) -> None:
        """Raise :class:`OutOfSpace` if storing ``incoming_bytes`` more would cross the floor."""
        free = self.free_mb() - incoming_bytes / (1024 * 1024)
        if free < self.min_free_space_mb:
            raise OutOfSpace(errno.ENOSPC, f"free space {free:.0f} MB below the floor of {self.min_free_space_mb} MB")

    # -- writing ----------------------------------------------------------------------------
    def new_spool(self) -> SpoolFile:
        return SpoolFile(self.tmp_dir, writeback=self.fsync)

    def commit_spool(self, spool: SpoolFile, relpath: str, replace: bool = True) -> tuple[int, str]:
        """Make a finished spool file durable at ``relpath``; return ``(size, sha256)``.

        With ``replace=False`` an existing file at ``relpath`` is never touched: the call
        raises :class:`FileExistsError` (and the spool file is discarded). The check and the
        placing are one atomic step (a hard link), so two receivers of the same SOP Instance
        UID, or a receiver and the node writing its own SR, cannot overwrite each other.
        """
        try:
            spool.finish(self.fsync)
            self._place(Path(spool.name), relpath, replace=replace)
        except BaseException:
            spool.discard()
            raise
        return spool.size, spool.sha256.hexdigest()

    def commit_file(self, src: str | os.PathLike[str], relpath: str) -> tuple[int, str]:
        """Move (same filesystem) or copy ``src`` durably to ``relpath``; ``src`` is consumed."""
        src = Path(src)
        if os.stat(src).st_dev == self._dev:
            h, size = _hash_file(src)
            if self.fsync:
                fd = os.open(src, os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
            self._place(src, relpath)
            return size, h
        spool = self.new_spool()
        try:
            with open(src, "rb") as f:
                while chunk := f.read(_CHUNK):
                    spool.write(chunk)
        except BaseException:
            spool.discard()
            raise
        size_sha = self.commit_spool(spool, relpath)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(src)
        return size_sha

    def write_dataset(self, ds: Dataset, relpath: str, replace: bool = True) -> tuple[int, str]:
        """Write ``ds`` (with its file meta) durably at ``relpath``; return ``(size, sha256)``.

        Parameters
        ----------
        ds:
            The data set with its File Meta Information (written as a Part 10 file).
        relpath:
            Where, relative to the store (:meth:`instance_relpath`).
        replace:
            Replace an existing file (default); ``False``: raise :class:`FileExistsError` and
            leave it untouched (the check and the placing are one atomic step, a hard link).

        Returns
        -------
        tuple[int, str]
            The file's size in bytes and SHA-256 (hex).

        Raises
        ------
        OutOfSpace
            Free space is below ``min_free_space_mb`` (checked first).
        FileExistsError
            ``replace=False`` and a file is already at ``relpath``.
        OSError
            The file could not be written, ENOSPC included (:func:`is_enospc`); nothing is
            left behind.
        """
        self.check_space()
        buf = io.BytesIO()
        dcmwrite(buf, ds, enforce_file_format=True)
        spool = self.new_spool()
        spool.write(buf.getbuffer())
        return self.commit_spool(spool, relpath, replace=replace)

    def _place(self, src: Path, relpath: str, replace: bool = True) -> None:
        dest = self.abspath(relpath)
        created: list[Path] = []
        parent = dest.parent
        while not parent.exists():
            created.append(parent)
            parent = parent.parent
        dest.parent.mkdir(parents=True, exist_ok=True)
        if replace:
            os.replace(src, dest)
        else:
            os.link(src, dest)  # FileExistsError if anything is there: never replaces
            with contextlib.suppress(FileNotFoundError):
                os.unlink(src)
        if self.fsync:
            fsync_dir(dest.parent)
            # new folders must be durable in their parents too
            for d in created:
                fsync_dir(d.parent)

    def file_sha256(self, relpath: str) -> str | None:
        """SHA-256 of the stored file at ``relpath``, or None if there is none."""
        try:
            return _hash_file(self.abspath(relpath))[0]
        except FileNotFoundError:
            return None

    def remove(self, relpath: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.abspath(relpath))

    def clean_spool(self, older_than_s: float = 0.0) -> int:
        """Delete leftover spool files (from a crash) in this store's own spool folder only
        (``tmp/<host id>/``: other hosts' folders, sub-folders and anything else under ``tmp/``
        are left alone); with ``older_than_s`` only files not modified for that long (a folder
        several live processes share); return how many were removed."""
        import time

        n = 0
        limit = time.time() - older_than_s
        for p in self.tmp_dir.iterdir():
            with contextlib.suppress(OSError):
                if not p.is_file() or (older_than_s and p.stat().st_mtime > limit):
                    continue
                p.unlink()
                n += 1
        return n


def _hash_file(path: Path) -> tuple[str, int]:
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
            size += len(chunk)
    return h.hexdigest(), size
