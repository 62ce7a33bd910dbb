"""Synthetic two-view chest radiograph studies, for the reviewer's tests, benchmark and screenshot.

Qt-free. :func:`make_study` builds DX images (PS3.3 A.26, Digital X-Ray Image For Presentation):
12 bits stored in 16, MONOCHROME2 (or MONOCHROME1), with a VOI window, ViewPosition PA and
LATERAL, and the request's ReasonForTheRequestedProcedure as the clinical indication.
:func:`store_study` writes them through the node's real :class:`~dicom_node.store.Store` and
:func:`~dicom_node.index.register_instance`, exactly as the Storage SCP would.

Pixels come from the IU X-ray phantom renderings when ``../shared/data/iu_xray`` is present
(upsampled to the asked size) and from a procedural phantom otherwise; neither is a patient.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from pydicom import Dataset
from pydicom.dataset import FileMetaDataset
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, UID, ExplicitVRLittleEndian
from sqlalchemy import select
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session, sessionmaker

from dicom_node import index
from dicom_node.config import Config, load_config
from dicom_node.db import make_engine, migrate, session_factory, utcnow
from dicom_node.store import Store

DX_FOR_PRESENTATION = "1.2.840.10008.5.1.4.1.1.1.1"


def uid_from(*parts: str) -> str:
    """Deterministic UID (``2.25.`` + uuid5 of the parts), as the house rules ask."""
    return "2.25." + str(uuid.uuid5(uuid.NAMESPACE_URL, "cxrnode-synthetic:" + "|".join(parts)).int)


@dataclass(frozen=True)
class SyntheticStudy:
    """What to put in one study."""

    key: str  # makes every UID of the study (deterministic)
    patient_name: str = "Doe^Jane"
    patient_id: str = "P0001"
    patient_birth_date: str = "19610412"
    patient_sex: str = "F"
    accession_number: str = "A0001"
    study_date: str = "20261125"
    study_time: str = "081500"
    indication: str = "Shortness of breath for three days. Rule out pneumonia."
    views: tuple[str, ...] = ("PA", "LATERAL")
    size: int = 1024
    bits_stored: int = 12
    photometric: str = "MONOCHROME2"
    seed: int = 0
    extra: dict[str, str] = field(default_factory=dict)

    @property
    def study_instance_uid(self) -> str:
        return uid_from(self.key, "study")


def shared_data_dir() -> Path | None:
    """``shared/data`` beside the repository (or ``$CXRNODE_SHARED_DATA``), if present."""
    env = os.environ.get("CXRNODE_SHARED_DATA")
    candidates = [Path(env)] if env else []
    here = Path(__file__).resolve().parent.parent
    candidates += [here.parent / "shared" / "data", Path("/work/shared/data")]
    return next((c for c in candidates if (c / "iu_xray" / "studies.jsonl").exists()), None)


def _iu_pair(seed: int) -> dict[str, Path] | None:
    root = shared_data_dir()
    if root is None:
        return None
    iu = root / "iu_xray"
    pairs: list[dict[str, Path]] = []
    with open(iu / "studies.jsonl", encoding="utf-8") as f:
        for line in f:
            d = json.loads(line)
            by = {im["projection"]: iu / im["file"] for im in d["images"]}
            if "Frontal" in by and "Lateral" in by and by["Frontal"].exists() and by["Lateral"].exists():
                pairs.append(by)
            if len(pairs) >= 64:
                break
    return pairs[seed % len(pairs)] if pairs else None


def _resize(img: np.ndarray, size: int) -> np.ndarray:
    """Bilinear resize of a 2-D float image to ``size`` x ``size`` (numpy only)."""
    h, w = img.shape
    ys = np.linspace(0, h - 1, size, dtype=np.float32)
    xs = np.linspace(0, w - 1, size, dtype=np.float32)
    y0 = np.floor(ys).astype(np.int32)
    x0 = np.floor(xs).astype(np.int32)
    y1 = np.minimum(y0 + 1, h - 1)
    x1 = np.minimum(x0 + 1, w - 1)
    fy = (ys - y0)[:, None]
    fx = (xs - x0)[None, :]
    top = img[y0][:, x0] * (1 - fx) + img[y0][:, x1] * fx
    bottom = img[y1][:, x0] * (1 - fx) + img[y1][:, x1] * fx
    return (top * (1 - fy) + bottom * fy).astype(np.float32)


def _procedural(view: str, size: int, rng: np.random.Generator) -> np.ndarray:
    """A simple chest phantom (attenuation in [0, 1], bone bright) when no rendering exists."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / size
    img = np.full((size, size), 0.05, np.float32)
    body = ((x - 0.5) / 0.42) ** 2 + ((y - 0.55) / 0.55) ** 2 < 1
    img[body] = 0.55
    if view in ("LATERAL", "LL"):
        lung = ((x - 0.5) / 0.25) ** 2 + ((y - 0.45) / 0.3) ** 2 < 1
        img[lung] = 0.25
        spine = (np.abs(x - 0.72) < 0.05) & (y > 0.15)
        img[spine] = 0.85
    else:
        for cx in (0.33, 0.67):
            lung = ((x - cx) / 0.14) ** 2 + ((y - 0.45) / 0.3) ** 2 < 1
            img[lung] = 0.22
        heart = ((x - 0.55) / 0.14) ** 2 + ((y - 0.62) / 0.12) ** 2 < 1
        img[heart] = 0.62
        spine = np.abs(x - 0.5) < 0.035
        img[spine & body] = 0.8
        for k in range(9):
            ribs = np.abs(y - (0.22 + 0.06 * k) - 0.08 * (x - 0.5) ** 2 * 4) < 0.008
            img[ribs & body] += 0.12
    img += rng.normal(0, 0.01, img.shape).astype(np.float32)
    return img


