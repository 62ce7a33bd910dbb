"""What ``cxrnode serve`` checks before it listens, so every mistake a site makes stops the
node at start with one line naming the key and what to do.

Exit codes of ``cxrnode serve`` (also in README.md, "Operations")::

    0  stopped cleanly (SIGTERM / SIGINT)
    1  unexpected error (one line; the traceback with --verbose)
    2  configuration: an invalid key or value, the model bundle (model.bundle) missing or broken,
       the job handler (the plugin) not installed
    3  node.port / node.host: the port cannot be bound (in use, privileged, address not here)
    4  node.storage_dir: the storage folder cannot be created or written
    5  node.min_free_space_mb: free space on the storage volume is below the floor
    6  node.database_url: the index database cannot be reached
    7  node.database_url: an SQLite index on a network filesystem (NFS, SMB/CIFS, sshfs, 9p, Ceph,
       GlusterFS...): SQLite's locking is not safe there; use PostgreSQL or a local disk
    8  node.health_port / node.health_host: the health and metrics port cannot be bound

``cxrnode worker`` against an SQLite index is exit 2 (SQLite belongs to one host's ``serve``).

On PostgreSQL a schema ``serve`` does not know (not yet migrated, behind or ahead of this code's
Alembic head) is exit 2 with the command to run: only ``cxrnode migrate`` changes it there.

Order: storage, free space, where an SQLite file lies, database, schema, ports, model (the slowest
last, so quick mistakes show at once); the port is bound for real only after the model loaded, so the PACS never sees a node
that acknowledges images it cannot draft. The model is loaded through the job handler's
``prepare(config)`` hook (the ``draft`` entry point): :mod:`dicom_node` never imports the plugin.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import socket
import uuid
from pathlib import Path

from sqlalchemy import text
from sqlalchemy.engine import make_url

from dicom_node.config import Config
from dicom_node.jobs import HandlerUnavailable, JobHandler, load_handler

EXIT_OK, EXIT_ERROR, EXIT_CONFIG, EXIT_PORT, EXIT_STORAGE, EXIT_DISK, EXIT_DATABASE = 0, 1, 2, 3, 4, 5, 6
EXIT_NETWORK_FS = 7  # an SQLite index on a network filesystem
EXIT_HEALTH_PORT = 8  # node.health_port cannot be bound

#: filesystem types (``/proc/self/mountinfo``, field after `` - ``) that are another machine's
#: disk: SQLite's file locks and WAL shared memory are not safe on them (sqlite.org/wal.html,
#: "WAL does not work over a network filesystem"); ``fuse.<name>`` covers FUSE mounts
NETWORK_FILESYSTEMS = frozenset({
    "nfs", "nfs4", "cifs", "smb3", "smbfs", "ncpfs", "9p", "afs", "ceph", "glusterfs", "lustre", "gpfs",
    "beegfs", "ocfs2", "gfs2", "davfs", "coda", "fuse.sshfs", "fuse.glusterfs", "fuse.cephfs", "fuse.ceph-fuse",
    "fuse.s3fs", "fuse.rclone", "fuse.gcsfuse", "fuse.davfs2", "fuse.juicefs", "fuse.seaweedfs", "fuse.moosefs",
    "fuse.lizardfs", "fuse.beegfs", "fuse.smbnetfs", "fuse.goofys", "fuse.blobfuse", "fuse.blobfuse2",
})


class StartupError(Exception):
    """A reason the node cannot start: ``key`` (the config key), ``what`` happened and ``todo``."""

    def __init__(self, code: int, key: str, what: str, todo: str) -> None:
        super().__init__(f"{key}: {what}; {todo}")
        self.code, self.key, self.what, self.todo = code, key, what, todo

    def line(self, command: str = "serve") -> str:
        return f"cxrnode {command}: {self} (exit {self.code})"


def _user() -> str:
    try:
        import pwd

        return pwd.getpwuid(os.geteuid()).pw_name
    except (ImportError, KeyError):
        return str(os.geteuid())


def _first_line(exc: BaseException) -> str:
    text_ = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text_[0] if text_ else ''}".rstrip(": ")


def check_storage(config: Config) -> None:
    root = Path(config.node.storage_dir)
    key = "node.storage_dir"
    try:
        (root / "tmp").mkdir(parents=True, exist_ok=True)
        probe = root / "tmp" / f".serve-{uuid.uuid4().hex}"
        probe.write_bytes(b"cxrnode\n")
        probe.unlink()
    except OSError as exc:
        where = exc.filename or root
        raise StartupError(EXIT_STORAGE, key, f"{str(root)!r} cannot be created or written by {_user()} "
                           f"({exc.strerror or exc} at {where})",
                           f"give it to the service user (chown -R {_user()}: {root}), fix the mount, or set "
                           f"{key} to a writable folder") from exc


def check_free_space(config: Config) -> None:
    root = Path(config.node.storage_dir)
    floor = config.node.min_free_space_mb
    free = shutil.disk_usage(root).free // (1024 * 1024)
    if free < floor:
        raise StartupError(EXIT_DISK, "node.min_free_space_mb",
                           f"{free} MB free on the volume of {root}, below the floor of {floor} MB "
                           "(every image would be refused with 0xA700)",
                           "free space on that volume, move node.storage_dir to a larger one, or lower the floor")


def check_database(config: Config) -> None:
    from dicom_node.db import make_engine

    url = config.node.resolved_database_url()
    shown = make_url(url).render_as_string(hide_password=True)
    try:
        engine = make_engine(url)
        try:
            with engine.connect() as conn:
                conn.execute(text("SELECT 1"))
        finally:
            engine.dispose()
    except Exception as exc:  # driver errors vary: OperationalError, ImportError of the driver...
        raise StartupError(EXIT_DATABASE, "node.database_url", f"{shown} cannot be reached ({_first_line(exc)})",
                           "check that the database server runs and accepts this host, and the URL's "
                           "host, port, user and password") from exc


def check_worker_database(config: Config) -> None:
    """``cxrnode worker`` needs PostgreSQL: an SQLite index belongs to one host's ``serve``."""
    from dicom_node.db import is_sqlite

    if is_sqlite(config.node.resolved_database_url()):
        raise StartupError(EXIT_CONFIG, "node.database_url",
                           "cxrnode worker needs PostgreSQL (an SQLite index belongs to one host's serve)",
                           "set node.database_url = \"postgresql+psycopg://...\" for every host, or run the "
                           "workers inside serve (jobs.workers > 0)")


