"""``cxrnode serve`` and ``cxrnode status``.

``cxrnode status --json`` prints one JSON object; scripts and monitoring rely on this schema
(``"schema": "cxrnode.status/1"``; new keys may be added, existing ones keep their meaning)::

    {
      "schema": "cxrnode.status/1",
      "generated_at": "2026-11-25T13:00:00Z",          # UTC, ISO 8601
      "node": {"ae_title": str, "port": int, "storage_dir": str, "database": str},  # URL without password
      "counts": {"studies": {state: n}, "jobs": {state: n}, "outbound": {state: n}},
      "queue": {"jobs_pending": int, "jobs_running": int, "jobs_waiting_with_errors": int,
                "oldest_pending_job_age_s": float|null,          # seconds; null: nothing pending
                "drafts_waiting_review": int,                    # drafts new or in review
                "oldest_draft_waiting_review_age_s": float|null,
                "outbound_waiting": {destination: int},          # pending or sending, every destination
                "outbound_failed": {destination: int}},
      "studies": [                                      # most recently received first (--limit)
        {"study_instance_uid": str, "state": str,       # receiving|queued|drafted|skipped|failed|signed
         "generation": int, "instances": int,           # received instances (not our SRs)
         "first_received_at": str, "last_received_at": str,
         "jobs": [{"id": int, "state": str,             # pending|running|done|skipped|failed|superseded
                   "attempts": int, "last_error": str|null, "study_generation": int,
                   "not_before": str, "updated_at": str, "model_name": str, "model_version": str}],
         "drafts": [{"id": int, "state": str, "sop_instance_uid": str,
                     "path": str,                       # absolute path of the draft SR file
                     "signed_sop_instance_uid": str|null,
                     "signed_path": str|null,           # absolute path of the verified SR file
                     "signed_by": str|null, "signed_at": str|null}]}
      ],
      "outbound": [{"id": int, "destination": str, "sop_instance_uid": str, "path": str,
                    "state": str,                       # pending|sending|done|failed
                    "attempts": int, "next_attempt_at": str, "last_error": str|null,
                    "sent_at": str|null}]             # not done first, then the latest done
    }

No patient names or IDs appear in ``status`` (UIDs only). ``--prometheus FILE`` writes the
same figures as a node_exporter textfile (metric names in :mod:`dicom_node.ops`).

``cxrnode jobs`` lists jobs (``--json``: ``{"schema": "cxrnode.jobs/1", "jobs": [...]}``, each job as
in ``status``'s studies plus ``study_instance_uid``, ``duration_ms``, ``created_at``); ``cxrnode jobs
show ID`` prints the whole job log and the SRs it wrote with the input gate's outcome
(``--json``: schema ``cxrnode.job/1``); ``cxrnode jobs retry ID|--failed`` re-queues failed jobs
(audited as ``job_retried``). Exit status of ``jobs``: 0 done, 1 not found or refused, 2 usage.
"""

from __future__ import annotations

import argparse
import datetime as dt
import errno
import json
import logging
import signal
import sys
import threading
import traceback
from collections.abc import Callable
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.engine import make_url

from dicom_node.config import Config, load_config

CONFIG_HELP = ("TOML configuration file (default: $CXRNODE_CONFIG, else this installation's config "
               "(/etc/cxrnode/cxrnode.toml or PREFIX/etc/cxrnode/cxrnode.toml), else built-in defaults)")
SET_HELP = "override one setting, e.g. --set node.port=11113 (value in TOML syntax; repeatable)"


def add_config_arguments(p: argparse.ArgumentParser, nested: bool = False) -> None:
    """``--config`` and ``--set``; ``nested`` for an action's parser (``jobs show``), whose defaults
    must not overwrite what was given before the action (``jobs --config X show 5``)."""
    if nested:
        p.add_argument("--config", metavar="PATH", help=CONFIG_HELP, default=argparse.SUPPRESS)
        p.add_argument("--set", metavar="SECTION.KEY=VALUE", action="append", dest="overrides", help=SET_HELP,
                       default=argparse.SUPPRESS)
        return
    p.add_argument("--config", metavar="PATH", help=CONFIG_HELP)
    p.add_argument("--set", metavar="SECTION.KEY=VALUE", action="append", default=[], dest="overrides", help=SET_HELP)