def phantom_pixels(view: str, size: int, bits_stored: int, photometric: str, seed: int) -> np.ndarray:
    """Stored pixel values (uint16) of one view."""
    rng = np.random.default_rng(seed)
    pair = _iu_pair(seed)
    img: np.ndarray
    if pair is not None:
        from PIL import Image

        src = pair["Lateral" if view in ("LATERAL", "LL") else "Frontal"]
        with Image.open(src) as im:
            base = np.asarray(im.convert("L"), dtype=np.float32) / 255.0
        img = _resize(base, size)
        img += rng.normal(0, 0.004, img.shape).astype(np.float32)
    else:
        img = _procedural(view, size, rng)
    img = np.clip(img, 0.0, 1.0)
    top = (1 << bits_stored) - 1
    # detector-like range: air is not zero, bone does not saturate
    stored = (0.06 + 0.88 * img) * top
    if photometric == "MONOCHROME1":
        stored = top - stored
    return np.clip(np.rint(stored), 0, top).astype(np.uint16)


def make_study(spec: SyntheticStudy) -> list[Dataset]:
    """The datasets (one per view) of a synthetic study; deterministic for a given ``spec``."""
    study_uid = spec.study_instance_uid
    out = []
    for i, view in enumerate(spec.views, start=1):
        series_uid = uid_from(spec.key, "series", str(i))
        sop_uid = uid_from(spec.key, "image", str(i))
        px = phantom_pixels(view, spec.size, spec.bits_stored, spec.photometric, spec.seed)

        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = UID(DX_FOR_PRESENTATION)
        meta.MediaStorageSOPInstanceUID = UID(sop_uid)
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID = DX_FOR_PRESENTATION
        ds.SOPInstanceUID = sop_uid
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.Modality = "DX"
        ds.PatientName = spec.patient_name
        ds.PatientID = spec.patient_id
        ds.PatientBirthDate = spec.patient_birth_date
        ds.PatientSex = spec.patient_sex
        ds.AccessionNumber = spec.accession_number
        ds.StudyDate = spec.study_date
        ds.StudyTime = spec.study_time
        ds.SeriesDate = spec.study_date
        ds.ContentDate = spec.study_date
        ds.ContentTime = spec.study_time
        ds.StudyID = spec.accession_number[:16]
        ds.ReferringPhysicianName = "Referrer^Rita"
        ds.StudyDescription = "XR CHEST 2 VIEWS"
        ds.SeriesDescription = f"CHEST {view}"
        ds.SeriesNumber = i
        ds.InstanceNumber = 1
        ds.BodyPartExamined = "CHEST"
        ds.ViewPosition = view if view != "LATERAL" else "LL"
        ds.PatientOrientation = ["P", "F"] if view != "LATERAL" else ["A", "F"]
        ds.ImageLaterality = "U"
        ds.PresentationIntentType = "FOR PRESENTATION"
        ds.ImageType = ["ORIGINAL", "PRIMARY"]
        ds.Manufacturer = "cxrnode synthetic"
        ds.ReasonForTheRequestedProcedure = spec.indication
        req = Dataset()
        req.RequestedProcedureID = spec.accession_number[:16]
        req.ReasonForTheRequestedProcedure = spec.indication
        ds.RequestAttributesSequence = [req]
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = spec.photometric
        ds.Rows, ds.Columns = px.shape
        ds.BitsAllocated = 16
        ds.BitsStored = spec.bits_stored
        ds.HighBit = spec.bits_stored - 1
        ds.PixelRepresentation = 0
        ds.PixelSpacing = [round(430.0 / spec.size, 4)] * 2
        ds.ImagerPixelSpacing = ds.PixelSpacing
        ds.RescaleIntercept = 0
        ds.RescaleSlope = 1
        ds.RescaleType = "US"
        top = (1 << spec.bits_stored) - 1
        ds.WindowCenter = round(top * 0.5)
        ds.WindowWidth = round(top * 0.9)
        ds.VOILUTFunction = "LINEAR"
        ds.PixelData = px.tobytes()
        for k, v in spec.extra.items():
            setattr(ds, k, v)
        out.append(ds)
    return out