def _unescape_mount(field: str) -> str:
    """Undo mountinfo's octal escapes (``\\040`` space, ``\\011`` tab, ``\\012`` newline, ``\\134`` backslash)."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def filesystem_of(path: str | os.PathLike[str], mountinfo: str) -> tuple[str, str] | None:
    """``(mount point, filesystem type)`` of the mount holding ``path`` (already resolved), read
    from a ``/proc/<pid>/mountinfo`` text (proc(5)): the longest mount point that contains the
    path, the last one listed when several are mounted on the same point (it hides the others)."""
    target = os.path.normpath(os.fspath(path))
    best: tuple[str, str] | None = None
    for line in mountinfo.splitlines():
        left, sep, right = line.partition(" - ")
        fields, tail = left.split(), right.split()
        if not sep or len(fields) < 5 or not tail:
            continue
        point = _unescape_mount(fields[4])
        inside = target == point or point == "/" or target.startswith(point.rstrip("/") + "/")
        if inside and (best is None or len(point) >= len(best[0])):
            best = (point, tail[0])
    return best


def is_network_filesystem(fstype: str) -> bool:
    return fstype in NETWORK_FILESYSTEMS or fstype.startswith(("nfs", "smb"))


def read_mountinfo() -> str:
    try:
        return Path("/proc/self/mountinfo").read_text(encoding="utf-8", errors="surrogateescape")
    except OSError:  # not Linux, or /proc not mounted: nothing to go on
        return ""


def sqlite_path(url: str) -> Path | None:
    """The file of an ``sqlite:///`` URL (``None``: not SQLite, or in memory)."""
    if not url.startswith("sqlite"):
        return None
    database = make_url(url).database
    if not database or database == ":memory:" or database.startswith("file::memory:"):
        return None
    return Path(database)