def config_from_args(args: argparse.Namespace) -> Config:
    overrides = list(args.overrides or [])
    if getattr(args, "health_port", None) is not None:  # --health-port N: the same as --set node.health_port=N
        overrides.append(f"node.health_port={int(args.health_port)}")
    return load_config(args.config, overrides)


# third-party loggers kept at WARNING unless DEBUG is asked for (highdicom alone writes seven
# "copy attributes of module" INFO lines per draft)
QUIET_LOGGERS = ("pynetdicom", "highdicom", "pydicom", "alembic", "sqlalchemy", "PIL", "urllib3", "onnxruntime")


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ``ts`` (UTC, ISO 8601), ``level``, ``logger``, ``message``,
    ``exc`` (a traceback, when there is one). Messages are the node's own, which carry UIDs,
    never patient names or IDs (house rule 10)."""

    def format(self, record: logging.LogRecord) -> str:
        obj: dict[str, Any] = {
            "ts": dt.datetime.fromtimestamp(record.created, dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname, "logger": record.name, "message": record.getMessage(),
        }
        if record.exc_info:
            obj["exc"] = self.formatException(record.exc_info)
        return json.dumps(obj, ensure_ascii=False)


def configure_logging(level: str, log_format: str = "text") -> None:
    """Log to stderr, as text or one JSON object per line; third-party chatter at WARNING unless DEBUG."""
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if log_format == "json"
                         else logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root.addHandler(handler)
    root.setLevel(level.upper())
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel("DEBUG" if level.upper() == "DEBUG" and name == "pynetdicom" else "WARNING")


# -- serve -----------------------------------------------------------------------------------


def _add_process_arguments(parser: argparse.ArgumentParser, what: str) -> None:
    """The options every long-running process has (``serve``, ``worker``)."""
    add_config_arguments(parser)
    parser.add_argument("--verbose", action="store_true", help=f"print the traceback when the {what} cannot start")
    parser.add_argument("--log-format", choices=("text", "json"), default="text",
                        help="text lines, or one JSON object per line for log shippers (default: text)")
    parser.add_argument("--health-port", type=int, default=None, metavar="N",
                        help="answer HTTP /healthz, /livez and /metrics (Prometheus) on port N of node.health_host "
                             "(default 127.0.0.1; 0.0.0.0 in a container); the same as --set node.health_port=N "
                             "(default: node.health_port, 0 = off)")


def _run_process(args: argparse.Namespace, command: str, start: Callable[[Config, list[Any]], Any],
                 ready: Callable[[Config, Any], str]) -> int:
    """The life of a ``serve`` or ``worker`` process: config and logging, SIGTERM/SIGINT stop it,
    ``start(config)`` returns the started Node (a start problem is one line naming the key, with
    its exit code; the traceback only with --verbose), ``ready`` is printed, then wait."""
    verbose = bool(getattr(args, "verbose", False))
    config = config_from_args(args)
    configure_logging(config.node.log_level, getattr(args, "log_format", "text"))
    stop = threading.Event()

    def on_signal(signum: int, _frame: Any) -> None:
        logging.getLogger(__name__).info("received %s: shutting down", signal.Signals(signum).name)
        stop.set()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        return _start_and_wait(command, start, ready, config, stop, verbose)
    finally:
        for sig, handler in previous.items():  # a caller in the same process (tests) gets its own back
            signal.signal(sig, handler)


def _start_and_wait(command: str, start: Callable[[Config, list[Any]], Any], ready: Callable[[Config, Any], str],
                    config: Config, stop: threading.Event, verbose: bool) -> int:
    from dicom_node.startup import EXIT_ERROR, StartupError

    started: list[Any] = []  # start() appends the Node before starting it, so a failure can stop it
    try:
        node = start(config, started)
    except StartupError as exc:
        print(exc.line(command), file=sys.stderr, flush=True)
        if verbose:
            traceback.print_exc()
        _stop_quietly(started[0] if started else None)
        return exc.code
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        print(f"cxrnode {command}: cannot start: {type(exc).__name__}: {first}"
              + ("" if verbose else " (run with --verbose for the traceback)") + f" (exit {EXIT_ERROR})",
              file=sys.stderr, flush=True)
        if verbose:
            traceback.print_exc()
        _stop_quietly(started[0] if started else None)
        return EXIT_ERROR
    print(ready(config, node), file=sys.stderr, flush=True)
    try:
        while not stop.wait(1.0):
            pass
    finally:
        node.stop()
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    """Check everything a site can get wrong (see :mod:`dicom_node.startup`), then listen."""

    def start(config: Config, started: list[Any]) -> Any:
        from dicom_node.db import is_sqlite
        from dicom_node.node import Node
        from dicom_node.startup import port_error, preflight

        handler = preflight(config)
        # SQLite (one host): serve migrates it itself; PostgreSQL: only `cxrnode migrate` does
        node = Node(config, job_handler=handler, migrate_schema=is_sqlite(config.node.resolved_database_url()),
                    model=config.model.bundle if handler is not None else None)
        started.append(node)
        try:
            return node.start()
        except OSError as exc:
            if exc.errno in (errno.EADDRINUSE, errno.EACCES, errno.EADDRNOTAVAIL) and exc.filename is None:
                raise port_error(config, exc) from exc
            raise

    return _run_process(args, "serve", start,
                        lambda c, n: f"cxrnode: {c.node.ae_title} listening on {c.node.host}:{n.port}")


# -- worker and migrate (several hosts on one PostgreSQL) ------------------------------------


def cmd_worker(args: argparse.Namespace) -> int:
    """Claim and run drafting jobs and outbound transfers (no SCP, no promoter) until SIGTERM."""

    def start(config: Config, started: list[Any]) -> Any:
        from dicom_node.node import Node
        from dicom_node.startup import (
            EXIT_CONFIG,
            StartupError,
            check_database,
            check_free_space,
            check_health_port,
            check_schema,
            check_storage,
            check_worker_database,
            load_and_prepare_handler,
        )

        if args.threads is not None and args.threads < 1:
            raise StartupError(EXIT_CONFIG, "--threads", f"expected a number >= 1, got {args.threads}",
                               "give the number of drafting threads of this worker")
        check_worker_database(config)
        check_storage(config)
        check_free_space(config)
        check_database(config)
        check_schema(config)
        check_health_port(config)
        handler = load_and_prepare_handler(config, always=True)
        node = Node(config, job_handler=handler, migrate_schema=False, role="worker", workers=args.threads,
                    model=config.model.bundle)
        started.append(node)
        return node.start()

    return _run_process(args, "worker", start,
                        lambda c, n: f"cxrnode worker: {n.workers} drafting thread(s) on host {n.store.host_id!r}")


def cmd_migrate(args: argparse.Namespace) -> int:
    """Bring the index database to this code's schema (PostgreSQL: under an advisory lock)."""
    from dicom_node.db import SchemaMismatch, migrate_locked
    from dicom_node.startup import EXIT_CONFIG, EXIT_DATABASE, EXIT_ERROR

    config = config_from_args(args)
    configure_logging(config.node.log_level)
    url = config.node.resolved_database_url()
    shown = make_url(url).render_as_string(hide_password=True)
    try:
        before, after = migrate_locked(url)
    except SchemaMismatch as exc:
        print(f"cxrnode migrate: node.database_url: {exc} (exit {EXIT_CONFIG})", file=sys.stderr, flush=True)
        return EXIT_CONFIG
    except Exception as exc:
        from sqlalchemy.exc import OperationalError

        code = EXIT_DATABASE if isinstance(exc, OperationalError) else EXIT_ERROR
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        print(f"cxrnode migrate: node.database_url: {shown}: {type(exc).__name__}: {first} (exit {code})",
              file=sys.stderr, flush=True)
        if getattr(args, "verbose", False):
            traceback.print_exc()
        return code
    if before == after:
        print(f"cxrnode migrate: {shown} already at revision {after} (nothing to do)", flush=True)
    else:
        print(f"cxrnode migrate: {shown} upgraded from {before or 'an empty database'} to {after}", flush=True)
    return 0


