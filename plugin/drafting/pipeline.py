"""The ``draft`` job handler: from a complete study in the node's store to a draft SR.

``handle_job(ctx)`` (entry point ``cxrnode.job_handlers: draft``, see dicom_node.jobs):

1. load the study's instances from the index and read their headers from the store;
2. select the chest radiographs (:mod:`plugin.drafting.views`), each skip explained in the job log;
3. prepare their pixels (:mod:`plugin.drafting.pixels`) and extract the indication
   (:mod:`plugin.drafting.indication`);
4. let the bundle's view classifier check the tagged views (it decides when they are missing
   or disagree, and the job log says so);
5. generate the report with ``onnx_models.runtime.ReportGenerator`` (loaded once per process
   and cached per bundle/providers/threads/beam);
6. build the draft SR (:mod:`plugin.drafting.sr`) and commit it with the node's commit service
   (:func:`dicom_node.commit.commit_dataset`): stored durably, then in one transaction: index it (``generated=True``), supersede the study's older unsigned
   drafts, add the Draft row (state ``new``), audit, and enqueue it to the destinations that
   want drafts (``outbound.enqueue(kind="draft")``);
7. optionally (``[pipeline] render_report``) also commit (store, index, enqueue) a rendering of the text.

A study with nothing to read ends ``skipped`` with the reason, and so does a job whose study
generation already has a draft made by another job (checked before the work and again, with the
study row locked, in the commit's transaction: the node never writes two drafts of one version
of a study) or whose job was reclaimed by another worker at a newer generation while this one
ran; any other error raises, which
the job queue counts as a failed attempt (retried with backoff). Nothing is deleted: on error
the SR file written in step 6 is removed only if this job created it.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from sqlalchemy import select, update
from sqlalchemy.orm import Session

from dicom_node import index
from dicom_node.commit import Enqueue, StoredFile, commit_dataset
from dicom_node.config import Config
from dicom_node.db import Draft, DraftState, Instance, Job, Study
from dicom_node.jobs import JobContext, JobResult
from onnx_models.views import order as view_order
from plugin.drafting import indication as indication_mod
from plugin.drafting import input_check as gate_mod
from plugin.drafting import priors as priors_mod
from plugin.drafting import sr as sr_mod
from plugin.drafting.pixels import PixelError, PixelOptions, prepare
from plugin.drafting.views import (
    InstanceHeader,
    ResolvedView,
    resolve_view,
    select_images,
    view_from_tags,
)
from plugin.token_info import InputCheck, TokenInfo, decision_thresholds

log = logging.getLogger(__name__)

ACTOR = "cxrnode-pipeline"

_GENERATORS: dict[tuple[Any, ...], Any] = {}
_GEN_LOCK = threading.Lock()


def generator_for(config: Config) -> Any:
    """The process-wide ReportGenerator for the configured bundle (loaded on first use)."""
    m = config.model
    key = (m.bundle, tuple(m.providers), m.threads, m.beam_size)
    with _GEN_LOCK:
        gen = _GENERATORS.get(key)
        if gen is None:
            from onnx_models.runtime import ReportGenerator

            t0 = time.perf_counter()
            gen = ReportGenerator(m.bundle, providers=m.providers, threads=m.threads, beam_size=m.beam_size)
            _warm_up(gen)
            log.info("loaded model %s %s in %.0f ms (providers %s)", gen.name, gen.version,
                     (time.perf_counter() - t0) * 1000, gen.providers)
            _GENERATORS[key] = gen
        return gen


def _warm_up(gen: Any) -> None:
    """First runs are slow (ONNX Runtime allocations, highdicom's IOD tables, the labeller's
    regular expressions): pay them at load time, not in the first study's latency."""
    from onnx_models.runtime import StudyInput

    blank = np.zeros((gen.image_size, gen.image_size), dtype=np.float32)
    gen.classify_views([blank])
    gen.generate([StudyInput(views=[(blank, "PA")])], beam_size=1, max_tokens=2)
    sr_mod.warm_up()


def _max_views(gen: Any) -> int:
    """How many views the bundle reads (manifest ``input.max_views``); the runtime drops the rest."""
    try:
        return max(1, int(gen.bundle.manifest["input"]["max_views"]))
    except (AttributeError, KeyError, TypeError, ValueError):
        return 1_000_000


@dataclass(frozen=True)
class LoadedInstance:
    header: InstanceHeader
    relpath: str
    dataset: Any  # pydicom Dataset read without pixels


