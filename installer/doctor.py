"""``cxrnode doctor``: one table of checks that tells site IT (and its monitoring) whether the
node is healthy.

Each check ends OK, WARN or FAIL with a one-line detail, a stable ``code`` (``<check>.<reason>``,
e.g. ``service.stopped``) and, unless OK, a hint saying what to do. Exit status: 0 when no check
FAILs (WARNs included), 1 when any check FAILs, 2 for a usage error. ``--role`` says what this
machine is: ``node`` (the default: the service runs here), ``reviewer`` (a reviewer workstation:
no service, a display), ``both``. Checks, in order, with their levels:

========================  =============================================================================
config                    FAIL invalid (names the key); WARN reviewers cannot sign (file not root's)
reviewers                 OK n configured; none: WARN on a node, FAIL on a reviewer workstation
storage writable          FAIL missing or not writable
storage free space        FAIL below node.min_free_space_mb; WARN below twice the floor
database                  FAIL unreachable, empty, or not at the migration head
model bundle              FAIL not found (lists the installed bundles) or a file changed
onnx runtime              FAIL no configured provider; WARN a configured provider cannot run
inference                 FAIL the sample study did not run; WARN skipped (--no-inference)
listening port            FAIL cannot bind / held by something that is not this node; WARN port 0
node service              (node, both) OK running; WARN service.stopped (systemd: stopped on purpose,
                          last result success); FAIL service.down (failed / restarting) or
                          node.not_running (no node answers and no systemd unit says why)
destinations              FAIL C-ECHO fails; WARN none configured
tls                       FAIL unreadable, key not 0600, mismatched, expired; WARN expires in < 30 days
queue                     WARN failed jobs, waiting jobs that carry errors (ids and the last error),
                          failed transfers, transfers waiting over an hour
display                   (reviewer, both) FAIL Qt's platform plugin does not load (checked in a
                          subprocess: doctor never imports Qt), saying what is missing
========================  =============================================================================

``--json`` prints one object with a versioned schema (``"schema": "cxrnode.doctor/1"``; keys may
be added, existing ones keep their meaning)::

    {"schema": "cxrnode.doctor/1", "generated_at": "2026-11-28T07:00:00Z", "role": "node",
     "ok": bool,                      # no FAIL
     "status": "OK"|"WARN"|"FAIL",    # the worst check
     "summary": {"OK": n, "WARN": n, "FAIL": n},
     "checks": [{"name": str, "status": str, "code": str, "detail": str, "hint": str, "data": {...}}]}

DICOM traffic goes through :mod:`dicom_node.scu` (only dicom_node speaks DIMSE); the model
through :mod:`onnx_models`; the sample study through :mod:`plugin`. A piece that is missing
or broken shows as FAIL with a hint rather than a crash. No Qt here.
"""

from __future__ import annotations

import ctypes.util
import datetime as dt
import errno
import importlib
import json
import os
import shutil
import socket
import ssl
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

OK, WARN, FAIL = "OK", "WARN", "FAIL"
SCHEMA = "cxrnode.doctor/1"
ROLES = ("node", "reviewer", "both")
TLS_WARN_DAYS = 30
TRANSFER_WAIT_WARN_S = 3600.0


@dataclass
class Check:
    """One line of ``cxrnode doctor``.

    Attributes
    ----------
    name:
        What was checked (``"storage free space"``).
    status:
        ``OK``, ``WARN`` or ``FAIL``.
    detail:
        What was found.
    hint:
        What to do about it.
    data:
        Numbers behind it, for ``--json``.
    code:
        A stable reason, ``"<check>.<reason>"`` (default ``"<check>.<ok|warn|fail>"``).
    """
    name: str
    status: str
    detail: str
    hint: str = ""
    data: dict[str, Any] = field(default_factory=dict)
    code: str = ""  # stable reason, "<check>.<reason>"; defaults to "<check>.<ok|warn|fail>"

    def __post_init__(self) -> None:
        if not self.code:  # "storage free space" -> storage_free_space.warn; "destination pacs" -> destination.fail
            prefix = "destination" if self.name.startswith("destination ") else self.name.replace(" ", "_")
            self.code = f"{prefix}.{self.status.lower()}"


@dataclass
class Context:
    config_path: str
    overrides: list[str]
    echo_timeout_s: float
    inference: bool
    config: Any = None
    db_ok: bool = False
    generator: Any = None
    generator_load_s: float = 0.0
    role: str = "node"
    node_running: bool | None = None  # set by check_port


def _missing(module: str, exc: BaseException) -> str:
    return f"{module} is not available in this installation ({type(exc).__name__}: {exc})"


# --- individual checks -------------------------------------------------------------------------