def _stop_quietly(node: Any) -> None:
    if node is not None:
        try:
            node.stop(grace_s=1.0)
        except Exception:
            logging.getLogger(__name__).debug("stopping a node that did not start", exc_info=True)


# -- status ----------------------------------------------------------------------------------


def _ts(value: dt.datetime | None) -> str | None:
    return None if value is None else value.replace(microsecond=0).isoformat() + "Z"


def collect_status(config: Config, limit: int = 100) -> dict[str, Any]:
    """The ``status`` report as a JSON-ready dict (schema in the module docstring)."""
    from dicom_node.db import Draft, Instance, Job, Study, Transfer, make_engine, session_factory

    url = config.node.resolved_database_url()
    engine = make_engine(url)
    root = config.storage_path.resolve()
    try:
        with session_factory(engine)() as s:
            from dicom_node.ops import queue_summary, status_counts

            counts = status_counts(s)
            studies = s.scalars(select(Study).order_by(Study.last_received_at.desc(), Study.id.desc()).limit(limit)).all()
            ids = [st.id for st in studies]
            n_inst = dict(s.execute(
                select(Instance.study_id, func.count()).where(Instance.study_id.in_(ids), Instance.generated == 0)
                .group_by(Instance.study_id)).all()) if ids else {}
            jobs: dict[int, list[Job]] = {}
            for j in s.scalars(select(Job).where(Job.study_id.in_(ids)).order_by(Job.id)).all() if ids else []:
                jobs.setdefault(j.study_id, []).append(j)
            drafts: dict[int, list[Draft]] = {}
            for d in s.scalars(select(Draft).where(Draft.study_id.in_(ids)).order_by(Draft.id)).all() if ids else []:
                drafts.setdefault(d.study_id, []).append(d)
            queue = queue_summary(s, config)
            pending = s.scalars(select(Transfer).where(Transfer.state != "done").order_by(Transfer.id)).all()
            done = s.scalars(select(Transfer).where(Transfer.state == "done").order_by(Transfer.id.desc()).limit(limit)).all()
            out = {
                "schema": "cxrnode.status/1",
                "generated_at": _ts(dt.datetime.now(dt.UTC).replace(tzinfo=None)),
                "node": {
                    "ae_title": config.node.ae_title,
                    "port": config.node.port,
                    "storage_dir": str(root),
                    "database": make_url(url).render_as_string(hide_password=True),
                },
                "counts": counts,
                "queue": queue,
                "studies": [
                    {
                        "study_instance_uid": st.study_instance_uid,
                        "state": st.state,
                        "generation": st.generation,
                        "instances": int(n_inst.get(st.id, 0)),
                        "first_received_at": _ts(st.first_received_at),
                        "last_received_at": _ts(st.last_received_at),
                        "jobs": [
                            {"id": j.id, "state": j.state, "attempts": j.attempts, "last_error": j.last_error,
                             "study_generation": j.study_generation, "not_before": _ts(j.not_before),
                             "updated_at": _ts(j.updated_at), "model_name": j.model_name,
                             "model_version": j.model_version}
                            for j in jobs.get(st.id, [])
                        ],
                        "drafts": [
                            {"id": d.id, "state": d.state, "sop_instance_uid": d.sop_instance_uid,
                             "path": str(root / d.path) if d.path else None,
                             "signed_sop_instance_uid": d.signed_sop_instance_uid,
                             "signed_path": str(root / d.signed_path) if d.signed_path else None,
                             "signed_by": d.signed_by, "signed_at": _ts(d.signed_at)}
                            for d in drafts.get(st.id, [])
                        ],
                    }
                    for st in studies
                ],
                "outbound": [
                    {"id": t.id, "destination": t.destination, "sop_instance_uid": t.sop_instance_uid,
                     "path": str(root / t.path), "state": t.state, "attempts": t.attempts,
                     "next_attempt_at": _ts(t.next_attempt_at), "last_error": t.last_error,
                     "sent_at": _ts(t.sent_at)}
                    for t in [*pending, *done]
                ],
            }
    finally:
        engine.dispose()
    return out


