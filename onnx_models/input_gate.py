"""The input gate: is a view like the images the model was trained on?

A report model trained on one kind of film writes confident, false text about another kind
(a model trained on simulated radiographs reading a real CR, a CT slice, a photograph). The
gate scores every view before drafting and the pipeline withholds the draft when no view
passes (``plugin.drafting``, ARCHITECTURE rule 13).

Method (``input_check.method = "mahalanobis"``), chosen for being cheap, deterministic and
computed from the training images alone (Lee et al., NeurIPS 2018, "A simple unified framework
for detecting out-of-distribution samples"): two Mahalanobis distances per view.

- ``embedding``: the encoder's view embedding (its image tokens mean-pooled, the view's
  position as the model reads it), with a class-conditional mean per view position and one
  tied covariance. It sees what the model sees.
- ``appearance``: low-level statistics of the model-size image that need no model (intensity
  quantiles, mean gradient and fine-detail energy, and an 8 x 8 thumbnail of the layout), one
  mean and covariance. It sees inverted polarity, rotation and grain that the embedding is
  blind to.

The view's score is the sum of the two distances, each divided by its median on a hold-out of
the training images that the statistics were not fitted on (``onnx_models.data.is_tune``);
the limit is the ``quantile`` (default 99 %) of the hold-out's scores; val is only measured.
(Measured on the shipped bundle: the sum separates real films from the simulated training
views with a wider margin, and rejects fewer val views, than either distance alone or both
with separate limits.) When a view fails, the gate tries the view inverted and rotated by
90/180/270 degrees: if one of those passes, the reason names it ("looks inverted", "looks
rotated by 90 degrees"). Model-free checks: a blank or near-constant image fails on its own.

The statistics live in the bundle (``input_check.npz``, checksummed with the other files);
the manifest section ``input_check`` says the method, the file, the limits and the share of
val views rejected (see README.md). A bundle without the section loads with a warning that
the gate is off.
"""

from __future__ import annotations

import io
import json
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .imaging import resize

__all__ = ["ViewCheck", "InputGate", "GateDecision", "decide", "MODES", "GateStatistics", "appearance_features", "fit_gaussian",
           "physical_problems", "calibrate", "write_input_check", "STATS_FILE"]

STATS_FILE = "input_check.npz"
#: ``pipeline.input_check``: ``enforce`` drafts from the views that pass (none: withheld),
#: ``warn`` drafts from every view and marks the draft, ``off`` checks nothing
MODES = ("enforce", "warn", "off")
FRONTAL = ("PA", "AP")
LATERAL = ("LATERAL", "LL")
METHOD = "mahalanobis"
APPEARANCE_SIZE = 128
#: a view whose intensities span less than this (1st to 99th percentile) is blank
BLANK_SPREAD = 0.04
#: transforms tried on a failing view, to name the reason (name, function)
TRANSFORMS: tuple[tuple[str, Callable[[np.ndarray], np.ndarray]], ...] = (
    ("looks inverted (white air, dark bone: polarity or MONOCHROME1/2 wrong)", lambda a: 1.0 - a),
    ("looks rotated by 90 degrees", lambda a: np.rot90(a, -1)),
    ("looks rotated by 180 degrees", lambda a: np.rot90(a, 2)),
    ("looks rotated by 270 degrees", lambda a: np.rot90(a, 1)),
)