@dataclass(frozen=True)
class DraftOutcome:
    """What one run produced (for tests, the demo and the benchmark)."""

    draft_id: int
    sop_instance_uid: str
    relpath: str
    findings: str
    impression: str
    indication: str
    views: tuple[ResolvedView, ...]
    generation_ms: float
    model_name: str
    model_version: str
    #: ``token_info["input_check"]``: the input gate's outcome (``outcome`` "withheld": no findings)
    input_check: dict[str, Any] = dataclasses.field(default_factory=dict)


def _load_instances(ctx: JobContext) -> tuple[int, list[LoadedInstance], list[str]]:
    problems: list[str] = []
    with ctx.sessions() as s:
        study = s.scalars(select(Study).where(Study.study_instance_uid == ctx.study_instance_uid)).one_or_none()
        if study is None:
            return 0, [], [f"study {ctx.study_instance_uid} is not in the index"]
        rows = s.execute(
            select(Instance.sop_instance_uid, Instance.path, Instance.generated).where(Instance.study_id == study.id)
        ).all()
        study_id = study.id
    loaded: list[LoadedInstance] = []
    for sop_uid, relpath, generated in rows:
        if generated:
            loaded.append(LoadedInstance(InstanceHeader(sop_uid, "", generated=True), relpath, None))
            continue
        try:
            ds = ctx.store.read_dataset(relpath, stop_before_pixels=True)
        except Exception as exc:  # unreadable file: explain and go on with the others
            problems.append(f"skipped {sop_uid}: cannot read {relpath}: {type(exc).__name__}: {exc}")
            continue
        header = dataclasses.replace(
            InstanceHeader.from_dataset(ds),
            # read without pixels: an image module (Rows, Columns) stands for the Pixel Data
            has_pixel_data="Rows" in ds and "Columns" in ds,
        )
        loaded.append(LoadedInstance(header, relpath, ds))
    return study_id, loaded, problems


class _BufferedLog:
    """Collects the job's log lines and appends them in one write when the job ends (each append
    is a database transaction); an exception still flushes them before it propagates."""

    def __init__(self, sink: Callable[[str], None]) -> None:
        self.sink = sink
        self.lines: list[str] = []

    def __call__(self, message: str) -> None:
        self.lines.append(message)

    def flush(self) -> None:
        if self.lines:
            self.sink("\n".join(self.lines))
            self.lines = []


def handle_job(ctx: JobContext) -> JobResult:
    """The ``draft`` job handler (entry point ``cxrnode.job_handlers: draft``; the steps are in
    the module docstring).

    Parameters
    ----------
    ctx:
        The job: configuration, sessions, store, study and generation, job log.

    Returns
    -------
    dicom_node.jobs.JobResult
        ``done`` with the model's name and version, or ``skipped`` with the reason (nothing
        to read).

    Raises
    ------
    Exception
        Any other error: the job queue counts it as a failed attempt (retried with backoff).
    """
    outcome = run(ctx)
    if isinstance(outcome, JobResult):
        return outcome
    return JobResult("done", model_name=outcome.model_name, model_version=outcome.model_version)


def load_model(config: Config) -> None:
    """Load the model when a worker starts, not in the first study's latency."""
    generator_for(config)


handle_job.prepare = load_model  # type: ignore[attr-defined]  # see dicom_node.jobs.JobHandler


def run(ctx: JobContext, generator: Callable[[Config], Any] = generator_for) -> DraftOutcome | JobResult:
    """Do the work of :func:`handle_job`; returns the outcome or a ``skipped`` JobResult."""
    buffered = _BufferedLog(ctx.log)
    try:
        return _run(dataclasses.replace(ctx, log=buffered), generator)
    finally:
        buffered.flush()


class _Laps:
    """The job's timings: ``lap(name)`` records the time since the last mark (or ``restart()``)."""

    def __init__(self) -> None:
        self.start = self.mark = time.perf_counter()
        self.timing: dict[str, float] = {}

    def restart(self) -> None:
        self.mark = time.perf_counter()

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.timing[name] = (now - self.mark) * 1000
        self.mark = now

    def total_ms(self) -> float:
        return (time.perf_counter() - self.start) * 1000


Image = tuple[LoadedInstance, Any, np.ndarray]  # (instance, full dataset, MONOCHROME2 array at native size)