def format_status(report: dict[str, Any]) -> str:
    lines = [f"{report['node']['ae_title']} on port {report['node']['port']}, store {report['node']['storage_dir']}"]
    c = report["counts"]
    lines.append("studies: " + (", ".join(f"{k} {v}" for k, v in sorted(c["studies"].items())) or "none")
                 + " | jobs: " + (", ".join(f"{k} {v}" for k, v in sorted(c["jobs"].items())) or "none")
                 + " | outbound: " + (", ".join(f"{k} {v}" for k, v in sorted(c["outbound"].items())) or "none"))
    for st in report["studies"]:
        lines.append(f"\nstudy {st['study_instance_uid']}  {st['state']}  {st['instances']} instance(s)"
                     f"  last received {st['last_received_at']}")
        for j in st["jobs"]:
            err = f"  error: {j['last_error']}" if j["last_error"] else ""
            lines.append(f"  job {j['id']}: {j['state']}, {j['attempts']} attempt(s){err}")
        for d in st["drafts"]:
            lines.append(f"  draft {d['id']} ({d['state']}): {d['path']}")
            if d["signed_path"]:
                lines.append(f"    signed: {d['signed_path']}")
    if report["outbound"]:
        lines.append("\noutbound:")
        for t in report["outbound"]:
            err = f"  error: {t['last_error']}" if t["last_error"] else ""
            lines.append(f"  {t['id']}: {t['sop_instance_uid']} -> {t['destination']}  {t['state']}, "
                         f"{t['attempts']} attempt(s){err}")
    return "\n".join(lines)


