"""The node's one configuration object.

Loaded once at start, in this order of precedence (highest first):

1. command-line overrides (``--set section.key=value``, value in TOML syntax),
2. environment variables ``CXRNODE_<SECTION>_<KEY>`` (e.g. ``CXRNODE_NODE_PORT=11113``),
3. the TOML file (``--config PATH`` or ``CXRNODE_CONFIG``),
4. the defaults below.

The result is a tree of frozen dataclasses. Unknown keys and values of the wrong type or
range fail at start with :class:`ConfigError`, naming the key and what was expected.
The README's configuration reference is generated from the same field metadata
(:func:`reference_markdown`), so it cannot drift from the code.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import re
import socket
import tomllib
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ENV_PREFIX = "CXRNODE_"
AE_TITLE_RE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")  # PS3.5 AE VR: no backslash
HOST_ID_RE = re.compile(r"[A-Za-z0-9._-]{1,64}")  # a folder name on every filesystem


def resolve_host_id(host_id: str = "") -> str:
    """``host_id``, else this machine's host name (its first label), checked as a folder name
    (``node.host_id``: a host's spool folder is ``storage_dir/tmp/<host id>``)."""
    hid = host_id or socket.gethostname().split(".")[0]
    if not HOST_ID_RE.fullmatch(hid) or hid in {".", ".."}:
        raise ConfigError(f"node.host_id: expected 1-64 of A-Z a-z 0-9 . _ -, got {hid!r}"
                          + ("" if host_id else " (the host name; set node.host_id)"))
    return hid


class ConfigError(ValueError):
    """A configuration value is missing, unknown or invalid; the message names the key."""


def _doc(text: str, default: Any = dataclasses.MISSING, factory: Any = dataclasses.MISSING) -> Any:
    if factory is not dataclasses.MISSING:
        return field(default_factory=factory, metadata={"doc": text})
    return field(default=default, metadata={"doc": text})


@dataclass(frozen=True)
class NodeConfig:
    ae_title: str = _doc("Our AE title (PS3.8: up to 16 characters, no backslash).", "CXRNODE")
    host: str = _doc("Address the Storage SCP listens on.", "0.0.0.0")
    port: int = _doc("TCP port of the Storage SCP (DICOM registered port is 104; 11112 is the usual unprivileged one).", 11112)
    storage_dir: str = _doc("Folder where received instances and generated SRs live.", "/var/lib/cxrnode")
    database_url: str = _doc(
        "SQLAlchemy URL of the index. Empty: SQLite file `cxrnode.db` in storage_dir. "
        "PostgreSQL: `postgresql+psycopg://user:pass@host/db`.",
        "",
    )
    max_associations: int = _doc("Maximum concurrent associations.", 16)
    max_pending_associations: int = _doc(
        "Connections still negotiating (TCP/TLS open, A-ASSOCIATE-RQ not yet answered) allowed at once; "
        "they do not count against max_associations. Past this the oldest one that has not yet sent a "
        "whole PDU is closed (from the address holding the most); each is closed after acse_timeout_s "
        "in any case.", 8
    )
    max_inflated_mb: int = _doc(
        "Refuse (0xA700) a Deflated Explicit VR Little Endian data set that inflates beyond this many MB "
        "(checked while streaming, before it is parsed).", 256
    )
    min_free_space_mb: int = _doc("Refuse new instances (0xA700) when free space in storage_dir falls below this.", 500)
    fsync: bool = _doc("fsync every received file and its folder before answering success. Turn off only for tests.", True)
    acse_timeout_s: float = _doc(
        "Association negotiation timeout: a connection that has not completed its A-ASSOCIATE "
        "(TLS handshake included) this long after it was accepted is closed.", 30.0
    )
    dimse_timeout_s: float = _doc("DIMSE message timeout.", 60.0)
    network_timeout_s: float = _doc(
        "Idle network timeout of an association; also the longest an accepted association may "
        "take to deliver one PDU once it has started.", 120.0
    )
    log_level: str = _doc("Logging level: DEBUG, INFO, WARNING, ERROR.", "INFO")
    host_id: str = _doc(
        "This host's name among hosts sharing storage_dir: its spool folder is `storage_dir/tmp/<host_id>` and "
        "it cleans only that one at start. Empty: the machine's host name. 1-64 of `A-Z a-z 0-9 . _ -`.", ""
    )
    health_port: int = _doc(
        "TCP port of the HTTP health and metrics server of `serve` and `worker` (`/healthz`, `/metrics` in "
        "Prometheus text); also `--health-port N`. 0: off.", 0
    )
    health_host: str = _doc(
        "Address the health and metrics server listens on: this machine only by default; `0.0.0.0` in a "
        "container, so the orchestrator's probes and Prometheus reach it.", "127.0.0.1"
    )

    def resolved_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite:///{Path(self.storage_dir).resolve() / 'cxrnode.db'}"

    def resolved_host_id(self) -> str:
        """``host_id``, else the machine's host name (first label); validated either way."""
        return resolve_host_id(self.host_id)


@dataclass(frozen=True)
class SecurityConfig:
    allowed_calling_ae_titles: tuple[str, ...] = _doc("Calling AE titles allowed to associate; empty = any.", factory=tuple)
    allowed_networks: tuple[str, ...] = _doc('Peer networks allowed to associate, e.g. ["10.0.0.0/8"]; empty = any.', factory=tuple)
    tls_certificate: str = _doc("PEM certificate; with tls_private_key turns on TLS for the SCP and the SCU.", "")
    tls_private_key: str = _doc("PEM private key of tls_certificate.", "")
    tls_ca: str = _doc("PEM CA bundle; when set, peers must present a certificate it signed (mutual TLS).", "")


@dataclass(frozen=True)
class StudyConfig:
    quiet_period_s: float = _doc("A study is complete when no new instance arrived for this long.", 10.0)


@dataclass(frozen=True)
class JobsConfig:
    workers: int = _doc("Report-drafting worker threads inside `cxrnode serve` (0 = none; run workers elsewhere).", 1)
    lease_s: float = _doc("A claimed job whose worker stops renewing it for this long is reclaimed.", 300.0)
    max_attempts: int = _doc("A job that failed this many times ends as `failed`.", 3)
    backoff_s: float = _doc("First retry delay; doubles at each attempt.", 30.0)
    poll_interval_s: float = _doc("How often workers look for quiet studies and claimable jobs.", 1.0)


@dataclass(frozen=True)
class ModelConfig:
    bundle: str = _doc("Name of a shipped model bundle or path to a bundle folder.", "default")
    providers: tuple[str, ...] = _doc(
        'ONNX Runtime execution providers in order of preference; empty = CUDA if available, else CPU.', factory=tuple
    )
    threads: int = _doc(
        "Intra-op threads for ONNX Runtime; 0 = its default (one per core). The shipped model is "
        "small and fastest with 1 (31 ms vs 76 ms per 2-view study with 2 threads on 2 cores).", 1
    )
    beam_size: int = _doc("Beam width for decoding (1 = greedy).", 3)
    max_report_tokens: int = _doc("Hard cap on generated tokens; 0 = the bundle's default.", 0)


@dataclass(frozen=True)
class PipelineConfig:
    """The ``[pipeline]`` section: how a study becomes the model's input and what the draft job sends.

    Attributes
    ----------
    indication_sources, indication_max_chars, voi_window_index, render_report, input_check:
        See each field's help (its metadata; the README's configuration reference lists them).
    """
    indication_sources: tuple[str, ...] = _doc(
        "DICOM attributes searched for the clinical indication, in order.",
        (
            "ReasonForTheRequestedProcedure",
            "ReasonForRequestedProcedureCodeSequence",
            "ReasonForStudy",
            "AdditionalPatientHistory",
            "AdmittingDiagnosesDescription",
            "RequestedProcedureDescription",
        ),
    )
    indication_max_chars: int = _doc("The indication is cut to this many characters.", 300)
    voi_window_index: int = _doc("Which VOI window to apply when an image has several (0 = first).", 0)
    render_report: str = _doc('Also send a rendering of the report for viewers without SR: "none", "pdf" or "sc".', "none")
    input_check: str = _doc(
        'The model\'s input gate: "enforce" drafts only from views like the training images and withholds '
        'the draft (saying why) when none is; "warn" drafts from every view and marks the draft; "off" '
        "skips the check.", "enforce")


@dataclass(frozen=True)
class OutboundConfig:
    max_attempts: int = _doc("A transfer that failed this many times ends as `failed`.", 10)
    backoff_s: float = _doc("First retry delay; doubles at each attempt, capped at one hour.", 5.0)


@dataclass(frozen=True)
class ReviewConfig:
    claim_timeout_s: float = _doc("A reviewer's claim on a draft expires after this long without activity.", 900.0)
    refresh_s: float = _doc("The reviewer's worklist refreshes this often (0 = only on demand).", 15.0)
    undo_window_s: float = _doc("After signing, the verified SR waits this long (unless the reviewer sends it at "
                                "once) before it is queued out; until then the signature can be undone (0 = no undo).",
                                10.0)


@dataclass(frozen=True)
class PriorsConfig:
    enabled: bool = _doc(
        "Fetch the same patient's most recent prior chest radiograph study and its report from the PACS when a "
        "study is drafted (C-FIND study + series level, then C-GET on the same association), for the reviewer "
        "to compare. Priors never block drafting: a PACS that does not answer is logged and the draft goes on.",
        False)
    destination: str = _doc('The Query/Retrieve SCP (Study Root, C-FIND + C-GET) as `AE@host:port`, '
                            'e.g. `"PACS@10.1.2.3:104"`. Required when enabled.', "")
    max_priors: int = _doc("How many of the most recent prior studies to fetch (the reviewer shows the most recent).", 1)
    modalities: tuple[str, ...] = _doc("Series modalities that make a study a prior chest radiograph.", ("CR", "DX"))
    retention_days: float = _doc(
        "Fetched priors older than this are deleted (files and rows) unless an open draft still compares with "
        "them. The prune runs in `cxrnode serve` every prune_interval_s.", 30.0)
    prune_interval_s: float = _doc("How often `cxrnode serve` prunes expired priors.", 3600.0)
    timeout_s: float = _doc(
        "Connection, association (ACSE), DIMSE and network timeout of each Query/Retrieve call, seconds.", 10.0)
    max_instances: int = _doc("At most this many instances are retrieved per prior study (images and reports).", 20)

    def parsed_destination(self) -> tuple[str, str, int]:
        """``destination`` as ``(ae_title, host, port)``; :class:`ConfigError` if malformed."""
        m = re.fullmatch(r"(?P<ae>[^@]{1,16})@(?P<host>\[[0-9A-Fa-f:.]+\]|[^@:\s]+):(?P<port>[0-9]{1,5})",
                         self.destination.strip())
        if m is None:
            raise ConfigError(f"priors.destination: expected AE@host:port (e.g. PACS@10.1.2.3:104), "
                              f"got {self.destination!r}")
        return m["ae"], m["host"].strip("[]"), int(m["port"])


#: the roles a ``[[reviewers]]`` entry may have (``roles = ["templates"]``)
REVIEWER_ROLES = ("templates",)


@dataclass(frozen=True)
class Reviewer:
    """One ``[[reviewers]]`` table: who may sign, and the names written into the verified SR.

    Attributes
    ----------
    username:
        OS account (or database role) of the reviewer.
    display_name:
        Verifying Observer Name (PN, e.g. ``Doe^Jane``).
    organisation:
        Verifying Organization.
    roles:
        Extra rights besides signing (``"templates"``); only from the installed configuration.
    """
    username: str = _doc("OS account (or database role) of the reviewer.", "")
    display_name: str = _doc("Name written as Verifying Observer Name (PN, e.g. `Doe^Jane`).", "")
    organisation: str = _doc("Verifying Organization.", "")
    roles: tuple[str, ...] = _doc(
        'Extra rights besides signing: `"templates"` lets this reviewer add, change and remove the site\'s '
        "report templates (`cxrnode templates`). Only from the installed (root-owned) configuration.", ())


@dataclass(frozen=True)
class Destination:
    """One ``[[destinations]]`` table: a C-STORE peer that receives SRs.

    Attributes
    ----------
    name:
        Short name used in logs and status.
    ae_title, host, port:
        The peer's called AE title and address.
    send:
        ``"signed"`` (verified SRs only) or ``"drafts_and_signed"``.
    tls:
        Use TLS (needs ``[security] tls_certificate``/``tls_private_key``).
    """
    name: str = _doc("Short name used in logs and status.", "")
    ae_title: str = _doc("Called AE title of the destination.", "")
    host: str = _doc("Host name or address.", "")
    port: int = _doc("TCP port.", 104)
    send: str = _doc('"signed" (verified SRs only) or "drafts_and_signed".', "signed")
    tls: bool = _doc("Use TLS (needs [security] tls_certificate/tls_private_key).", False)


@dataclass(frozen=True)
class Config:
    """The node's configuration: one frozen object per process, from :func:`load_config`.

    Attributes
    ----------
    node, security, study, jobs, model, pipeline, outbound, review, priors:
        The TOML sections of the same names (each field's help is in its metadata, listed by
        :func:`reference_markdown`, the README's configuration reference).
    reviewers:
        The ``[[reviewers]]`` tables (:class:`Reviewer`).
    destinations:
        The ``[[destinations]]`` tables (:class:`Destination`).
    source:
        Where the file came from (``""``: defaults only); informational.
    """
    node: NodeConfig = field(default_factory=NodeConfig)
    security: SecurityConfig = field(default_factory=SecurityConfig)
    study: StudyConfig = field(default_factory=StudyConfig)
    jobs: JobsConfig = field(default_factory=JobsConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)
    outbound: OutboundConfig = field(default_factory=OutboundConfig)
    review: ReviewConfig = field(default_factory=ReviewConfig)
    priors: PriorsConfig = field(default_factory=PriorsConfig)
    reviewers: tuple[Reviewer, ...] = field(default_factory=tuple)
    destinations: tuple[Destination, ...] = field(default_factory=tuple)
    source: str = ""  # where the file came from ("" = defaults only); informational

    @property
    def storage_path(self) -> Path:
        return Path(self.node.storage_dir)

    def reviewer(self, username: str) -> Reviewer | None:
        return next((r for r in self.reviewers if r.username == username), None)


SECTIONS: dict[str, type] = {
    "node": NodeConfig,
    "security": SecurityConfig,
    "study": StudyConfig,
    "jobs": JobsConfig,
    "model": ModelConfig,
    "pipeline": PipelineConfig,
    "outbound": OutboundConfig,
    "review": ReviewConfig,
    "priors": PriorsConfig,
}
TABLE_ARRAYS: dict[str, type] = {"destinations": Destination, "reviewers": Reviewer}


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is tuple:
        return f"list of {typing.get_args(tp)[0].__name__}"
    return getattr(tp, "__name__", str(tp))


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Check one value against a field's type; return it in the field's type."""
    origin = typing.get_origin(tp)
    if origin is tuple:
        (item_tp, _) = typing.get_args(tp)
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{key}: expected a list of {item_tp.__name__}, got {value!r}")
        return tuple(_coerce(f"{key}[{i}]", v, item_tp) for i, v in enumerate(value))
    if isinstance(tp, types.UnionType):  # pragma: no cover - not used yet
        raise ConfigError(f"{key}: unsupported type")
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")


def _build(cls: type, prefix: str, values: Mapping[str, Any]) -> Any:
    if not isinstance(values, Mapping):
        raise ConfigError(f"{prefix}: expected a table, got {values!r}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"{prefix}.{unknown[0]}: unknown key (known: {', '.join(sorted(known))})")
    kwargs = {k: _coerce(f"{prefix}.{k}", v, hints[k]) for k, v in values.items()}
    return cls(**kwargs)


def _parse_scalar(text: str) -> Any:
    """Parse an override value as TOML; bare words are strings."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def _env_overrides(env: Mapping[str, str]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for name, raw in env.items():
        if not name.startswith(ENV_PREFIX) or name == "CXRNODE_CONFIG":
            continue
        rest = name[len(ENV_PREFIX):].lower()
        section, _, key = rest.partition("_")
        if section not in SECTIONS:
            continue  # other CXRNODE_* variables (e.g. test settings) are not config
        out.setdefault(section, {})[key] = _parse_scalar(raw)
    return out


def parse_overrides(items: list[str]) -> dict[str, dict[str, Any]]:
    """``section.key=value`` items (``--set``) as ``{section: {key: value}}``; the value is read as
    TOML (``5``, ``true``, ``"text"``, ``["a", "b"]``), a bare word is a string. The one parser of
    ``--set`` (the node's commands and the installer alike).

    Parameters
    ----------
    items:
        The ``--set`` arguments, in order (a later one wins).

    Returns
    -------
    dict[str, dict[str, Any]]
        The values by section and key.

    Raises
    ------
    ConfigError
        An item without ``=`` or without ``section.``.
    """
    out: dict[str, dict[str, Any]] = {}
    for item in items:
        dotted, sep, raw = item.partition("=")
        section, dot, key = dotted.strip().partition(".")
        if not sep or not dot or not key:
            raise ConfigError(f"--set {item!r}: expected section.key=value")
        out.setdefault(section, {})[key] = _parse_scalar(raw.strip())
    return out


def load_config(
    path: str | os.PathLike[str] | None = None,
    overrides: list[str] | None = None,
    env: Mapping[str, str] | None = None,
) -> Config:
    """Load and validate the one frozen configuration: CLI ``overrides`` > environment
    (``CXRNODE_<SECTION>_<KEY>``) > the TOML file > defaults.

    Parameters
    ----------
    path:
        The TOML file; ``None``: ``$CXRNODE_CONFIG`` if set, else defaults only.
    overrides:
        ``section.key=value`` items (``--set``), read by :func:`parse_overrides`.
    env:
        The environment to read (``None``: :data:`os.environ`).

    Returns
    -------
    Config
        The validated configuration.

    Raises
    ------
    ConfigError
        The file is missing or not TOML, a section or key is unknown, or a value is wrong (the
        message names the key and what was expected).
    """
    env = os.environ if env is None else env
    path = path or env.get("CXRNODE_CONFIG") or None
    data: dict[str, Any] = {}
    if path:
        p = Path(path)
        try:
            data = tomllib.loads(p.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"config file {p}: not found") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {p}: not valid TOML: {exc}") from None
    for layer in (_env_overrides(env), parse_overrides(overrides or [])):
        for section, values in layer.items():
            if section in TABLE_ARRAYS:
                raise ConfigError(f"{section}: set it in the config file, not as an override")
            data.setdefault(section, {})
            if not isinstance(data[section], dict):
                raise ConfigError(f"{section}: expected a table")
            data[section].update(values)

    unknown = sorted(set(data) - set(SECTIONS) - set(TABLE_ARRAYS))
    if unknown:
        known = ", ".join(sorted([*SECTIONS, *TABLE_ARRAYS]))
        raise ConfigError(f"{unknown[0]}: unknown section (known: {known})")
    kwargs: dict[str, Any] = {name: _build(cls, name, data.get(name, {})) for name, cls in SECTIONS.items()}
    for name, cls in TABLE_ARRAYS.items():
        items = data.get(name, [])
        if not isinstance(items, list):
            raise ConfigError(f"{name}: expected an array of tables ([[{name}]])")
        kwargs[name] = tuple(_build(cls, f"{name}[{i}]", item) for i, item in enumerate(items))
    config = Config(**kwargs, source=str(path or ""))
    validate(config)
    return config


def _check_ae(key: str, value: str) -> None:
    if not AE_TITLE_RE.match(value) or not value.strip():
        raise ConfigError(f"{key}: expected an AE title of 1-16 characters without backslash, got {value!r}")


def _check_range(key: str, value: float, lo: float, hi: float | None = None) -> None:
    if value < lo or (hi is not None and value > hi):
        bound = f"between {lo} and {hi}" if hi is not None else f"at least {lo}"
        raise ConfigError(f"{key}: expected a number {bound}, got {value!r}")


def _check_ranges(c: Config, *rules: tuple[str, float, float | None]) -> None:
    """:func:`_check_range` for each ``(section.key, lo, hi)``, on the value the key names in ``c``."""
    for key, lo, hi in rules:
        section, name = key.split(".")
        _check_range(key, getattr(getattr(c, section), name), lo, hi)


def validate(c: Config) -> None:
    """Range and cross-field checks that types alone cannot express."""
    _check_ae("node.ae_title", c.node.ae_title)
    _check_range("node.port", c.node.port, 0, 65535)
    _check_range("node.health_port", c.node.health_port, 0, 65535)
    if not c.node.health_host:
        raise ConfigError("node.health_host: expected an address to listen on, e.g. 127.0.0.1 or 0.0.0.0, got ''")
    _check_range("node.max_associations", c.node.max_associations, 1, 1000)
    _check_range("node.max_pending_associations", c.node.max_pending_associations, 1, 1000)
    _check_range("node.max_inflated_mb", c.node.max_inflated_mb, 1, 65536)
    _check_range("node.min_free_space_mb", c.node.min_free_space_mb, 0)
    for k in ("acse_timeout_s", "dimse_timeout_s", "network_timeout_s"):
        _check_range(f"node.{k}", getattr(c.node, k), 0.1)
    if c.node.log_level.upper() not in {"DEBUG", "INFO", "WARNING", "ERROR"}:
        raise ConfigError(f"node.log_level: expected DEBUG, INFO, WARNING or ERROR, got {c.node.log_level!r}")
    if not c.node.storage_dir:
        raise ConfigError("node.storage_dir: expected a folder path, got ''")
    if c.node.host_id:
        resolve_host_id(c.node.host_id)
    for i, ae in enumerate(c.security.allowed_calling_ae_titles):
        _check_ae(f"security.allowed_calling_ae_titles[{i}]", ae)
    for i, net in enumerate(c.security.allowed_networks):
        try:
            ipaddress.ip_network(net, strict=False)
        except ValueError:
            raise ConfigError(f"security.allowed_networks[{i}]: expected a network like 10.0.0.0/8, got {net!r}") from None
    if bool(c.security.tls_certificate) != bool(c.security.tls_private_key):
        raise ConfigError("security.tls_certificate: tls_certificate and tls_private_key must be set together")
    if c.security.tls_ca and not c.security.tls_certificate:
        raise ConfigError("security.tls_ca: mutual TLS needs tls_certificate and tls_private_key too")
    _check_ranges(c, ("study.quiet_period_s", 0, None), ("jobs.workers", 0, 64), ("jobs.lease_s", 1, None),
                  ("jobs.max_attempts", 1, None), ("jobs.backoff_s", 0, None), ("jobs.poll_interval_s", 0.01, None),
                  ("model.threads", 0, 256), ("model.beam_size", 1, 16), ("model.max_report_tokens", 0, 4096))
    for i, p in enumerate(c.model.providers):
        if not p.endswith("ExecutionProvider"):
            raise ConfigError(f"model.providers[{i}]: expected an ONNX Runtime provider name like CPUExecutionProvider, got {p!r}")
    try:
        from pydicom.datadict import tag_for_keyword
    except ImportError:  # install.sh validates with the standard library only; the node checks at start
        tag_for_keyword = None  # type: ignore[assignment]
    for i, name in enumerate(c.pipeline.indication_sources):
        if tag_for_keyword is not None and tag_for_keyword(name) is None:
            raise ConfigError(f"pipeline.indication_sources[{i}]: expected a DICOM attribute keyword, got {name!r}")
    _check_ranges(c, ("pipeline.indication_max_chars", 1, None), ("pipeline.voi_window_index", 0, None))
    if c.pipeline.input_check not in {"enforce", "warn", "off"}:
        raise ConfigError(f'pipeline.input_check: expected "enforce", "warn" or "off", got {c.pipeline.input_check!r}')
    if c.pipeline.render_report not in {"none", "pdf", "sc"}:
        raise ConfigError(f'pipeline.render_report: expected "none", "pdf" or "sc", got {c.pipeline.render_report!r}')
    _check_ranges(c, ("outbound.max_attempts", 1, None), ("outbound.backoff_s", 0, None),
                  ("review.claim_timeout_s", 1, None), ("review.refresh_s", 0, None),
                  ("review.undo_window_s", 0, 300), ("priors.max_priors", 1, 10), ("priors.retention_days", 0, None),
                  ("priors.prune_interval_s", 1, None), ("priors.timeout_s", 0.1, 600),
                  ("priors.max_instances", 1, 1000))
    for i, mod in enumerate(c.priors.modalities):
        if not re.fullmatch(r"[A-Z0-9_]{1,16}", mod):
            raise ConfigError(f"priors.modalities[{i}]: expected a DICOM modality like CR or DX, got {mod!r}")
    if c.priors.enabled or c.priors.destination:
        ae, _, port = c.priors.parsed_destination()
        _check_ae("priors.destination", ae)
        _check_range("priors.destination (port)", port, 1, 65535)
    names: set[str] = set()
    for i, d in enumerate(c.destinations):
        key = f"destinations[{i}]"
        if not d.name:
            raise ConfigError(f"{key}.name: expected a non-empty name")
        if d.name in names:
            raise ConfigError(f"{key}.name: duplicate destination name {d.name!r}")
        names.add(d.name)
        _check_ae(f"{key}.ae_title", d.ae_title)
        if not d.host:
            raise ConfigError(f"{key}.host: expected a host name or address")
        _check_range(f"{key}.port", d.port, 1, 65535)
        if d.send not in {"signed", "drafts_and_signed"}:
            raise ConfigError(f'{key}.send: expected "signed" or "drafts_and_signed", got {d.send!r}')
        if d.tls and not c.security.tls_certificate:
            raise ConfigError(f"{key}.tls: needs security.tls_certificate and tls_private_key")
    for i, r in enumerate(c.reviewers):
        if not r.username or not r.display_name:
            raise ConfigError(f"reviewers[{i}]: username and display_name are required")
        for j, role in enumerate(r.roles):
            if role not in REVIEWER_ROLES:
                raise ConfigError(f"reviewers[{i}].roles[{j}]: expected one of {', '.join(REVIEWER_ROLES)}, got {role!r}")


def reference_markdown() -> str:
    """The configuration reference as a Markdown table (used in the README)."""
    rows = ["| key | type | default | meaning |", "|---|---|---|---|"]
    for section, cls in [*SECTIONS.items(), *TABLE_ARRAYS.items()]:
        hints = typing.get_type_hints(cls)
        prefix = f"[[{section}]]" if section in TABLE_ARRAYS else f"[{section}]"
        for f in dataclasses.fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc,operator]
            shown = list(default) if isinstance(default, tuple) else default
            shown_text = str(shown).replace("'", '"') if not isinstance(shown, str) else f'"{shown}"'
            rows.append(f"| `{prefix} {f.name}` | {_type_name(hints[f.name])} | `{shown_text}` | {f.metadata.get('doc', '')} |")
    return "\n".join(rows)