@dataclass
class _Drafting:
    """What the steps of one drafting run share."""

    ctx: JobContext
    study_id: int
    gen: Any
    ind: Any  # plugin.drafting.indication.Indication
    prior_fetch: priors_mod.PriorFetch | None
    laps: _Laps


def _run(ctx: JobContext, generator: Callable[[Config], Any]) -> DraftOutcome | JobResult:
    """The steps of :func:`handle_job` (see the module docstring), each a function below."""
    laps = _Laps()
    cfg = ctx.config
    found = _select(ctx)
    if isinstance(found, JobResult):
        return found
    study_id, loaded, chosen = found
    with ctx.sessions() as s:
        already = drafted_elsewhere(s, study_id, ctx)
    if already:  # before the model's work; checked again when the draft is committed
        ctx.log(already)
        return JobResult("skipped", already)
    # priors (when [priors] enabled) are fetched beside the drafting; they never block it
    prior_fetch = priors_mod.start(ctx, [li.dataset for li in chosen])
    laps.lap("headers")
    gen = generator(cfg)
    images = _decode(ctx, chosen, cfg)
    if not images:
        return JobResult("skipped", "no chest radiograph could be decoded (see the job log)")
    laps.lap("pixels")
    job = _Drafting(ctx, study_id, gen, _indication(ctx, loaded, cfg), prior_fetch, laps)
    images, resolved = _classify(job, images)
    laps.restart()
    decision = _input_check(cfg.pipeline.input_check, gen, images, resolved)
    laps.lap("input check")
    ctx.log(f"input check ({decision.mode}): {decision.outcome}: {decision.reason}")
    for note in (*decision.notes(), *decision.study):
        ctx.log(f"input check: {note}")
    if decision.withheld:
        return _draft_withheld(job, images, resolved, decision)
    images, resolved = _views_read(job, images, resolved, decision)
    report, gen_ms = _generate(job, images, resolved)
    return _draft_generated(job, images, resolved, decision, report, gen_ms)


def _select(ctx: JobContext) -> tuple[int, list[LoadedInstance], list[LoadedInstance]] | JobResult:
    """Load the study's headers and select the chest radiographs (each skip in the job log)."""
    study_id, loaded, problems = _load_instances(ctx)
    for line in problems:
        ctx.log(line)
    if not study_id:
        return JobResult("skipped", problems[0])
    own = sum(1 for li in loaded if li.header.generated)
    selection = select_images(li.header for li in loaded if not li.header.generated)
    if own:
        ctx.log(f"ignored {own} SR(s) written by this node")
    for line in selection.log_lines():
        ctx.log(line)
    if not selection.images:
        reasons = "; ".join(sorted({s.reason for s in selection.skipped})) or "the study has no instances"
        return JobResult("skipped", f"no chest radiograph to read ({reasons})")
    by_uid = {li.header.sop_instance_uid: li for li in loaded}
    return study_id, loaded, [by_uid[h.sop_instance_uid] for h in selection.images]


def _decode(ctx: JobContext, chosen: list[LoadedInstance], cfg: Config) -> list[Image]:
    """Read the chosen images with their pixels and prepare them at native size (the runtime alone
    resizes and normalises: onnx_models.runtime.StudyInput); an unreadable one is skipped, said why."""
    options = PixelOptions(voi_window_index=cfg.pipeline.voi_window_index)
    images: list[Image] = []
    for li in chosen:
        uid = li.header.sop_instance_uid
        try:
            full = ctx.store.read_dataset(li.relpath)
        except Exception as exc:  # truncated or corrupt after the header: skip it, say why
            ctx.log(f"skipped {uid}: cannot read {li.relpath}: {type(exc).__name__}: {exc}")
            continue
        try:
            prepared = prepare(full, options)
        except PixelError as exc:
            ctx.log(f"skipped {uid}: {exc}")
            continue
        ctx.log(f"pixels {uid}: " + "; ".join(prepared.steps))
        images.append((li, full, prepared.array))
    return images


def _indication(ctx: JobContext, loaded: list[LoadedInstance], cfg: Config) -> Any:
    """The clinical indication of the study (plugin.drafting.indication), said in the job log."""
    ind = indication_mod.extract(
        [li.dataset for li in loaded if li.dataset is not None],
        cfg.pipeline.indication_sources,
        cfg.pipeline.indication_max_chars,
    )
    ctx.log(f"indication from {ind.source}: {len(ind.text)} characters" + (" (truncated)" if ind.truncated else "")
            if ind else "no indication in the study")
    return ind


