"""Datasets of chest X-ray studies for training and evaluation (no torch here).

Two layouts are read by :func:`load_studies`:

1. The cxrnode layout (``../shared/data/iu_xray``): ``studies.jsonl`` (one study per line with
   ``study_id, split, indication, comparison, findings, impression, mesh_major, images``; each
   image ``{image_id, file, view_position, projection}``) and ``images/<image_id>.jpg``.
2. The public Kaggle/Open-i layout of the same collection: ``indiana_reports.csv`` (``uid,
   MeSH, Problems, image, indication, comparison, findings, impression``),
   ``indiana_projections.csv`` (``uid, filename, projection``) and ``images_normalized/``.
   It has no split; a study goes to ``val`` when the first byte of ``sha256(uid)`` is below
   26 (about 10 %), otherwise to ``train`` (stable across machines and versions).
"""

from __future__ import annotations

import csv
import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .views import VIEWS, projection, view_from_position

__all__ = ["VIEWS", "ImageRef", "Study", "is_tune", "load_studies", "read_image", "to_unit_range"]


@dataclass(frozen=True)
class ImageRef:
    image_id: str
    path: Path
    view_position: str  # the DICOM ViewPosition tag as it was (may lie or be empty)
    projection: str  # "Frontal" | "Lateral" | "" (curated truth)

    @property
    def view(self) -> str:
        """The view used for the model: the tag when it agrees with the curated projection,
        otherwise the projection's default view (PA / LATERAL); UNKNOWN when neither is known."""
        tag = view_from_position(self.view_position)
        proj = self.projection.strip().lower()
        if proj == "frontal":
            return tag if projection(tag) == "FRONTAL" else "PA"
        if proj == "lateral":
            return tag if projection(tag) == "LATERAL" else "LATERAL"
        return tag or "UNKNOWN"


@dataclass(frozen=True)
class Study:
    study_id: str
    split: str
    indication: str
    findings: str
    impression: str
    images: tuple[ImageRef, ...]
    mesh_major: tuple[str, ...] = field(default=())

    @property
    def report(self) -> str:
        return " ".join(t for t in (self.findings.strip(), self.impression.strip()) if t)


def is_tune(study_id: str) -> bool:
    """The stable ~10 % of the train split that the findings classifier holds out to choose its
    checkpoint and thresholds (``sha256(study_id)[0] < 26``); val stays untouched."""
    return hashlib.sha256(study_id.encode()).digest()[0] < 26


def _kaggle_split(uid: str) -> str:
    return "val" if hashlib.sha256(uid.encode()).digest()[0] < 26 else "train"


def _load_jsonl(root: Path) -> list[Study]:
    studies = []
    with open(root / "studies.jsonl", encoding="utf-8") as fh:
        for line in fh:
            if not line.strip():
                continue
            d = json.loads(line)
            images = tuple(
                ImageRef(
                    image_id=str(im["image_id"]),
                    path=root / im["file"],
                    view_position=im.get("view_position") or "",
                    projection=im.get("projection") or "",
                )
                for im in d.get("images", [])
            )
            studies.append(
                Study(
                    study_id=str(d["study_id"]),
                    split=d.get("split", "train"),
                    indication=d.get("indication") or "",
                    findings=d.get("findings") or "",
                    impression=d.get("impression") or "",
                    images=images,
                    mesh_major=tuple(d.get("mesh_major") or ()),
                )
            )
    return studies


def _load_kaggle(root: Path) -> list[Study]:
    projections: dict[str, list[tuple[str, str]]] = {}
    with open(root / "indiana_projections.csv", newline="", encoding="utf-8") as fh:
        for row in csv.DictReader(fh):
            projections.setdefault(row["uid"], []).append((row["filename"], row["projection"]))
    image_dir = root / "images_normalized"
    studies = []
    with open(root / "indiana_reports.csv", newline="", encoding="utf-8") as fh:
        for row in csv.DictReader(fh):
            uid = row["uid"]
            images = tuple(
                ImageRef(
                    image_id=Path(fn).stem, path=image_dir / fn, view_position="", projection=proj
                )
                for fn, proj in projections.get(uid, [])
            )
            mesh = tuple(m.strip() for m in (row.get("MeSH") or "").split(";") if m.strip())
            studies.append(
                Study(
                    study_id=uid,
                    split=_kaggle_split(uid),
                    indication=row.get("indication") or "",
                    findings=row.get("findings") or "",
                    impression=row.get("impression") or "",
                    images=images,
                    mesh_major=mesh,
                )
            )
    return studies


def load_studies(root: str | Path, splits: Sequence[str] | None = None) -> list[Study]:
    """Read the studies of a dataset directory (either layout), optionally only some splits.

    The pseudo-split ``tune`` is the part of ``train`` selected by :func:`is_tune`.

    Studies without images or without any report text are dropped (nothing to learn from).
    """
    root = Path(root)
    if (root / "studies.jsonl").exists():
        studies = _load_jsonl(root)
    elif (root / "indiana_reports.csv").exists() and (root / "indiana_projections.csv").exists():
        studies = _load_kaggle(root)
    else:
        raise FileNotFoundError(
            f"{root}: neither studies.jsonl nor indiana_reports.csv + indiana_projections.csv found"
        )
    studies = [s for s in studies if s.images and s.report]
    if splits is not None:
        want = set(splits)
        studies = [s for s in studies if s.split in want
                   or ("tune" in want and s.split == "train" and is_tune(s.study_id))]
    return studies


def to_unit_range(values: np.ndarray, top: float, dtype: type = np.float32) -> np.ndarray:
    """Display values ``0..top`` -> float32 [0, 1]. The one scaling of 8-bit display-ready pixels:
    an image file (:func:`read_image`) and an 8-bit MONOCHROME2 DICOM image without a window
    (``plugin.drafting.pixels.prepare``) both go through it, so eval and the node feed the model the same
    array for the same pixels. Computed in float64 (``dtype`` float64 keeps that precision for
    further steps, e.g. MONOCHROME1 inversion); float32 rounding of ``v / 255`` equals float32
    division for every 8-bit ``v``."""
    if top <= 0:
        raise ValueError(f"top must be positive, got {top}")
    return np.clip(np.asarray(values, dtype=np.float64) / float(top), 0.0, 1.0).astype(dtype)


def read_image(path: str | Path) -> np.ndarray:
    """Decode an 8-bit grayscale image file to float32 [0, 1] (MONOCHROME2), at its own size.

    Exactly what the node yields for a DICOM image carrying the same 8-bit pixels (MONOCHROME2,
    no window): ``value / 255`` (:func:`to_unit_range`); resizing is the runtime's."""
    from PIL import Image

    with Image.open(path) as im:
        arr = np.asarray(im.convert("L"))
    return to_unit_range(arr, 255.0)