def check_config(ctx: Context) -> list[Check]:
    from dicom_node.config import ConfigError, load_config

    try:
        ctx.config = load_config(ctx.config_path or None, overrides=ctx.overrides)
    except ConfigError as exc:
        return [Check("config", FAIL, str(exc), "fix the key named above; every key is documented in cxrnode.example.toml")]
    src = ctx.config.source or "(defaults only: no --config file and no CXRNODE_CONFIG)"
    c = ctx.config
    detail = (f"{src}: valid; AE {c.node.ae_title} port {c.node.port}, "
              f"{len(c.destinations)} destination(s), {len(c.reviewers)} reviewer(s)")
    if c.reviewers:
        try:
            from plugin.review.service import UntrustedConfigError, read_installed_config
        except ImportError as exc:
            return [Check("config", WARN, detail + "; cannot check who may sign", _missing("plugin.review.service", exc),
                          data={"source": c.source})]
        try:
            read_installed_config(c.source)
        except UntrustedConfigError as exc:
            return [Check("config", WARN, f"{detail}; the reviewers cannot sign: {exc}",
                          f"make the file root's and writable by root only: chown root: {c.source} && "
                          f"chmod 640 {c.source} (and its folders root-owned, not group/other-writable)",
                          data={"source": c.source})]
    return [Check("config", OK, detail, data={"source": c.source})]