def _classify(job: _Drafting, images: list[Image]) -> tuple[list[Image], list[ResolvedView]]:
    """Let the bundle's view classifier check the tagged views; the images in reading order."""
    job.laps.restart()
    labels = job.gen.classify_views([arr for _, _, arr in images])
    job.laps.lap("classify")
    resolved: list[ResolvedView] = []
    for (li, _, _), label in zip(images, labels, strict=True):
        rv = resolve_view(li.header.sop_instance_uid, view_from_tags(li.header), label)
        job.ctx.log(f"view {rv.sop_instance_uid}: {rv.note}")
        resolved.append(rv)
    order = view_order([rv.view for rv in resolved])
    return [images[i] for i in order], [resolved[i] for i in order]


def _views_read(job: _Drafting, images: list[Image], resolved: list[ResolvedView],
                decision: gate_mod.GateDecision) -> tuple[list[Image], list[ResolvedView]]:
    """The views the gate lets through, at most as many as the model reads (the rest said why)."""
    images = [images[i] for i in decision.use]
    resolved = [resolved[i] for i in decision.use]
    max_views = _max_views(job.gen)
    if len(images) > max_views:
        for rv in resolved[max_views:]:
            job.ctx.log(f"skipped {rv.sop_instance_uid}: the model reads at most {max_views} views "
                        f"({rv.view} not used)")
        images, resolved = images[:max_views], resolved[:max_views]
    return images, resolved


def _generate(job: _Drafting, images: list[Image], resolved: list[ResolvedView]) -> tuple[Any, float]:
    """Generate the report (``GeneratedReport``) and its time in ms; an empty report raises."""
    from onnx_models.runtime import StudyInput

    gen = job.gen
    max_tokens = job.ctx.config.model.max_report_tokens or None
    job.laps.restart()
    t_gen = job.laps.mark
    [report] = gen.generate(
        [StudyInput(views=[(arr, rv.view) for (_, _, arr), rv in zip(images, resolved, strict=True)],
                    indication=job.ind.model_text)],
        max_tokens=max_tokens,
    )
    gen_ms = (time.perf_counter() - t_gen) * 1000
    job.laps.lap("generate")
    job.ctx.log(f"model {gen.name} {gen.version}: views classified in {job.laps.timing['classify']:.0f} ms, "
                f"report generated in {gen_ms:.0f} ms ({len(report.tokens)} tokens, providers {list(gen.providers)})")
    if not report.findings.strip() and not report.impression.strip():
        raise RuntimeError(f"model {gen.name} {gen.version} generated an empty report")
    return report, gen_ms


def _draft_withheld(job: _Drafting, images: list[Image], resolved: list[ResolvedView],
                    decision: gate_mod.GateDecision) -> DraftOutcome | JobResult:
    """The gate withheld the draft: an SR that says so and why, committed like any draft."""
    ctx, gen, ind = job.ctx, job.gen, job.ind
    prior = job.prior_fetch.comparison() if job.prior_fetch is not None else None
    draft_ds = sr_mod.build_draft_sr([full for _, full, _ in images], sr_mod.DraftContent(
        findings="", impression="", indication=ind.text, model_name=gen.name, model_version=gen.version,
        institution_name=str(images[0][1].get("InstitutionName", "") or ""),
        withheld_reason=decision.reason, notes=decision.study, prior=prior.comparison if prior else None,
    ))
    job.laps.lap("sr")
    info = TokenInfo(input_check=InputCheck.from_json(decision.as_json()), prior=prior.info if prior else None)
    outcome = _commit(ctx, job.study_id, draft_ds, ind.text, "", "", info, resolved, gen, 0.0)
    if job.prior_fetch is not None and prior is not None and isinstance(outcome, DraftOutcome):
        job.prior_fetch.link(outcome.draft_id, prior)
    if isinstance(outcome, DraftOutcome):
        ctx.log(f"draft SR {outcome.sop_instance_uid} (withheld) stored in {job.laps.total_ms():.0f} ms")
    return outcome