def appearance_features(image: np.ndarray) -> np.ndarray:
    """Model-free statistics of a 2-D MONOCHROME2 image in [0, 1] (77 values): 7 intensity
    quantiles, mean horizontal and vertical gradient, fine-detail energy, standard deviation and
    an 8 x 8 thumbnail, all at ``APPEARANCE_SIZE`` px (the same resize as the model input)."""
    a = np.clip(resize(np.asarray(image, dtype=np.float32), APPEARANCE_SIZE), 0.0, 1.0)
    q = np.quantile(a, [0.01, 0.05, 0.25, 0.5, 0.75, 0.95, 0.99])
    gx = np.abs(np.diff(a, axis=1)).mean()
    gy = np.abs(np.diff(a, axis=0)).mean()
    half = resize(a, APPEARANCE_SIZE // 2)
    detail = np.abs(a - np.kron(half, np.ones((2, 2), dtype=np.float32))).mean()
    thumb = resize(a, 8).ravel()
    return np.concatenate([q, [gx, gy, detail, a.std()], thumb]).astype(np.float64)


def physical_problems(image: np.ndarray) -> list[str]:
    """Problems that need no model (today: a blank or near-constant image)."""
    a = np.asarray(image, dtype=np.float32)
    if a.size == 0:
        return ["empty image"]
    lo, hi = np.quantile(a, [0.01, 0.99])
    if hi - lo < BLANK_SPREAD:
        return [f"blank or near-constant image (intensity spread {hi - lo:.3f})"]
    return []


@dataclass(frozen=True)
class Gaussian:
    """Class-conditional means (one per view position, or one ``"*"``) and a tied precision
    matrix; ``distance`` is the smallest Mahalanobis distance to any class mean."""

    means: dict[str, np.ndarray]
    precision: np.ndarray

    def distance(self, features: np.ndarray) -> np.ndarray:
        f = np.atleast_2d(np.asarray(features, dtype=np.float64))
        out = np.full(len(f), np.inf)
        for mu in self.means.values():
            r = f - mu
            out = np.minimum(out, np.sqrt(np.maximum(np.einsum("ij,jk,ik->i", r, self.precision, r), 0.0)))
        return out


def fit_gaussian(features: np.ndarray, classes: Sequence[str] | None = None, ridge: float = 1e-6) -> Gaussian:
    """Means per class (all rows one class when ``classes`` is None) and the inverse of the
    pooled within-class covariance (plus ``ridge`` times its mean variance, for stability)."""
    x = np.asarray(features, dtype=np.float64)
    labels = np.asarray(classes if classes is not None else ["*"] * len(x))
    means = {str(c): x[labels == c].mean(axis=0) for c in sorted(set(labels.tolist()))}
    resid = np.concatenate([x[labels == c] - m for c, m in means.items()])
    cov = resid.T @ resid / max(1, len(resid) - len(means))
    cov += np.eye(cov.shape[0]) * ridge * float(np.trace(cov)) / cov.shape[0]
    return Gaussian(means=means, precision=np.linalg.inv(cov))


@dataclass(frozen=True)
class ViewCheck:
    """The gate's verdict on one view: passed or not, why, and the scores behind it.

    Attributes
    ----------
    view:
        The view position the gate was given.
    passed:
        Whether the view is like the training images.
    reasons:
        Why not, in plain words (empty when passed).
    scores:
        ``embedding``, ``appearance`` and the combined ``score``.
    limits:
        The calibrated limit of ``score``.
    """

    view: str
    passed: bool
    reasons: tuple[str, ...] = ()
    scores: dict[str, float] = field(default_factory=dict)
    limits: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class GateStatistics:
    """What ``input_check.npz`` holds: the two Gaussians."""

    embedding: Gaussian
    appearance: Gaussian

    def to_bytes(self) -> bytes:
        arrays: dict[str, np.ndarray] = {
            "embedding_classes": np.array(list(self.embedding.means), dtype="U16"),
            "embedding_means": np.stack(list(self.embedding.means.values())),
            "embedding_precision": self.embedding.precision,
            "appearance_means": np.stack(list(self.appearance.means.values())),
            "appearance_precision": self.appearance.precision,
        }
        buf = io.BytesIO()  # an .npz (np.load reads it) with fixed member dates: same stats, same bytes
        with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_STORED) as zf:
            for name, arr in arrays.items():
                with zf.open(zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0)), "w") as fh:
                    np.lib.format.write_array(fh, np.ascontiguousarray(arr), allow_pickle=False)
        return buf.getvalue()

    @classmethod
    def load(cls, path: Path) -> GateStatistics:
        with np.load(path, allow_pickle=False) as z:
            classes = [str(c) for c in z["embedding_classes"]]
            emb = Gaussian(dict(zip(classes, z["embedding_means"], strict=True)), z["embedding_precision"])
            app = Gaussian({"*": z["appearance_means"][0]}, z["appearance_precision"])
        return cls(embedding=emb, appearance=app)