def check_storage(ctx: Context) -> list[Check]:
    node = ctx.config.node
    path = Path(node.storage_dir)
    out: list[Check] = []
    if not path.is_dir():
        return [Check("storage writable", FAIL, f"{path} does not exist",
                      f"create it and give it to the service user: mkdir -p {path} && chown cxrnode: {path}"),
                Check("storage free space", FAIL, f"{path} does not exist", "create the storage folder first")]
    try:
        with tempfile.NamedTemporaryFile(dir=path, prefix=".doctor-", delete=True) as f:
            f.write(b"cxrnode doctor\n")
            f.flush()
            os.fsync(f.fileno())
        st = path.stat()
        owner = _owner(st.st_uid)
        out.append(Check("storage writable", OK, f"{path} (owner {owner}, mode {st.st_mode & 0o7777:o})"))
    except OSError as exc:
        out.append(Check("storage writable", FAIL, f"{path}: cannot write ({exc.strerror or exc})",
                         f"give the folder to the service user (chown) or fix the mount (read-only?) at {path}"))
    usage = shutil.disk_usage(path)
    free_mb = usage.free // (1024 * 1024)
    floor = node.min_free_space_mb
    data = {"free_mb": free_mb, "floor_mb": floor, "total_mb": usage.total // (1024 * 1024)}
    detail = f"{free_mb} MB free of {data['total_mb']} MB; floor node.min_free_space_mb = {floor} MB"
    if free_mb < floor:
        out.append(Check("storage free space", FAIL, detail + ": new instances are refused (0xA700)",
                         "free space on the storage volume (or move storage_dir to a larger one)", data))
    elif free_mb < 2 * floor:
        out.append(Check("storage free space", WARN, detail + ": less than twice the floor",
                         "plan more space before the node starts refusing studies", data))
    else:
        out.append(Check("storage free space", OK, detail, data=data))
    return out


def _owner(uid: int) -> str:
    try:
        import pwd

        return pwd.getpwuid(uid).pw_name
    except (KeyError, ImportError):
        return str(uid)


def _safe_url(url: str) -> str:
    if "@" in url and "://" in url:
        scheme, rest = url.split("://", 1)
        return f"{scheme}://***@{rest.split('@', 1)[1]}"
    return url


def check_database(ctx: Context) -> list[Check]:
    url = ctx.config.node.resolved_database_url()
    shown = _safe_url(url)
    if url.startswith("sqlite:///") and not Path(url.removeprefix("sqlite:///")).is_file():
        return [Check("database", FAIL, f"{shown}: no database file",
                      "initialise it: re-run the installer, `cxrnode upgrade`, or start the node once (it migrates at start)")]
    try:
        from dicom_node.db import current_revision

        rev, head = current_revision(url)
    except Exception as exc:  # driver errors vary: OperationalError, ImportError of the driver...
        return [Check("database", FAIL, f"{shown}: not reachable ({type(exc).__name__}: {str(exc).splitlines()[0]})",
                      "check node.database_url, that the server runs and the credentials")]
    ctx.db_ok = True
    data = {"revision": rev, "head": head}
    if rev is None:
        return [Check("database", FAIL, f"{shown}: reachable but empty (no migration applied)",
                      "migrate it: re-run the installer or `cxrnode upgrade`", data)]
    if rev != head:
        return [Check("database", FAIL, f"{shown}: at revision {rev}, this cxrnode expects {head}",
                      "run `cxrnode upgrade` (or roll back the program to match the database)", data)]
    return [Check("database", OK, f"{shown}: reachable, at the migration head {head}", data=data)]


def check_model(ctx: Context) -> list[Check]:
    name = ctx.config.model.bundle
    try:
        from onnx_models.bundle import BundleError, load_bundle
    except ImportError as exc:
        return [Check("model bundle", FAIL, _missing("onnx_models.bundle", exc), "install a complete cxrnode bundle")]
    t0 = time.perf_counter()
    try:
        b = load_bundle(name)
    except BundleError as exc:
        if "not found" in str(exc):
            from onnx_models.bundle import available_bundles

            have = available_bundles()
            return [Check("model bundle", FAIL, f"model.bundle = {name!r}: {exc}",
                          f"set model.bundle to an installed bundle ({', '.join(have) or 'none installed'}) or to a "
                          "bundle folder", {"available": have}, code="model.not_found")]
        return [Check("model bundle", FAIL, str(exc),
                      "reinstall the model bundle from the offline bundle (a file changed or is corrupt), "
                      "or point model.bundle at an intact bundle", code="model.corrupt")]
    files = len(b.manifest.get("files", {}))
    return [Check("model bundle", OK, f"{b.name} {b.version} at {b.path}: {files} files match their sha256 "
                  f"({time.perf_counter() - t0:.1f} s)", data={"name": b.name, "version": b.version, "path": str(b.path)})]


def _ort_distribution() -> str:
    from importlib.metadata import PackageNotFoundError, version

    for dist in ("onnxruntime-gpu", "onnxruntime"):
        try:
            return f"{dist} {version(dist)}"
        except PackageNotFoundError:
            continue
    return "unknown"


def _why_no_gpu(dist: str) -> str:
    if not dist.startswith("onnxruntime-gpu"):
        return f"this is the CPU build ({dist}); install the GPU bundle (cxrnode bundle --gpu) to use CUDA"
    if not ctypes.util.find_library("cuda") and not Path("/dev/nvidia0").exists():
        return "onnxruntime-gpu is installed but this machine has no NVIDIA GPU/driver (no libcuda, no /dev/nvidia0)"
    return "a GPU is present but ONNX Runtime cannot use it (CUDA/cuDNN libraries of the right version missing?)"


def _generator(ctx: Context) -> Any:
    """The ReportGenerator for the configured bundle (created once, shared by the checks)."""
    if ctx.generator is None:
        from onnx_models.runtime import ReportGenerator

        m = ctx.config.model
        t0 = time.perf_counter()
        ctx.generator = ReportGenerator(bundle=m.bundle, providers=tuple(m.providers), threads=m.threads,
                                        beam_size=m.beam_size)
        ctx.generator_load_s = time.perf_counter() - t0
    return ctx.generator


def check_providers(ctx: Context) -> list[Check]:
    try:
        import onnxruntime as ort
    except ImportError as exc:
        return [Check("onnx runtime", FAIL, _missing("onnxruntime", exc), "install a complete cxrnode bundle")]
    avail = list(ort.get_available_providers())
    dist = _ort_distribution()
    wanted = list(ctx.config.model.providers)
    data: dict[str, Any] = {"available": avail, "configured": wanted, "distribution": dist}
    if wanted and not any(p in avail for p in wanted):
        return [Check("onnx runtime", FAIL, f"{dist}: none of model.providers {wanted} is available (have {avail})",
                      "fix model.providers or install the matching ONNX Runtime build", data)]
    # get_available_providers() lists what the build contains; only a session shows what runs
    try:
        in_use = list(getattr(_generator(ctx), "providers", []))
    except Exception as exc:
        return [Check("onnx runtime", FAIL, f"{dist}: cannot open the model's sessions: {type(exc).__name__}: {exc}",
                      "see the model bundle row; reinstall the bundle", data)]
    data["in_use"] = in_use
    if "CUDAExecutionProvider" in in_use or "TensorrtExecutionProvider" in in_use:
        return [Check("onnx runtime", OK, f"{dist}: GPU used ({', '.join(in_use)})", data=data)]
    if wanted and "CUDAExecutionProvider" not in wanted:
        why = "model.providers does not ask for CUDAExecutionProvider"
    else:
        why = _why_no_gpu(dist)
    missing = [p for p in wanted if p not in in_use]
    status = WARN if missing else OK
    hint = f"model.providers asks for {missing}, which cannot run here" if missing else ""
    return [Check("onnx runtime", status, f"{dist}: GPU not used: {why}; running on {', '.join(in_use) or 'CPU'}",
                  hint, data)]


def sample_study_files() -> list[Path]:
    """The sample study shipped with the plugin (``plugin/drafting/samples``)."""
    plugin = importlib.import_module("plugin")
    root = Path(plugin.__file__ or ".").parent / "drafting" / "samples"
    return sorted(p for p in root.rglob("*.dcm") if p.is_file())


def check_inference(ctx: Context) -> list[Check]:
    if not ctx.inference:
        return [Check("inference", WARN, "skipped (--no-inference)", "run without --no-inference to test the model")]
    try:
        import pydicom

        from onnx_models.runtime import StudyInput
        from onnx_models.views import order
        from plugin.drafting import indication as indication_mod
        from plugin.drafting.pixels import PixelOptions, prepare
        from plugin.drafting.views import InstanceHeader, resolve_view, view_from_tags
    except ImportError as exc:
        return [Check("inference", FAIL, _missing(getattr(exc, "name", None) or "the runtime", exc),
                      "install a complete cxrnode bundle (onnx_models.runtime and plugin are needed)")]
    files = sample_study_files()
    if not files:
        return [Check("inference", FAIL, "no sample study (plugin/drafting/samples/*.dcm) in this installation",
                      "install a complete cxrnode bundle")]
    m = ctx.config.model
    try:
        gen = _generator(ctx)
        load_s = ctx.generator_load_s
        # the node's own functions (plugin.drafting.pipeline): pixels, views (tags + classifier), order, indication
        datasets = [pydicom.dcmread(f) for f in files]
        pixels = [prepare(ds, PixelOptions(voi_window_index=ctx.config.pipeline.voi_window_index)).array
                  for ds in datasets]
        decided = [resolve_view(str(ds.get("SOPInstanceUID", "")), view_from_tags(InstanceHeader.from_dataset(ds)),
                                label).view
                   for ds, label in zip(datasets, gen.classify_views(pixels), strict=True)]
        views = [(pixels[i], decided[i]) for i in order(decided)]
        indication = indication_mod.extract(datasets, ctx.config.pipeline.indication_sources,
                                            ctx.config.pipeline.indication_max_chars).model_text
        t0 = time.perf_counter()
        reports = gen.generate([StudyInput(views=views, indication=indication)],
                               max_tokens=m.max_report_tokens or None)
        latency_ms = (time.perf_counter() - t0) * 1000
        # decoding speed alone: greedy steps of the same study after its encoding (tokens = model tokens)
        _, state = gen._encode([StudyInput(views=views, indication=indication)])
        t0 = time.perf_counter()
        [(ids, _)] = gen._greedy(state, m.max_report_tokens or gen.max_tokens, 0)
        decode_s = time.perf_counter() - t0
    except Exception as exc:
        return [Check("inference", FAIL, f"the sample study did not run: {type(exc).__name__}: {exc}",
                      "check the model bundle and ONNX Runtime rows above; reinstall the bundle if they are OK")]
    text = (reports[0].impression or reports[0].findings).strip().replace("\n", " ")
    providers = list(getattr(gen, "providers", []))
    steps = len(ids) + (len(ids) < (m.max_report_tokens or gen.max_tokens))  # + the step that chose the end
    tps = steps / decode_s if decode_s > 0 else 0.0
    data = {"latency_ms": round(latency_ms, 1), "load_s": round(load_s, 2), "views": len(views),
            "providers": providers, "model": f"{gen.name} {gen.version}", "greedy_tokens": len(ids),
            "tokens_per_s": round(tps, 1)}
    return [Check("inference", OK, f"sample study ({len(views)} view(s)) drafted in {latency_ms:.0f} ms on "
                  f"{', '.join(providers) or '?'} (model load {load_s:.1f} s; greedy decoding {tps:.0f} tokens/s): "
                  f"\"{text[:60]}\"", data=data)]


def _echo(ctx: Context, ae_title: str, host: str, port: int, tls: bool) -> tuple[bool, str, bool]:
    """C-ECHO through ``dicom_node.scu.echo``: (success, message, whether a DICOM peer answered)."""
    from dicom_node import scu
    from dicom_node.config import Destination

    dest = Destination(name=f"{ae_title}@{host}:{port}", ae_title=ae_title, host=host, port=port, tls=tls)
    result = scu.echo(ctx.config, dest, timeout_s=ctx.echo_timeout_s)
    return result.ok, result.message, result.answered


def _probe_host(host: str) -> str:
    return {"": "127.0.0.1", "0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)


def check_port(ctx: Context) -> list[Check]:
    node = ctx.config.node
    if node.port == 0:
        return [Check("listening port", WARN, "node.port = 0: an ephemeral port is chosen at each start",
                      "set a fixed node.port so the PACS can reach the node")]
    # bind first: a bare TCP probe would hold an SCP thread until its ACSE timeout
    family = socket.AF_INET6 if ":" in node.host else socket.AF_INET
    s = socket.socket(family, socket.SOCK_STREAM)
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((node.host or "0.0.0.0", node.port))
        ctx.node_running = False
        return [Check("listening port", OK, f"{node.host}:{node.port} is free to bind (no node listens: see the "
                      "node service row)", data={"running": False})]
    except OSError as exc:
        bind_error = exc
    finally:
        s.close()
    if bind_error.errno != errno.EADDRINUSE:
        hint = ("ports below 1024 need root or CAP_NET_BIND_SERVICE (the unit grants it)" if node.port < 1024
                else "the address is not on this machine: fix node.host")
        return [Check("listening port", FAIL, f"cannot bind {node.host}:{node.port}: {bind_error.strerror or bind_error}",
                      hint)]
    host = _probe_host(node.host)
    try:
        ok, msg, answered = _echo(ctx, node.ae_title, host, node.port, bool(ctx.config.security.tls_certificate))
    except ImportError as exc:
        return [Check("listening port", FAIL, f"port {node.port} is in use; cannot C-ECHO it: {_missing('dicom_node.scu', exc)}",
                      "install a complete cxrnode bundle")]
    ctx.node_running = bool(ok or answered and (ctx.config.security.allowed_calling_ae_titles
                                                 or ctx.config.security.allowed_networks))
    if ok:
        return [Check("listening port", OK, f"the running node answers C-ECHO on {host}:{node.port} as {node.ae_title}",
                      data={"running": True})]
    sec = ctx.config.security
    if answered and (sec.allowed_calling_ae_titles or sec.allowed_networks):
        return [Check("listening port", OK, f"a DICOM node answers on {host}:{node.port} and applies the configured "
                      f"AE/network policy to this check's association ({msg})", data={"running": True})]
    return [Check("listening port", FAIL,
                  f"port {node.port} is in use by something that does not answer C-ECHO as {node.ae_title} ({msg})",
                  f"stop the other program (ss -ltnp 'sport = :{node.port}') or choose another node.port",
                  {"running": False}, code="port.foreign")]



def check_reviewers(ctx: Context) -> list[Check]:
    n = len(ctx.config.reviewers)
    names = [r.username for r in ctx.config.reviewers]
    if n:
        return [Check("reviewers", OK, f"{n} configured ({', '.join(names)})", data={"count": n, "usernames": names})]
    workstation = ctx.role in ("reviewer", "both")
    return [Check("reviewers", FAIL if workstation else WARN,
                  "none configured: nobody can sign" + (" on this workstation" if workstation else " the drafts"),
                  "add a [[reviewers]] table (username, name, organisation) to the config, or re-run the "
                  "installer with --reviewer USERNAME:Family^Given", {"count": 0}, code="reviewers.none")]


def _installed_unit() -> str | None:
    """The systemd unit name of this installation, when the installer registered one."""
    try:
        from installer import layout as lay

        layout = lay.detect_layout(None)
        if not layout.manifest.is_file():
            return None
        manifest = lay.read_manifest(layout)
    except Exception:  # not installed, or an unreadable manifest: the port tells what it can
        return None
    return Path(manifest["unit"]).name if manifest.get("systemd") and manifest.get("unit") else None


def _systemctl_show(unit: str) -> dict[str, str] | None:
    systemctl = shutil.which("systemctl")
    if not systemctl:
        return None
    try:
        out = subprocess.run([systemctl, "show", unit, "-p", "LoadState,ActiveState,SubState,Result,UnitFileState"],
                             capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode != 0:
        return None
    props = dict(line.split("=", 1) for line in out.stdout.splitlines() if "=" in line)
    return props if props.get("LoadState") == "loaded" else None


def check_service(ctx: Context) -> list[Check]:
    """Whether the node runs: the systemd unit's state when the installer registered one, else the
    listening port's C-ECHO."""
    unit = _installed_unit()
    props = _systemctl_show(unit) if unit else None
    if unit and props:
        active, sub, result = props.get("ActiveState", ""), props.get("SubState", ""), props.get("Result", "")
        data = {"unit": unit, "active": active, "sub": sub, "result": result, "enabled": props.get("UnitFileState", "")}
        if active == "active":
            return [Check("node service", OK, f"{unit} is running ({sub})", data=data, code="service.running")]
        if active == "inactive" and result == "success":
            return [Check("node service", WARN, f"{unit} is stopped (stopped on purpose: inactive, last result success; "
                          f"unit file {data['enabled']})", f"start it when wanted: systemctl start {unit}", data,
                          code="service.stopped")]
        return [Check("node service", FAIL, f"{unit} is {active} ({sub}, result {result or '?'})",
                      f"see why: journalctl -u {unit} -n 50; fix it, then systemctl restart {unit}", data,
                      code="service.down")]
    if ctx.node_running:
        return [Check("node service", OK, "a node answers on the listening port", data={"unit": unit},
                      code="service.running")]
    if ctx.node_running is None:
        return [Check("node service", WARN, "cannot tell whether the node runs (see the listening port row)",
                      "set a fixed node.port", {"unit": unit}, code="service.unknown")]
    return [Check("node service", FAIL, f"no node answers on {ctx.config.node.host}:{ctx.config.node.port}",
                  "start it: systemctl start cxrnode (or `cxrnode serve --config ...`); studies sent now are refused",
                  {"unit": unit}, code="node.not_running")]


#: the line the node logs when it loads the model (plugin.drafting.pipeline.generator_for)
PROVIDERS_LOG = "loaded model "


def _installed_flavour() -> str:
    """The bundle flavour of the installed current version ('' when not installed)."""
    try:
        from installer import layout as lay

        layout = lay.detect_layout(None)
        if not layout.manifest.is_file():
            return ""
        manifest = lay.read_manifest(layout)
        return str(manifest["versions"][manifest["current"]].get("flavour", ""))
    except Exception:
        return ""


def _service_log_providers(unit: str) -> str:
    """The newest model-load line of the running service's own log (journald), '' if none."""
    journalctl = shutil.which("journalctl")
    if not journalctl:
        return ""
    try:
        out = subprocess.run([journalctl, "-u", unit, "-o", "cat", "--no-pager", "-n", "20000", "--grep", PROVIDERS_LOG],
                             capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    lines = [ln for ln in out.stdout.splitlines() if PROVIDERS_LOG in ln and "providers" in ln]
    return lines[-1] if lines else ""


def sandbox_gpu_check(unit: str, flavour: str, props: dict[str, str], log_line: str) -> list[Check]:
    """Whether the GPU flavour's service can use the GPU *inside its systemd sandbox* (doctor runs
    outside it, so its own provider check can see a GPU the service cannot). ``props``: the unit's
    ``PrivateDevices``, ``DevicePolicy`` and ``DeviceAllow`` (``systemctl show``); ``log_line``: the
    service's newest model-load line (which providers its session uses)."""
    from installer.unit import uses_gpu

    if not uses_gpu(flavour):
        return []
    data = {"unit": unit, "flavour": flavour, **props, "service_log": log_line}
    if props.get("PrivateDevices") == "yes" or "nvidia" not in props.get("DeviceAllow", ""):
        return [Check("gpu in service", FAIL, f"{unit} hides the NVIDIA devices (PrivateDevices="
                      f"{props.get('PrivateDevices', '?')}, DeviceAllow={props.get('DeviceAllow') or 'none'}): "
                      "the service drafts on the CPU", "re-render the unit: `cxrnode upgrade --bundle` of a GPU bundle "
                      "writes DeviceAllow=char-nvidia-*; remove drop-ins that set PrivateDevices=yes", data,
                      code="service.gpu_hidden")]
    if not log_line:
        return [Check("gpu in service", WARN, f"{unit} allows the NVIDIA devices; the service has not logged a model "
                      "load yet, so the provider it uses is unknown", "send a study, or set node.log_level = \"INFO\"",
                      data, code="service.gpu_unknown")]
    if "CUDAExecutionProvider" in log_line:
        return [Check("gpu in service", OK, f"{unit} uses the GPU ({log_line.split('(providers', 1)[-1].strip(' )')})",
                      data=data, code="service.gpu_used")]
    return [Check("gpu in service", FAIL, f"{unit} runs on the CPU although the GPU flavour is installed: {log_line}",
                  f"see journalctl -u {unit}: CUDA/cuDNN libraries of the bundle, driver, /dev/nvidia* inside the unit",
                  data, code="service.gpu_not_used")]


def check_service_gpu(ctx: Context) -> list[Check]:
    """The GPU inside the service's sandbox (see :func:`sandbox_gpu_check`); only for an installed
    GPU flavour whose unit systemd knows."""
    unit = _installed_unit()
    flavour = _installed_flavour()
    if not unit or not flavour:
        return []
    systemctl = shutil.which("systemctl")
    if not systemctl:
        return []
    try:
        out = subprocess.run([systemctl, "show", unit, "-p", "PrivateDevices,DevicePolicy,DeviceAllow"],
                             capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return []
    props: dict[str, str] = {}
    for line in out.stdout.splitlines():
        key, _, value = line.partition("=")
        props[key] = f"{props[key]} {value}".strip() if key in props else value
    return sandbox_gpu_check(unit, flavour, props, _service_log_providers(unit))


def check_display(ctx: Context) -> list[Check]:
    """Qt's platform plugin loads (in a subprocess: doctor never imports Qt, and Qt aborts the
    process it fails in)."""
    try:
        out = subprocess.run([sys.executable, "-m", "gui.display_probe"], capture_output=True, text=True, timeout=60)
    except subprocess.TimeoutExpired:
        return [Check("display", FAIL, "the Qt probe did not finish in 60 s", "check the display server",
                      code="display.timeout")]
    if out.returncode == 0:
        platform = out.stdout.strip().splitlines()[-1] if out.stdout.strip() else "?"
        return [Check("display", OK, f"Qt's platform plugin loads ({platform})", data={"platform": platform})]
    if out.returncode == 3:
        return [Check("display", FAIL, out.stdout.strip(), "the reviewer needs a desktop session with the libraries "
                      "named above", code="display.missing")]
    tail = [ln for ln in (out.stderr or out.stdout).splitlines() if ln.strip()][-3:]
    return [Check("display", FAIL, f"Qt's platform plugin did not load (exit {out.returncode}): {' | '.join(tail)}",
                  "install the reviewer extra (PyQt6) and the libraries Qt names", code="display.qt_failed")]


def check_destinations(ctx: Context) -> list[Check]:
    dests = ctx.config.destinations
    if not dests:
        return [Check("destinations", WARN, "none configured: signed reports stay on this node",
                      "add a [[destinations]] table for the PACS")]
    out = []
    for d in dests:
        name = f"destination {d.name}"
        try:
            t0 = time.perf_counter()
            ok, msg, _answered = _echo(ctx, d.ae_title, d.host, d.port, d.tls)
            ms = (time.perf_counter() - t0) * 1000
        except ImportError as exc:
            out.append(Check(name, FAIL, _missing("dicom_node.scu", exc), "install a complete cxrnode bundle"))
            continue
        where = f"{d.ae_title}@{d.host}:{d.port}{' (TLS)' if d.tls else ''}"
        if ok:
            out.append(Check(name, OK, f"{where} answers C-ECHO ({ms:.0f} ms)", data={"ms": round(ms, 1)}))
        else:
            out.append(Check(name, FAIL, f"{where}: C-ECHO failed: {msg}",
                             f"check host, port and AE title; the PACS must know us as {ctx.config.node.ae_title}"))
    return out + check_priors_destination(ctx)


def check_priors_destination(ctx: Context) -> list[Check]:
    """``[priors]`` on: C-ECHO the Query/Retrieve destination (WARN when it fails: priors never
    block drafting, the drafts just say the prior could not be retrieved)."""
    pc = getattr(ctx.config, "priors", None)
    if pc is None or not pc.enabled:
        return []
    ae, host, port = pc.parsed_destination()
    ok, msg, _answered = _echo(ctx, ae, host, port, False)
    if ok:
        return [Check("priors Q/R", OK, f"{pc.destination} answers C-ECHO (priors: C-FIND + C-GET)")]
    return [Check("priors Q/R", WARN, f"{pc.destination}: C-ECHO failed: {msg}; drafts are made without priors",
                  f"check [priors] destination; the PACS must allow C-FIND and C-GET from {ctx.config.node.ae_title}")]


def _cert_not_after(path: str) -> dt.datetime:
    info = ssl._ssl._test_decode_cert(path)  # type: ignore[attr-defined]
    return dt.datetime.fromtimestamp(ssl.cert_time_to_seconds(info["notAfter"]), dt.UTC)


def check_tls(ctx: Context) -> list[Check]:
    sec = ctx.config.security
    if not sec.tls_certificate:
        uses = [d.name for d in ctx.config.destinations if d.tls]
        return [Check("tls", OK, "not configured: DICOM without TLS" + (f" (but {uses} want TLS)" if uses else ""))]
    for key in ("tls_certificate", "tls_private_key", "tls_ca"):
        p = getattr(sec, key)
        if p:
            try:
                Path(p).read_bytes()
            except OSError as exc:
                hint = (f"only the service user may read the private key: chown cxrnode {p} && chmod 600 {p}"
                        if key == "tls_private_key" else "the service user must be able to read it (chmod 644)")
                return [Check("tls", FAIL, f"security.{key} {p}: not readable ({exc.strerror or exc})", hint)]
    key_mode = stat.S_IMODE(os.stat(sec.tls_private_key).st_mode)
    if key_mode & 0o077:
        return [Check("tls", FAIL, f"security.tls_private_key {sec.tls_private_key}: mode {key_mode:04o}, "
                      "readable or writable by accounts other than its owner (whoever reads it can impersonate "
                      "this node)", f"chmod 600 {sec.tls_private_key} (owned by the service user: "
                      f"chown cxrnode {sec.tls_private_key})", data={"mode": f"{key_mode:04o}"})]
    try:
        ctx_ssl = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx_ssl.load_cert_chain(sec.tls_certificate, sec.tls_private_key)
        if sec.tls_ca:
            ctx_ssl.load_verify_locations(sec.tls_ca)
        not_after = _cert_not_after(sec.tls_certificate)
    except (ssl.SSLError, OSError, ValueError) as exc:
        return [Check("tls", FAIL, f"certificate/key unusable: {exc}",
                      "check that the key matches the certificate and both are PEM")]
    days = (not_after - dt.datetime.now(dt.UTC)).days
    data = {"not_after": not_after.isoformat(), "days_left": days}
    if days < 0:
        return [Check("tls", FAIL, f"certificate expired on {not_after:%Y-%m-%d}", "renew the certificate", data)]
    if days < TLS_WARN_DAYS:
        return [Check("tls", WARN, f"certificate expires in {days} days ({not_after:%Y-%m-%d})",
                      "renew the certificate soon", data)]
    return [Check("tls", OK, f"certificate and key readable and matching; {days} days to expiry "
                  f"({not_after:%Y-%m-%d})" + ("; mutual TLS with tls_ca" if sec.tls_ca else ""), data=data)]


def check_queue(ctx: Context) -> list[Check]:
    if not ctx.db_ok:
        return [Check("queue", FAIL, "database not reachable or not migrated (see the database row)",
                      "fix the database first")]
    from sqlalchemy import func, select

    from dicom_node.db import Job, JobState, Transfer, TransferState, make_engine, utcnow

    engine = make_engine(ctx.config.node.resolved_database_url())
    try:
        with engine.connect() as conn:
            def count(model: Any, state: str) -> int:
                return int(conn.execute(select(func.count()).select_from(model).where(model.state == state)).scalar_one())

            failed_jobs = count(Job, JobState.FAILED)
            waiting_jobs = count(Job, JobState.PENDING) + count(Job, JobState.RUNNING)
            failed_tx = count(Transfer, TransferState.FAILED)
            waiting_tx = count(Transfer, TransferState.PENDING) + count(Transfer, TransferState.SENDING)
            oldest_tx = conn.execute(select(func.min(Transfer.created_at)).where(
                Transfer.state.in_([TransferState.PENDING, TransferState.SENDING]))).scalar()
            oldest_job = conn.execute(select(func.min(Job.created_at)).where(
                Job.state.in_([JobState.PENDING, JobState.RUNNING]))).scalar()
            erring = conn.execute(select(Job.id, Job.last_error, Job.updated_at).where(
                Job.state.in_([JobState.PENDING, JobState.RUNNING]), Job.last_error.is_not(None),
                Job.last_error != "").order_by(Job.updated_at.desc(), Job.id.desc())).all()
            failed_ids = list(conn.execute(select(Job.id).where(Job.state == JobState.FAILED)
                                           .order_by(Job.id.desc()).limit(20)).scalars())
    finally:
        engine.dispose()
    now = utcnow()
    tx_age = (now - oldest_tx).total_seconds() if oldest_tx else 0.0
    job_age = (now - oldest_job).total_seconds() if oldest_job else 0.0
    data: dict[str, Any] = {"jobs_failed": failed_jobs, "jobs_waiting": waiting_jobs, "oldest_job_s": round(job_age),
            "transfers_failed": failed_tx, "transfers_waiting": waiting_tx, "oldest_transfer_s": round(tx_age)}
    detail = (f"jobs: {failed_jobs} failed, {waiting_jobs} waiting (oldest {_age(job_age)}); "
              f"transfers: {failed_tx} failed, {waiting_tx} waiting (oldest {_age(tx_age)})")
    data["failed_job_ids"] = failed_ids
    data["erring_job_ids"] = [r[0] for r in erring][:20]
    data["last_error"] = erring[0][1] if erring else None
    problems = []
    codes = []
    if erring:
        ids = ", ".join(str(r[0]) for r in erring[:10]) + (" ..." if len(erring) > 10 else "")
        detail += f"; {len(erring)} waiting job(s) carry errors (ids {ids}), last: {erring[0][1]}"
        problems.append("they are being retried: see `cxrnode jobs show ID`; fix the cause named in the error")
        codes.append("queue.job_errors")
    if failed_jobs:
        problems.append(f"failed jobs (ids {', '.join(map(str, failed_ids[:10]))}): `cxrnode jobs --state failed`, "
                        "then `cxrnode jobs retry --failed`")
        codes.append("queue.jobs_failed")
    if failed_tx:
        problems.append("failed transfers: check the destination rows")
        codes.append("queue.transfers_failed")
    if tx_age > TRANSFER_WAIT_WARN_S:
        problems.append("transfers waiting over an hour: is the PACS reachable?")
        codes.append("queue.transfers_stuck")
    if problems:
        data["codes"] = codes
        return [Check("queue", WARN, detail, "; ".join(problems), data, code=codes[0])]
    return [Check("queue", OK, detail, data=data)]


def _age(seconds: float) -> str:
    if not seconds:
        return "-"
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


CHECKS: tuple[Callable[[Context], list[Check]], ...] = (
    check_reviewers, check_storage, check_database, check_model, check_providers, check_inference,
    check_port, check_service, check_service_gpu, check_destinations, check_tls, check_queue, check_display,
)
NODE_ONLY = {check_service, check_service_gpu}
REVIEWER_ONLY = {check_display}


def run_checks(config_path: str | None, overrides: Sequence[str] = (), echo_timeout_s: float = 5.0,
               inference: bool = True, role: str = "node") -> list[Check]:
    """Run every check for ``role``; a check that crashes is a FAIL naming the exception.

    Parameters
    ----------
    config_path:
        The configuration file (``None``: ``$CXRNODE_CONFIG``, else defaults).
    overrides:
        ``--set`` items.
    echo_timeout_s:
        Time limit of each C-ECHO to a destination.
    inference:
        Run the sample study through the model.
    role:
        ``node``, ``reviewer`` or ``both``.

    Returns
    -------
    list[Check]
        The results, in order.

    Raises
    ------
    ValueError
        An unknown ``role``.
    """
    if role not in ROLES:
        raise ValueError(f"role {role!r}: expected one of {ROLES}")
    ctx = Context(config_path or "", list(overrides), echo_timeout_s, inference, role=role)
    results = check_config(ctx)
    if ctx.config is None:
        return results
    for fn in CHECKS:
        if fn in NODE_ONLY and role == "reviewer" or fn in REVIEWER_ONLY and role == "node":
            continue
        try:
            results += fn(ctx)
        except Exception as exc:
            name = fn.__name__.removeprefix("check_").replace("_", " ")
            results.append(Check(name, FAIL, f"the check itself failed: {type(exc).__name__}: {exc}",
                                 "report this with the output of `cxrnode doctor --json`", code=f"{name}.crashed"))
    return results


def format_table(results: Sequence[Check]) -> str:
    width = max(len(c.name) for c in results) + 2
    lines = [f"{'CHECK'.ljust(width)}{'STATUS':<8}DETAIL"]
    for c in results:
        lines.append(f"{c.name.ljust(width)}{c.status:<8}{c.detail}")
        if c.hint and c.status != OK:
            lines.append(f"{'':{width}}{'':8}hint: {c.hint}")
    counts = {s: sum(1 for c in results if c.status == s) for s in (OK, WARN, FAIL)}
    lines.append(f"\n{counts[OK]} OK, {counts[WARN]} WARN, {counts[FAIL]} FAIL")
    return "\n".join(lines)


def as_json(results: Sequence[Check], role: str = "node") -> str:
    counts = {s: sum(1 for c in results if c.status == s) for s in (OK, WARN, FAIL)}
    worst = FAIL if counts[FAIL] else WARN if counts[WARN] else OK
    now = dt.datetime.now(dt.UTC).replace(microsecond=0, tzinfo=None).isoformat() + "Z"
    return json.dumps({"schema": SCHEMA, "generated_at": now, "role": role, "ok": counts[FAIL] == 0,
                       "status": worst, "summary": counts, "checks": [asdict(c) for c in results]}, indent=2)


def main_doctor(config: str | None, overrides: Sequence[str] = (), as_json_output: bool = False,
                echo_timeout_s: float = 5.0, inference: bool = True, role: str = "node") -> int:
    results = run_checks(config, overrides, echo_timeout_s, inference, role=role)
    print(as_json(results, role) if as_json_output else format_table(results), flush=True)
    return 1 if any(c.status == FAIL for c in results) else 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main_doctor(sys.argv[1] if len(sys.argv) > 1 else None))