def _draft_generated(job: _Drafting, images: list[Image], resolved: list[ResolvedView], decision: gate_mod.GateDecision,
                     report: Any, gen_ms: float) -> DraftOutcome | JobResult:
    """Build the draft SR of the generated report, commit it, link its prior, render it if asked."""
    ctx, gen, ind, cfg = job.ctx, job.gen, job.ind, job.ctx.config
    findings = report.findings.strip()
    impression = report.impression.strip()
    observations = sr_mod.coded_observations(f"{findings}\n{impression}")
    prior = job.prior_fetch.comparison() if job.prior_fetch is not None else None  # waited for after the model
    sources = [full for _, full, _ in images]
    draft_ds = sr_mod.build_draft_sr(sources, sr_mod.DraftContent(
        findings=findings, impression=impression, indication=ind.text,
        model_name=gen.name, model_version=gen.version, observations=observations,
        institution_name=str(sources[0].get("InstitutionName", "") or ""),
        notes=(*decision.notes(), *decision.study), prior=prior.comparison if prior else None,
    ))
    job.laps.lap("sr")
    info = TokenInfo(
        tokens=tuple(report.tokens), observations=dict(report.observations),
        grounded=tuple(getattr(report, "grounded", ())), duration_ms=gen_ms,
        thresholds=decision_thresholds(gen.bundle.manifest), input_check=InputCheck.from_json(decision.as_json()),
        prior=prior.info if prior else None,
    )
    outcome = _commit(ctx, job.study_id, draft_ds, ind.text, findings, impression, info, resolved, gen, gen_ms)
    if job.prior_fetch is not None and prior is not None and isinstance(outcome, DraftOutcome):
        job.prior_fetch.link(outcome.draft_id, prior)
    if isinstance(outcome, JobResult):
        return outcome
    job.laps.lap("store+index")
    if cfg.pipeline.render_report != "none":
        _render(ctx, draft_ds, cfg.pipeline.render_report)
        job.laps.lap("render")
    ctx.log(f"draft SR {outcome.sop_instance_uid} stored in {job.laps.total_ms():.0f} ms ("
            + ", ".join(f"{k} {v:.0f} ms" for k, v in job.laps.timing.items()) + ")")
    return outcome


def _input_check(mode: str, gen: Any, images: list[tuple[LoadedInstance, Any, np.ndarray]],
                 resolved: list[ResolvedView]) -> gate_mod.GateDecision:
    """Run the bundle's input gate (unless ``mode`` is off) and the header checks on every view."""
    views = [rv.view for rv in resolved]
    uids = [rv.sop_instance_uid for rv in resolved]
    checks = None if mode == "off" else gen.check_inputs([arr for _, _, arr in images], views)
    header = [[p] if (p := gate_mod.field_of_view_problem(full)) else [] for _, full, _ in images]
    return gate_mod.decide(mode, uids, views, checks, header)


class _AlreadyDrafted(Exception):
    """Raised in the commit's transaction: this job must not write its draft (the reason)."""


def drafted_elsewhere(s: Session, study_id: int, ctx: JobContext) -> str | None:
    """Why this job must not write a draft, or ``None``.

    - Another job already drafted this generation of the study (a draft of it that is not
      superseded: new, in review, signed or rejected): one version of a study gets one draft.
    - This job was reclaimed by another worker at a newer generation while this attempt ran
      (its lease had expired): that worker drafts the newer version.

    Parameters
    ----------
    s:
        An open session (in the commit's transaction, after the study row was locked).
    study_id:
        The study's row id.
    ctx:
        The job (``job_id``, ``study_generation``).

    Returns
    -------
    str | None
        The reason (for the job's ``skipped`` outcome and its log), or ``None``.
    """
    job_generation = s.scalar(select(Job.study_generation).where(Job.id == ctx.job_id))
    if job_generation is not None and job_generation != ctx.study_generation:
        return (f"job {ctx.job_id} was reclaimed at generation {job_generation} while this attempt drafted "
                f"generation {ctx.study_generation}; not drafted")
    other = s.execute(
        select(Draft.sop_instance_uid, Draft.state, Job.id)
        .join(Job, Job.id == Draft.job_id)
        .where(Draft.study_id == study_id, Draft.state != DraftState.SUPERSEDED, Job.id != ctx.job_id,
               Job.study_generation == ctx.study_generation)
        .order_by(Draft.id)
        .limit(1)
    ).first()
    if other is None:
        return None
    uid, state, job_id = other
    return (f"generation {ctx.study_generation} of the study already has draft {uid} ({state}, job {job_id}); "
            "not drafted again")