def store_study(
    sessions: sessionmaker[Session], store: Store, datasets: Sequence[Dataset], calling_ae: str = "MODALITY"
) -> list[str]:
    """Write datasets durably and index them, as the SCP does; returns their store paths."""
    paths = []
    with sessions() as s, s.begin():
        for ds in datasets:
            rel = store.instance_relpath(ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID)
            size, sha = store.write_dataset(ds, rel)
            index.register_instance(s, ds, rel, size, sha, calling_ae)
            paths.append(rel)
    return paths


def today() -> str:
    return dt.date.today().strftime("%Y%m%d")


# -- a whole node directory with drafted studies (tests, benchmark, screenshot) ----------------

REVIEWERS_TOML = """
[[reviewers]]
username = "alice"
display_name = "Moreau^Alice^^Dr"
organisation = "Hôpital Saint-Louis, Radiology"

[[reviewers]]
username = "bob"
display_name = "Okafor^Bob^^Dr"
organisation = "Hôpital Saint-Louis, Radiology"
"""

DESTINATIONS_TOML = """
[[destinations]]
name = "pacs"
ae_title = "PACS"
host = "127.0.0.1"
port = 11999
send = "signed"
"""


def write_config(root: Path, extra_toml: str = "", reviewers_toml: str = REVIEWERS_TOML, beam_size: int = 1) -> Path:
    """A config file for a node whose storage is ``root/storage`` (fsync off: tests only)."""
    root.mkdir(parents=True, exist_ok=True)
    path = root / "cxrnode.toml"
    storage = (root / "storage").resolve()
    path.write_text(
        f'[node]\nstorage_dir = "{storage.as_posix()}"\nfsync = false\nmin_free_space_mb = 0\nport = 0\n'
        f"[jobs]\nworkers = 0\nmax_attempts = 1\nbackoff_s = 0.0\n"
        f"[study]\nquiet_period_s = 0.0\n"
        f"[model]\nbeam_size = {beam_size}\n"
        + extra_toml
        + reviewers_toml
        + DESTINATIONS_TOML,
        encoding="utf-8",
    )
    return path