def cmd_status(args: argparse.Namespace) -> int:
    config = config_from_args(args)
    from dicom_node.db import current_revision

    try:
        rev, head = current_revision(config.node.resolved_database_url())
    except Exception as exc:
        print(f"cxrnode status: cannot open the index database: {exc}", file=sys.stderr)
        return 1
    if rev is None:
        print("cxrnode status: the index database is empty; has `cxrnode serve` run yet?", file=sys.stderr)
        return 1
    report = collect_status(config, limit=args.limit)
    if rev != head:
        report["warning"] = f"database at revision {rev}, this code expects {head}"
    if args.prometheus:
        from dicom_node.ops import write_prometheus

        write_prometheus(report, args.prometheus)
        if args.prometheus == "-" or not args.json:
            return 0
    if args.json:
        json.dump(report, sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        print(format_status(report))
    return 0


# -- jobs ------------------------------------------------------------------------------------


def _open(config: Config) -> tuple[Any, Any] | None:
    from dicom_node.db import current_revision, make_engine, session_factory

    try:
        rev, _head = current_revision(config.node.resolved_database_url())
    except Exception as exc:
        print(f"cxrnode jobs: cannot open the index database (node.database_url): {exc}", file=sys.stderr)
        return None
    if rev is None:
        print("cxrnode jobs: the index database is empty; has `cxrnode serve` run yet?", file=sys.stderr)
        return None
    engine = make_engine(config.node.resolved_database_url())
    return engine, session_factory(engine)


def cmd_jobs(args: argparse.Namespace) -> int:
    from dicom_node import ops

    config = config_from_args(args)
    opened = _open(config)
    if opened is None:
        return 1
    engine, sessions = opened
    try:
        with sessions() as s:
            if args.jobs_command == "show":
                detail = ops.job_detail(s, config, args.id)
                if detail is None:
                    print(f"cxrnode jobs show: no job {args.id}", file=sys.stderr)
                    return 1
                print(json.dumps(detail, indent=2) if args.json else format_job(detail))
                return 0
            if args.jobs_command == "retry":
                return _retry(s, args)
            rows = ops.list_jobs(s, states=args.state, study_uid=args.study_uid, limit=args.limit)
    finally:
        engine.dispose()
    if args.json:
        print(json.dumps({"schema": ops.JOBS_SCHEMA, "jobs": rows}, indent=2))
    elif not rows:
        print("No jobs.")
    else:
        for r in rows:
            err = f"  error: {r['last_error']}" if r["last_error"] else ""
            print(f"{r['id']:>6}  {r['state']:<10} {r['attempts']} attempt(s)  {r['updated_at']}  "
                  f"{r['study_instance_uid']}{err}")
    return 0


def _retry(s: Any, args: argparse.Namespace) -> int:
    import getpass

    from dicom_node import ops

    actor = getpass.getuser()
    if args.failed:
        done, refused = ops.retry_failed(s, actor)
    elif args.id is not None:
        try:
            done, refused = [ops.retry_job(s, args.id, actor)], []
        except ops.RetryRefused as exc:
            print(f"cxrnode jobs retry: {exc}", file=sys.stderr)
            return 1
    else:
        print("cxrnode jobs retry: give a job ID or --failed", file=sys.stderr)
        return 2
    s.commit()
    for r in done:
        print(f"job {r.job_id} (study {r.study_instance_uid}): was {r.was}, queued again")
    for line in refused:
        print(f"skipped: {line}")
    if not done and not refused:
        print("No failed jobs.")
    return 0


def format_job(d: dict[str, Any]) -> str:
    lines = [f"job {d['id']}  {d['state']}  {d['attempts']} attempt(s)  study {d['study_instance_uid']} "
             f"(generation {d['study_generation']}, study {d['study']['state']})"]
    if d["model_name"]:
        lines.append(f"model {d['model_name']} {d['model_version']}"
                     + (f", {d['duration_ms']:.0f} ms" if d["duration_ms"] is not None else ""))
    if d["last_error"]:
        lines.append(f"last error: {d['last_error']}")
    if d["newer_job_id"]:
        lines.append(f"replaced by job {d['newer_job_id']}")
    lines.append("\nlog:")
    lines += ["  " + ln for ln in d["log"].rstrip("\n").splitlines()]
    lines.append("\nSRs written:" if d["srs"] else "\nSRs written: none")
    for sr in d["srs"]:
        gate = sr["input_check"]
        gate_text = (f"input gate {gate.get('outcome')}" + (f": {gate.get('reason')}" if gate.get("reason") else "")
                     if gate else "input gate: not checked")
        lines.append(f"  draft {sr['draft_id']} ({sr['state']}) {sr['sop_instance_uid']}")
        lines.append(f"    {sr['path']}")
        lines.append(f"    {gate_text}")
        if sr["signed_path"]:
            lines.append(f"    signed by {sr['signed_by']} at {sr['signed_at']}: {sr['signed_path']}")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cxrnode", description="cxrnode DICOM node commands")
    add_subcommands(parser.add_subparsers(dest="command", metavar="COMMAND"))
    return parser


def add_subcommands(subparsers: Any) -> None:
    serve = subparsers.add_parser(
        "serve", help="run the node in the foreground (Storage SCP, job workers, outbound sender)",
        description="Run the Storage SCP, the quiet-study promoter, the report-drafting workers and the "
                    "outbound sender in the foreground. Before it listens it checks the storage folder, "
                    "free space, the database, the port and (with jobs.workers > 0) loads the model and runs "
                    "one tiny generation; a problem is one line naming the config key. Logs go to stderr. "
                    "SIGTERM or SIGINT stop it cleanly: no new associations, in-flight ones finish. An SQLite "
                    "index on a network filesystem (NFS, SMB, sshfs...) is refused. With --health-port it "
                    "answers GET /healthz (200 or 503 naming the failing check: process, database, and the "
                    "model when jobs.workers > 0), GET /livez (the process alone) and GET /metrics (Prometheus text) "
                    "over HTTP.",
        epilog="exit status: 0 stopped cleanly; 1 unexpected error; 2 configuration (a key, model.bundle, "
               "the plugin, a schema not at this version on PostgreSQL); 3 node.port/node.host cannot be bound; "
               "4 node.storage_dir not writable; 5 free space below node.min_free_space_mb; 6 node.database_url "
               "unreachable; 7 the SQLite index lies on a network filesystem; 8 node.health_port/node.health_host "
               "cannot be bound",
    )
    _add_process_arguments(serve, "node")
    serve.set_defaults(func=cmd_serve)

    worker = subparsers.add_parser(
        "worker", help="claim and run drafting jobs and outbound transfers (no SCP); any number, on any host",
        description="Run report-drafting workers and the outbound sender against the shared PostgreSQL index "
                    "and storage folder, without a Storage SCP: start any number, on any host (each with "
                    "node.host_id, else its host name, for its spool folder). Quiet studies are queued by "
                    "`cxrnode serve`. Refuses an SQLite index and a schema it does not know (run `cxrnode "
                    "migrate`). SIGTERM or SIGINT stop it; a job in progress is finished or, after its lease, "
                    "taken over by another worker. With --health-port it answers GET /healthz (process, "
                    "database, model), GET /livez and GET /metrics (Prometheus text) over HTTP.",
        epilog="exit status: 0 stopped cleanly; 1 unexpected error; 2 configuration (SQLite index, schema "
               "not at this version, model.bundle, the plugin); 4 node.storage_dir not writable; 5 free space "
               "below node.min_free_space_mb; 6 node.database_url unreachable; 8 node.health_port/"
               "node.health_host cannot be bound",
    )
    _add_process_arguments(worker, "worker")
    worker.add_argument("--threads", type=int, default=None, metavar="N",
                        help="drafting threads in this process (default: jobs.workers, at least 1)")
    worker.set_defaults(func=cmd_worker)

    migrate = subparsers.add_parser(
        "migrate", help="create or upgrade the index database's schema (the only command that changes it)",
        description="Upgrade node.database_url to this version's schema with Alembic. On PostgreSQL it holds an "
                    "advisory lock while it runs, so hosts migrating at once apply each revision once; `serve` "
                    "and `worker` there refuse a schema they do not know. An SQLite index is also migrated by "
                    "`serve` itself.",
        epilog="exit status: 0 upgraded or already current; 1 unexpected error; 2 the database is newer than "
               "this cxrnode; 6 node.database_url unreachable",
    )
    add_config_arguments(migrate)
    migrate.add_argument("--verbose", action="store_true", help="print the traceback on failure")
    migrate.set_defaults(func=cmd_migrate)

    status = subparsers.add_parser(
        "status", help="list studies, their jobs and SR files, and the outbound queue",
        description="Show studies (Study Instance UID, instance count, state), their jobs (state, attempts, "
                    "last error), the paths of their draft and signed SR files, and the outbound queue. "
                    "--json prints a stable schema (cxrnode.status/1, see `pydoc dicom_node.cli`).",
    )
    add_config_arguments(status)
    status.add_argument("--json", action="store_true", help="print JSON (schema cxrnode.status/1)")
    status.add_argument("--prometheus", metavar="FILE",
                        help="write the queue figures as a node_exporter textfile (atomically; '-' = stdout); "
                             "metric names: `pydoc dicom_node.ops`")
    status.add_argument("--limit", type=int, default=100, metavar="N", help="show the N most recent studies (default 100)")
    status.set_defaults(func=cmd_status)

    from dicom_node.db import JobState

    states = [JobState.PENDING, JobState.RUNNING, JobState.DONE, JobState.SKIPPED, JobState.FAILED,
              JobState.SUPERSEDED]
    jobs = subparsers.add_parser(
        "jobs", help="list report-drafting jobs; show one (its log and SRs); retry failed ones",
        description="Follow a study: `cxrnode jobs` lists jobs (newest first), `cxrnode jobs show ID` prints "
                    "the whole job log (decode, window, views and why, indication source, gate outcome, model, "
                    "timing) and the SRs it wrote, `cxrnode jobs retry ID|--failed` queues failed jobs again "
                    "(audited).",
        epilog="exit status: 0 done, 1 no such job / retry refused / no database, 2 usage error",
    )
    add_config_arguments(jobs)
    jobs.add_argument("--state", action="append", choices=states, help="only jobs in this state (repeatable)")
    jobs.add_argument("--study-uid", default="", metavar="UID", help="only this study's jobs")
    jobs.add_argument("--limit", type=int, default=100, metavar="N", help="at most N jobs (default 100)")
    jobs.add_argument("--json", action="store_true", help="print JSON (schema cxrnode.jobs/1)")
    jobs.set_defaults(func=cmd_jobs, jobs_command="list")
    jsub = jobs.add_subparsers(dest="jobs_command", metavar="ACTION")
    show = jsub.add_parser("show", help="one job: its whole log and the SRs it wrote",
                           description="Print one job: state, attempts, errors, its whole log and the SRs it "
                                       "wrote with the input gate's outcome.")
    show.add_argument("id", type=int, metavar="ID")
    add_config_arguments(show, nested=True)
    show.add_argument("--json", action="store_true", help="print JSON (schema cxrnode.job/1)",
                      default=argparse.SUPPRESS)
    show.set_defaults(func=cmd_jobs)
    retry = jsub.add_parser("retry", help="queue a failed job again (or make a pending one due now); audited",
                            description="Queue a failed job again with its attempts reset (a pending one is made "
                                        "due now). Refused when a newer job of the study replaced it. Each retry "
                                        "is audited (job_retried) and noted in the job's log.")
    retry.add_argument("id", type=int, nargs="?", metavar="ID")
    retry.add_argument("--failed", action="store_true", help="every failed job no newer job replaced")
    add_config_arguments(retry, nested=True)
    retry.set_defaults(func=cmd_jobs)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not getattr(args, "func", None):
        build_parser().print_help()
        return 2
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