def check_sqlite_location(config: Config, mountinfo: str | None = None) -> None:
    """Refuse an SQLite index whose file lies on a network filesystem: SQLite's locks (and the
    WAL's shared memory) do not hold across hosts there, and a second host corrupts the index.
    ``mountinfo`` is the text of ``/proc/self/mountinfo`` (read when not given; tests pass one)."""
    db = sqlite_path(config.node.resolved_database_url())
    if db is None:
        return
    place = db.resolve()
    while not place.exists() and place != place.parent:  # not created yet: the folder it will be in
        place = place.parent
    found = filesystem_of(place.resolve(), read_mountinfo() if mountinfo is None else mountinfo)
    if found is None or not is_network_filesystem(found[1]):
        return
    point, fstype = found
    raise StartupError(EXIT_NETWORK_FS, "node.database_url",
                       f"the SQLite index {str(db)!r} lies on a network filesystem ({fstype} mounted at "
                       f"{point!r}), where SQLite's locking is not safe",
                       "set node.database_url to PostgreSQL (several hosts), or put the SQLite file on a "
                       "local disk (node.database_url = \"sqlite:////var/lib/cxrnode/cxrnode.db\"); the "
                       "storage folder itself may stay on the network filesystem")


def check_schema(config: Config) -> None:
    """On PostgreSQL the schema belongs to ``cxrnode migrate``: ``serve`` and ``worker`` start only
    on the revision they were written for (not behind: run migrate; not ahead: a newer cxrnode
    migrated it). SQLite (one host) is migrated by ``serve`` itself, as before."""
    from dicom_node.db import SchemaMismatch, is_sqlite
    from dicom_node.db import check_schema as check

    url = config.node.resolved_database_url()
    if is_sqlite(url):
        return
    try:
        check(url)
    except SchemaMismatch as exc:
        raise StartupError(EXIT_CONFIG, "node.database_url", str(exc).split("; ")[0],
                           str(exc).split("; ", 1)[1] if "; " in str(exc) else "run `cxrnode migrate`") from exc


def prepare_schema(config: Config) -> None:
    """What every other program that opens the index does before it uses it (the reviewer, the
    worklist), as ``serve`` does: an SQLite index (one host) is migrated under
    :func:`dicom_node.db.migrate_locked` and must not lie on a network filesystem; a PostgreSQL
    one must answer and be at this code's revision (only ``cxrnode migrate`` changes it).

    Parameters
    ----------
    config:
        The configuration naming the database.

    Raises
    ------
    StartupError
        The index cannot be used (one line with :meth:`StartupError.line`).
    """
    from dicom_node.db import SchemaMismatch, is_sqlite, migrate_locked

    url = config.node.resolved_database_url()
    if not is_sqlite(url):
        check_database(config)
        check_schema(config)
        return
    check_sqlite_location(config)
    try:
        migrate_locked(url)
    except SchemaMismatch as exc:
        what, _, todo = str(exc).partition("; ")
        raise StartupError(EXIT_CONFIG, "node.database_url", what, todo or "upgrade cxrnode on this host") from exc


def check_port(config: Config) -> None:
    host, port = config.node.host, config.node.port
    if port == 0:
        return
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    s = socket.socket(family, socket.SOCK_STREAM)
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((host or "0.0.0.0", port))
    except OSError as exc:
        raise port_error(config, exc) from exc
    finally:
        s.close()