SAMPLE_PATIENTS = (
    ("Moreau^Claire", "CXR-10001", "ACC10001", "19580302", "F", "Shortness of breath for three days. Rule out pneumonia."),
    ("Lindqvist^Erik", "CXR-10002", "ACC10002", "19720817", "M", "Preoperative evaluation before knee replacement."),
    ("Nakamura^Yui", "CXR-10003", "ACC10003", "19890125", "F", "Cough and fever. Evaluate for consolidation."),
    ("Adeyemi^Tunde", "CXR-10004", "ACC10004", "19450611", "M", "Chest pain after a fall. Rib fracture?"),
    ("Rossi^Giulia", "CXR-10005", "ACC10005", "19661230", "F", "Follow-up of a right pleural effusion."),
    ("Haddad^Samir", "CXR-10006", "ACC10006", "19510904", "M", "Fever and productive cough. Pneumonia?"),
)


def sample_studies(n: int, size: int = 512, photometric: str = "MONOCHROME2", prefix: str = "sample") -> list[SyntheticStudy]:
    """``n`` two-view studies of distinct (fictitious) patients."""
    out = []
    for i in range(n):
        name, pid, acc, dob, sex, indication = SAMPLE_PATIENTS[i % len(SAMPLE_PATIENTS)]
        if i >= len(SAMPLE_PATIENTS):
            pid, acc = f"{pid}-{i}", f"{acc[:10]}{i}"
        out.append(
            SyntheticStudy(
                key=f"{prefix}-{i}",
                patient_name=name,
                patient_id=pid,
                accession_number=acc,
                patient_birth_date=dob,
                patient_sex=sex,
                indication=indication,
                study_date=f"202611{24 - (i % 20):02d}",
                size=size,
                photometric=photometric,
                seed=i,
            )
        )
    return out


@dataclass
class NodeFixture:
    """An opened node directory: config, database sessions and store."""

    root: Path
    config: Config
    sessions: sessionmaker[Session]
    store: Store
    engine: Engine


def open_node(root: Path, database_url: str = "") -> NodeFixture:
    """Open (and migrate) the node whose config is ``root/cxrnode.toml``."""
    overrides = [f'node.database_url="{database_url}"'] if database_url else None
    config = load_config(root / "cxrnode.toml", overrides=overrides, env={})
    url = config.node.resolved_database_url()
    migrate(url)
    engine = make_engine(url)
    store = Store(config.node.storage_dir, fsync=config.node.fsync, min_free_space_mb=config.node.min_free_space_mb)
    return NodeFixture(root=root, config=config, sessions=session_factory(engine), store=store, engine=engine)


def copy_node(src: Path, dst: Path) -> Path:
    """Copy a node directory (SQLite database and store) and point its config at the copy."""
    shutil.copytree(src, dst)
    text = (src / "cxrnode.toml").read_text(encoding="utf-8")
    text = text.replace((src / "storage").resolve().as_posix(), (dst / "storage").resolve().as_posix())
    (dst / "cxrnode.toml").write_text(text, encoding="utf-8")
    return dst


def run_draft_job(node: NodeFixture, study_instance_uid: str, handler: Any = None) -> int:
    """Draft one stored study the way ``cxrnode serve`` does, synchronously; return the draft id.

    Promotes the (quiet) study to a job, claims it and runs ``handler`` (default: the ``draft``
    job handler, :func:`plugin.drafting.pipeline.handle_job`) through :func:`dicom_node.jobs.run_job`.
    """
    from dicom_node import jobs
    from dicom_node.db import Draft, DraftState, Job, Study

    if handler is None:
        from plugin.drafting.pipeline import handle_job

        handler = handle_job
    later = utcnow() + dt.timedelta(seconds=node.config.study.quiet_period_s + 1)
    jobs.promote_quiet_studies(node.sessions, node.config, now=later)
    while (job := jobs.claim_job(node.sessions, node.config, "synthetic", now=later)) is not None:
        jobs.run_job(job, handler, node.config, node.sessions, node.store)
    with node.sessions() as s:
        study = s.scalars(select(Study).where(Study.study_instance_uid == study_instance_uid)).one()
        draft_id = s.scalars(
            select(Draft.id)
            .where(Draft.study_id == study.id, Draft.state != DraftState.SUPERSEDED)
            .order_by(Draft.id.desc())
        ).first()
        if draft_id is None:
            last = s.scalars(select(Job).where(Job.study_id == study.id).order_by(Job.id.desc())).first()
            why = f"job {last.state}: {last.last_error or ''}\n{last.log}" if last else "no job"
            raise RuntimeError(f"the pipeline made no draft for study {study_instance_uid}: {why}")
        return int(draft_id)