#: the callable a gate uses to embed views: (images, views) -> features [n, d]
Embedder = Callable[[list[np.ndarray], list[str]], np.ndarray]


class InputGate:
    """The bundle's gate: ``check(images, views, embed)`` -> one :class:`ViewCheck` per view."""

    def __init__(self, section: dict[str, Any], stats: GateStatistics) -> None:
        if section.get("method") != METHOD:
            raise ValueError(f"input_check.method {section.get('method')!r} is not {METHOD!r}")
        self.section = section
        self.stats = stats
        self.scales = {k: float(section["scales"][k]) for k in ("embedding", "appearance")}
        self.limit = float(section["limit"])

    def _scores(self, images: list[np.ndarray], views: list[str], embed: Embedder) -> list[dict[str, float]]:
        return scores(self.stats, self.scales, images, views, embed)

    def _fails(self, sc: dict[str, float]) -> bool:
        return sc["score"] > self.limit

    def check(self, images: Sequence[np.ndarray], views: Sequence[str], embed: Embedder) -> list[ViewCheck]:
        images, views = [np.asarray(im, dtype=np.float32) for im in images], list(views)
        if not images:
            return []
        scores = self._scores(images, views, embed)
        out = []
        for im, view, sc in zip(images, views, scores, strict=True):
            reasons = physical_problems(im)
            if self._fails(sc) and not reasons:
                reasons = [self._explain(im, view, sc, embed)]
            out.append(ViewCheck(view=view, passed=not reasons, reasons=tuple(reasons), scores=sc,
                                 limits={"score": self.limit}))
        return out

    def _explain(self, image: np.ndarray, view: str, sc: dict[str, float], embed: Embedder) -> str:
        variants = [np.ascontiguousarray(fn(image)) for _, fn in TRANSFORMS]
        for (reason, _), vsc in zip(TRANSFORMS, self._scores(variants, [view] * len(variants), embed), strict=True):
            if not self._fails(vsc):
                return reason
        return (f"unlike the images the model was trained on (score {sc['score']:.2f} > limit {self.limit:.2f}; "
                f"embedding distance {sc['embedding']:.1f}, appearance distance {sc['appearance']:.1f})")


def scores(stats: GateStatistics, scales: dict[str, float], images: Sequence[np.ndarray], views: Sequence[str],
           embed: Embedder) -> list[dict[str, float]]:
    """Both distances and the combined score of each view (see the module docstring)."""
    emb = stats.embedding.distance(embed(list(images), list(views)))
    app = stats.appearance.distance(np.stack([appearance_features(im) for im in images]))
    return [{"embedding": float(e), "appearance": float(a),
             "score": float(e / scales["embedding"] + a / scales["appearance"])}
            for e, a in zip(emb, app, strict=True)]