def _commit(ctx: JobContext, study_id: int, draft_ds: Any, indication: str, findings: str, impression: str,
            info: TokenInfo, resolved: list[ResolvedView], gen: Any, gen_ms: float) -> DraftOutcome | JobResult:
    uid = str(draft_ds.SOPInstanceUID)
    relpath = ctx.store.instance_relpath(str(draft_ds.StudyInstanceUID), str(draft_ds.SeriesInstanceUID), uid)
    with ctx.sessions() as s:
        # again just before the file is written: a same-generation draft has the same UID and
        # file, which a refused commit would have replaced (the check in the transaction stays
        # the one that counts)
        already = drafted_elsewhere(s, study_id, ctx)
        if already:
            ctx.log(already)
            return JobResult("skipped", already)
        existing = s.scalars(select(Draft).where(Draft.sop_instance_uid == uid)).one_or_none()
        if existing is not None and existing.state in (DraftState.SIGNED, DraftState.REJECTED, DraftState.IN_REVIEW):
            # the same images were sent again: the existing draft (and its sign-off) stands
            ctx.log(f"draft {uid} for these images and this model exists ({existing.state}); not redrafted")
            return JobResult("done", f"draft {uid} already exists ({existing.state})",
                             model_name=gen.name, model_version=gen.version)
    token_info = info.to_json()
    views_json = json.dumps([rv.as_json() for rv in resolved])

    def one_draft_per_generation(s: Session) -> None:
        # lock the study row first (a write: PostgreSQL locks the row, SQLite takes its write
        # lock), so two jobs committing at once see each other's draft and only one is written
        s.execute(update(Study).where(Study.id == study_id).values(generation=Study.generation)
                  .execution_options(synchronize_session=False))
        reason = drafted_elsewhere(s, study_id, ctx)
        if reason:
            raise _AlreadyDrafted(reason)

    def draft_rows(s: Session, stored: StoredFile) -> tuple[int, int]:
        superseded = s.execute(
            update(Draft)
            .where(Draft.study_id == study_id, Draft.sop_instance_uid != uid,
                   Draft.state.in_((DraftState.NEW, DraftState.IN_REVIEW)))
            .values(state=DraftState.SUPERSEDED)
            .execution_options(synchronize_session=False)
        )
        n_superseded = int(getattr(superseded, "rowcount", 0) or 0)
        d = s.scalars(select(Draft).where(Draft.sop_instance_uid == uid)).one_or_none()
        if d is None:
            d = Draft(study_id=study_id, sop_instance_uid=uid)
            s.add(d)
        d.job_id = ctx.job_id
        d.state = DraftState.NEW
        d.path = stored.relpath
        d.indication = indication
        d.findings = findings
        d.impression = impression
        d.token_info = token_info
        d.views = views_json
        d.model_name = gen.name[:64]
        d.model_version = gen.version[:32]
        s.flush()
        index.audit(s, ACTOR, "drafted", ctx.study_instance_uid, uid,
                    json.dumps({"job": ctx.job_id, "model": f"{gen.name} {gen.version}",
                                "views": len(resolved), "superseded": n_superseded,
                                "input_check": info.input_check.outcome if info.input_check else ""}))
        return d.id, n_superseded

    try:
        done = commit_dataset(ctx.store, ctx.sessions, draft_ds, relpath, draft_rows,
                              registered_by=ctx.config.node.ae_title, prepare=one_draft_per_generation,
                              enqueue=Enqueue(ctx.config, "draft"))
    except _AlreadyDrafted as exc:  # nothing committed; the file is removed unless it was there before
        ctx.log(str(exc))
        return JobResult("skipped", str(exc))
    assert done.value is not None
    draft_id, n_superseded = done.value
    transfers = done.transfers
    if n_superseded:
        ctx.log(f"superseded {n_superseded} older unsigned draft(s)")
    if transfers:
        ctx.log(f"queued the draft to {transfers} destination(s)")
    return DraftOutcome(draft_id, uid, relpath, findings, impression, indication, tuple(resolved), gen_ms,
                        gen.name, gen.version, info.input_check.to_json() if info.input_check else {})


def _render(ctx: JobContext, draft_ds: Any, kind: str) -> None:
    """Store and enqueue a rendering of the draft for viewers without SR support."""
    from plugin.drafting.render import render

    rendered = render(draft_ds, kind)
    relpath = ctx.store.instance_relpath(str(rendered.StudyInstanceUID), str(rendered.SeriesInstanceUID),
                                         str(rendered.SOPInstanceUID))
    commit_dataset(ctx.store, ctx.sessions, rendered, relpath, registered_by=ctx.config.node.ae_title,
                   enqueue=Enqueue(ctx.config, "draft"))
    ctx.log(f"rendered the draft as {kind.upper()} {rendered.SOPInstanceUID}")