def build_node(
    root: Path,
    studies: Sequence[SyntheticStudy],
    database_url: str = "",
    extra_toml: str = "",
    drafter: Callable[[NodeFixture, str], int] | None = None,
) -> NodeFixture:
    """A node directory with ``studies`` stored, indexed and drafted."""
    write_config(root, extra_toml=extra_toml)
    node = open_node(root, database_url)
    draft = drafter or run_draft_job
    for spec in studies:
        store_study(node.sessions, node.store, make_study(spec))
        draft(node, spec.study_instance_uid)
    return node


def set_input_check(
    node: NodeFixture,
    draft_id: int,
    outcome: str,
    reason: str = "",
    failed: dict[str, list[str]] | None = None,
    mode: str = "enforce",
    study_notes: Sequence[str] = (),
) -> dict[str, Any]:
    """Record an input-gate outcome on a stored draft, as ``plugin.drafting.pipeline`` writes it
    (``token_info["input_check"]``, docs/TEAM_CONTRACTS.md), for reviewer tests and screenshots.

    ``failed`` maps a view (``PA``, ``LATERAL``...) to the gate's reasons for it; the other
    views passed. A ``withheld`` outcome also empties the draft's text and tokens, as the
    pipeline does when no view passes. Returns the ``input_check`` object written.
    """
    from dicom_node.db import Draft

    failed = failed or {}
    with node.sessions() as s, s.begin():
        d = s.get(Draft, draft_id)
        if d is None:
            raise ValueError(f"draft {draft_id} does not exist")
        info = json.loads(d.token_info or "{}")
        views = []
        for v in json.loads(d.views or "[]"):
            reasons = failed.get(v.get("view", ""), [])
            score = 41.2 if any("out of distribution" in r for r in reasons) else 6.3
            views.append({"sop_instance_uid": v.get("sop_instance_uid", ""), "view": v.get("view", "UNKNOWN"),
                          "passed": not reasons, "reasons": list(reasons), "ood_score": score, "ood_limit": 18.0})
        check = {"mode": mode, "outcome": outcome, "reason": reason, "views": views, "study": list(study_notes)}
        info["input_check"] = check
        if outcome == "withheld":
            info["tokens"], info["grounded"] = [], []
            d.findings, d.impression = "", ""
        d.token_info = json.dumps(info)
    return check


def real_film_study(spec: SyntheticStudy) -> list[Dataset]:
    """A study of real chest radiographs (the two public samples in ``shared/data/dicom_samples``,
    see its README), relabelled with ``spec``'s fictitious patient, accession, indication and
    deterministic UIDs. The shipped bundle was trained on simulated views only, so its input gate
    withholds the draft of such a study. Empty when the samples are not there."""
    from pydicom import dcmread

    root = shared_data_dir()
    folder = root / "dicom_samples" if root is not None else Path("/nonexistent")
    files = [folder / "siim_chestxray14_pa_jpeg_baseline.dcm", folder / "nih_chestxray_dx_implicit_le.dcm"]
    if not all(f.exists() for f in files):
        return []
    out: list[Dataset] = []
    for i, f in enumerate(files, start=1):
        ds = dcmread(f)
        ds.StudyInstanceUID = spec.study_instance_uid
        ds.SeriesInstanceUID = uid_from(spec.key, "series", str(i))
        ds.SOPInstanceUID = uid_from(spec.key, "image", str(i))
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.PatientName, ds.PatientID = spec.patient_name, spec.patient_id
        ds.PatientBirthDate, ds.PatientSex = spec.patient_birth_date, spec.patient_sex
        ds.AccessionNumber, ds.StudyDate, ds.StudyTime = spec.accession_number, spec.study_date, spec.study_time
        ds.StudyDescription = "XR CHEST 2 VIEWS"
        ds.ReasonForTheRequestedProcedure = spec.indication
        ds.SeriesNumber, ds.InstanceNumber = i, 1
        out.append(ds)
    return out