def calibrate(
    embed: Embedder,
    fit: Sequence[tuple[np.ndarray, str]],
    hold_out: Sequence[tuple[np.ndarray, str]],
    measure: Sequence[tuple[np.ndarray, str]] = (),
    quantile: float = 0.99,
    batch: int = 64,
    progress: Callable[[int], None] | None = None,
) -> tuple[GateStatistics, dict[str, Any]]:
    """Fit the Gaussians on ``fit`` views, scale each distance by its median on the
    ``hold_out`` views, set the limit at ``quantile`` of the hold-out's scores, and measure the
    share of ``measure`` views (val) rejected.

    Returns the statistics and the manifest section (the checksum of the statistics file is
    in the manifest's ``files``, written by :func:`write_input_check`)."""
    if len(fit) < 100 or len(hold_out) < 20:
        raise ValueError(f"calibration needs >= 100 fitting and >= 20 hold-out views, got {len(fit)} and {len(hold_out)}")

    def in_batches(views: Sequence[tuple[np.ndarray, str]],
                   fn: Callable[[list[np.ndarray], list[str]], Any]) -> list[Any]:
        out = []
        for i in range(0, len(views), batch):
            chunk = views[i : i + batch]
            out.append(fn([im for im, _ in chunk], [v for _, v in chunk]))
            if progress:
                progress(len(chunk))
        return out

    feats = in_batches(fit, lambda ims, vs: (embed(ims, vs), np.stack([appearance_features(im) for im in ims])))
    stats = GateStatistics(embedding=fit_gaussian(np.concatenate([e for e, _ in feats]), [v for _, v in fit]),
                           appearance=fit_gaussian(np.concatenate([a for _, a in feats])))
    unit = {"embedding": 1.0, "appearance": 1.0}

    def score_all(views: Sequence[tuple[np.ndarray, str]]) -> list[dict[str, float]]:
        return [sc for part in in_batches(views, lambda ims, vs: scores(stats, unit, ims, vs, embed)) for sc in part]

    ho = score_all(hold_out)
    scales = {k: float(np.median([sc[k] for sc in ho])) for k in unit}
    combined = [sc["embedding"] / scales["embedding"] + sc["appearance"] / scales["appearance"] for sc in ho]
    limit = float(np.quantile(combined, quantile))
    section: dict[str, Any] = {
        "method": METHOD,
        "statistics": STATS_FILE,
        "scales": {k: round(v, 4) for k, v in scales.items()},
        "limit": round(limit, 4),
        "quantile": quantile,
        "fitted_on_views": len(fit),
        "limit_from_views": len(hold_out),
        "description": ("Mahalanobis distances of each view to the training images: encoder embedding "
                        "(class-conditional means per view position, tied covariance) and model-free "
                        "appearance statistics; score = the sum of both, each divided by its hold-out "
                        f"median; a view fails above the {quantile:.1%} quantile of a training hold-out"),
    }
    if measure:
        m = score_all(measure)
        rejected = [sc["embedding"] / scales["embedding"] + sc["appearance"] / scales["appearance"] > round(limit, 4)
                    for sc in m]
        section["val_views"] = len(measure)
        section["val_rejected_share"] = round(float(np.mean(rejected)), 4)
    return stats, section


def write_input_check(bundle_dir: Path, stats: GateStatistics, section: dict[str, Any],
                      version: str = "") -> dict[str, Any]:
    """Write ``input_check.npz`` into the bundle, add the manifest section (and set the bundle
    ``version`` when given) and re-checksum every file."""
    from .bundle import MANIFEST, write_manifest

    (bundle_dir / STATS_FILE).write_bytes(stats.to_bytes())
    manifest = json.loads((bundle_dir / MANIFEST).read_text(encoding="utf-8"))
    manifest["input_check"] = section
    if version:
        manifest["version"] = version
    return write_manifest(bundle_dir, manifest)


@dataclass(frozen=True)
class GateDecision:
    """What the pipeline does with the study's views and what it records (``as_json()`` is
    ``token_info["input_check"]``).

    Attributes
    ----------
    mode:
        ``enforce``, ``warn`` or ``off``.
    outcome:
        ``passed``, ``partial``, ``withheld``, ``warned`` or ``off``.
    reason:
        One plain sentence for the reviewer.
    use:
        Indexes of the views the model reads.
    views:
        Per view: ``sop_instance_uid``, ``view``, ``passed``, ``reasons``, ``ood_score``,
        ``ood_limit``.
    study:
        Study-level notes (e.g. ``"frontal-only study"``).
    """

    mode: str
    outcome: str  # passed | partial | withheld | warned | off
    reason: str
    use: tuple[int, ...]  # indexes of the views the model reads
    views: tuple[dict[str, Any], ...] = ()
    study: tuple[str, ...] = field(default=())

    @property
    def withheld(self) -> bool:
        return self.outcome == "withheld"

    def notes(self) -> tuple[str, ...]:
        """Sentences for the SR: the views not used (or used despite failing) and why."""
        out = []
        for v in self.views:
            if not v["passed"]:
                verb = "read despite failing the input check" if self.outcome == "warned" else "not used"
                out.append(f"View {v['view']} ({v['sop_instance_uid']}) {verb}: {'; '.join(v['reasons'])}.")
        return tuple(out)

    def as_json(self) -> dict[str, Any]:
        return {"mode": self.mode, "outcome": self.outcome, "reason": self.reason,
                "views": [dict(v) for v in self.views], "study": list(self.study)}