def check_health_port(config: Config) -> None:
    """``node.health_port`` (0: off) can be bound on ``node.health_host``."""
    host, port = config.node.health_host, config.node.health_port
    if not port:
        return
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    s = socket.socket(family, socket.SOCK_STREAM)
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((host, port))
    except (OSError, socket.gaierror) as exc:
        raise health_port_error(config, exc) from exc
    finally:
        s.close()


def health_port_error(config: Config, exc: OSError) -> StartupError:
    """Why ``node.health_port`` cannot be bound, as a :class:`StartupError` with what to do."""
    port = config.node.health_port
    return _bind_error(EXIT_HEALTH_PORT, "node.health_", config.node.health_host, port, exc,
                       in_use=f"stop the other program (see: ss -ltnp 'sport = :{port}') or choose another "
                              "node.health_port (--health-port)",
                       denied="choose node.health_port >= 1024",
                       bad_host="set node.health_host to an address of this machine (127.0.0.1, or 0.0.0.0 "
                                "in a container)")


def port_error(config: Config, exc: OSError) -> StartupError:
    """Why ``node.port`` cannot be bound, as a :class:`StartupError` with what to do."""
    port = config.node.port
    return _bind_error(EXIT_PORT, "node.", config.node.host, port, exc,
                       in_use=f"stop the other program (see: ss -ltnp 'sport = :{port}'; another cxrnode serve?) "
                              "or choose another node.port",
                       denied="ports below 1024 need root or CAP_NET_BIND_SERVICE (the installed unit grants it); "
                              "or choose node.port >= 1024",
                       bad_host="set node.host to an address of this machine (0.0.0.0 = all)")


def _bind_error(code: int, prefix: str, host: str, port: int, exc: OSError, *, in_use: str, denied: str,
                bad_host: str) -> StartupError:
    """The one reading of a failed bind: the port in use, a privileged port, or not an address of
    this machine (``prefix + "port"`` / ``prefix + "host"`` name the keys)."""
    if exc.errno == errno.EADDRINUSE:
        return StartupError(code, f"{prefix}port", f"{host}:{port} is already in use", in_use)
    if exc.errno == errno.EACCES:
        return StartupError(code, f"{prefix}port", f"{host}:{port}: permission denied", denied)
    return StartupError(code, f"{prefix}host", f"cannot bind {host}:{port} ({exc.strerror or exc})", bad_host)


def load_and_prepare_handler(config: Config, always: bool = False) -> JobHandler | None:
    """The ``draft`` handler, prepared (model loaded and one tiny generation run); ``None`` when
    this node runs no workers (``jobs.workers = 0``: drafting happens elsewhere) unless ``always``
    (``cxrnode worker``)."""
    if config.jobs.workers == 0 and not always:
        return None
    try:
        handler = load_handler("draft")
    except HandlerUnavailable as exc:
        raise StartupError(EXIT_CONFIG, "jobs.workers", str(exc),
                           "install the complete cxrnode package, or set jobs.workers = 0 on a receive-only node") from exc
    prepare = getattr(handler, "prepare", None)
    if callable(prepare):
        try:
            prepare(config)
        except Exception as exc:
            raise StartupError(EXIT_CONFIG, "model.bundle", f"{config.model.bundle!r} cannot be used: {_first_line(exc)}",
                               "set model.bundle to an installed bundle (a name or a folder) or reinstall it "
                               "from the offline bundle") from exc
    return handler


def preflight(config: Config) -> JobHandler | None:
    """Every check before the node listens; raises :class:`StartupError`; returns the handler."""
    check_storage(config)
    check_free_space(config)
    check_sqlite_location(config)  # before the database check, which would create the file there
    check_database(config)
    check_schema(config)
    check_port(config)
    check_health_port(config)
    return load_and_prepare_handler(config)