def _study_notes(views: Sequence[str]) -> tuple[str, ...]:
    if views and all(v in FRONTAL for v in views):
        return ("frontal-only study (no lateral view)",)
    if views and all(v in LATERAL for v in views):
        return ("lateral-only study (no frontal view)",)
    return ()


def decide(mode: str, sop_instance_uids: Sequence[str], views: Sequence[str],
           checks: Sequence[ViewCheck] | None, header_problems: Sequence[Sequence[str]]) -> GateDecision:
    """The one rule of the input gate: combine the model's verdicts with the header problems per
    view into what the pipeline does (used by the pipeline and by ``cxrnode eval --input-check``).

    Parameters
    ----------
    mode:
        ``enforce`` (draft from passing views only; withhold when none), ``warn`` (draft from all,
        say why) or ``off``.
    sop_instance_uids:
        The views' SOP Instance UIDs, in input order.
    views:
        Their view positions.
    checks:
        The model's verdicts (:meth:`ReportGenerator.check_inputs`); ``None`` when the bundle has
        no gate or the mode is ``off``.
    header_problems:
        Per view, what its DICOM header says is wrong (e.g. the field of view).

    Returns
    -------
    GateDecision
        The outcome, the views to use and what to record.
    """
    if mode not in MODES:
        raise ValueError(f"input_check mode must be one of {MODES}, got {mode!r}")
    n = len(views)
    if mode == "off" or checks is None:
        why = "pipeline.input_check is off" if mode == "off" else "the model bundle has no input gate"
        return GateDecision(mode, "off", f"not checked: {why}", tuple(range(n)), study=_study_notes(views))
    rows: list[dict[str, Any]] = []
    for uid, view, check, extra in zip(sop_instance_uids, views, checks, header_problems, strict=True):
        reasons = [*extra, *check.reasons]
        rows.append({"sop_instance_uid": uid, "view": view, "passed": not reasons, "reasons": reasons,
                     "ood_score": round(check.scores["score"], 3) if "score" in check.scores else None,
                     "ood_limit": round(check.limits["score"], 3) if "score" in check.limits else None})
    passed = tuple(i for i, r in enumerate(rows) if r["passed"])
    failed = [r for r in rows if not r["passed"]]
    if not failed:
        return GateDecision(mode, "passed", "every view is like the images the model was trained on",
                            tuple(range(n)), tuple(rows), _study_notes(views))
    if mode == "warn":
        return GateDecision(mode, "warned", f"{len(failed)} of {n} view(s) failed the input check; drafted "
                            "from every view anyway (pipeline.input_check = warn)",
                            tuple(range(n)), tuple(rows), _study_notes(views))
    if not passed:
        reasons = sorted({reason for r in failed for reason in r["reasons"]})
        why = reasons[0] if len(reasons) == 1 else "; ".join(f"{r['view']}: {r['reasons'][0]}" for r in failed)
        return GateDecision(mode, "withheld", f"no view can be read by the model: {why}", (), tuple(rows),
                            _study_notes(views))
    return GateDecision(mode, "partial", f"{len(failed)} of {n} view(s) not used: "
                        + "; ".join(f"{r['view']}: {r['reasons'][0]}" for r in failed),
                        passed, tuple(rows), _study_notes([views[i] for i in passed]))
