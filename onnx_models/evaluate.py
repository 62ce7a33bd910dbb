"""Evaluate a bundle on one split of a dataset folder: language metrics and clinical efficacy.

- NLG: BLEU-1..4, METEOR (the Meteor 1.5 jar shipped with pycocoevalcap, needs java),
  ROUGE-L and CIDEr from ``pycocoevalcap`` (the implementations R2Gen and its successors use),
  on lower-cased text with words and punctuation separated; the report is
  ``findings + " " + impression``.
- Clinical efficacy: ``onnx_models.labels.label`` on the reference and on the generated text,
  U-ones (uncertain = positive); micro/macro precision, recall and F1 over the 14
  observations and over the 13 abnormal ones (No Finding excluded).
- Baselines on the same split: the nearest training report by image embedding (mean-pooled
  ``encoder`` tokens of the same bundle, cosine similarity) and the most common training
  report.
- Consistency (:func:`onnx_models.consistency.rates`): contradictions, duplicates and fragments
  per 100 reports, for every system and for the reference reports themselves (the baseline a
  careful radiologist sets), in ``systems`` and in ``consistency``.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from .consistency import rates as consistency_rates
from .data import Study, load_studies, read_image
from .input_gate import GateDecision, decide
from .labels import ABNORMAL_OBSERVATIONS, OBSERVATIONS, binary_vector, label
from .runtime import ReportGenerator, StudyInput
from .tokenizer import normalise_text
from .views import order, resolve, view_from_position

log = logging.getLogger(__name__)


def nlg_metrics(refs: Sequence[str], hyps: Sequence[str], meteor: bool = True) -> dict[str, Any]:
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    gts = {i: [normalise_text(r) or "."] for i, r in enumerate(refs)}
    res = {i: [normalise_text(h) or "."] for i, h in enumerate(hyps)}
    out: dict[str, Any] = {}
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    for n in range(4):
        out[f"BLEU-{n + 1}"] = float(bleu[n])
    out["ROUGE-L"] = float(Rouge().compute_score(gts, res)[0])
    out["CIDEr"] = float(Cider().compute_score(gts, res)[0])
    out["METEOR"] = None
    if meteor:
        try:
            from pycocoevalcap.meteor.meteor import Meteor

            m = Meteor()
            try:
                out["METEOR"] = float(m.compute_score(gts, res)[0])
            finally:
                try:
                    m.close()
                except Exception:  # noqa: BLE001 - the jar may already be gone
                    pass
        except Exception as exc:  # noqa: BLE001 - java missing or the jar failing
            log.warning("METEOR not computed: %s", exc)
    return out


def _prf(tp: float, fp: float, fn: float) -> tuple[float, float, float]:
    p = tp / (tp + fp) if tp + fp else 0.0
    r = tp / (tp + fn) if tp + fn else 0.0
    f = 2 * p * r / (p + r) if p + r else 0.0
    return p, r, f


def clinical_metrics(refs: Sequence[str], hyps: Sequence[str]) -> dict[str, Any]:
    y = np.array([binary_vector(label(t), OBSERVATIONS) for t in refs])
    p = np.array([binary_vector(label(t), OBSERVATIONS) for t in hyps])
    out: dict[str, Any] = {}
    per_obs: dict[str, dict[str, float]] = {}
    for j, o in enumerate(OBSERVATIONS):
        tp = float(((p[:, j] == 1) & (y[:, j] == 1)).sum())
        fp = float(((p[:, j] == 1) & (y[:, j] == 0)).sum())
        fn = float(((p[:, j] == 0) & (y[:, j] == 1)).sum())
        pr, rc, f1 = _prf(tp, fp, fn)
        per_obs[o] = {"precision": pr, "recall": rc, "f1": f1, "support": int(y[:, j].sum()),
                      "predicted": int(p[:, j].sum())}
    for tag, names in (("14", OBSERVATIONS), ("13", ABNORMAL_OBSERVATIONS)):
        idx = [OBSERVATIONS.index(o) for o in names]
        yy, pp = y[:, idx], p[:, idx]
        mp, mr, mf = _prf(float(((pp == 1) & (yy == 1)).sum()), float(((pp == 1) & (yy == 0)).sum()),
                          float(((pp == 0) & (yy == 1)).sum()))
        out[f"CE{tag}_micro_P"], out[f"CE{tag}_micro_R"], out[f"CE{tag}_micro_F1"] = mp, mr, mf
        out[f"CE{tag}_macro_P"] = float(np.mean([per_obs[o]["precision"] for o in names]))
        out[f"CE{tag}_macro_R"] = float(np.mean([per_obs[o]["recall"] for o in names]))
        out[f"CE{tag}_macro_F1"] = float(np.mean([per_obs[o]["f1"] for o in names]))
    out["per_observation"] = per_obs
    return out


def views_for(gen: ReportGenerator, study: Study, pixels: list[np.ndarray]) -> list[str]:
    """Views as the node decides them (:func:`onnx_models.views.resolve`): the view classifier
    decides frontal vs lateral; the ViewPosition tag only refines it (PA/AP, LATERAL/LL) when
    it agrees."""
    labels = gen.classify_views(pixels)
    return [resolve(view_from_position(im.view_position), label).view
            for label, im in zip(labels, study.images, strict=True)]


def _inputs(gen: ReportGenerator, studies: Sequence[Study]) -> tuple[list[StudyInput], list[list[str]]]:
    """The generator's input for each study exactly as the node builds it from DICOM: pixels as
    the node prepares an 8-bit MONOCHROME2 image (:func:`onnx_models.data.read_image`), views
    from :func:`views_for`, in the node's order (:func:`onnx_models.views.order`)."""
    inputs, views = [], []
    for s in studies:
        px = [read_image(im.path) for im in s.images]
        v = views_for(gen, s, px)
        idx = order(v)
        inputs.append(StudyInput(views=[(px[i], v[i]) for i in idx], indication=s.indication))
        views.append([v[i] for i in idx])
    return inputs, views


def gate(gen: ReportGenerator, studies: Sequence[Study], inputs: list[StudyInput], mode: str
         ) -> tuple[list[StudyInput | None], list[GateDecision]]:
    """The node's input gate on eval inputs (:func:`onnx_models.input_gate.decide`, without the
    DICOM header checks): each study's input keeps the views that pass, or is None when the node
    would withhold its draft."""
    out: list[StudyInput | None] = []
    decisions = []
    for s, st in zip(studies, inputs, strict=True):
        images, views = [im for im, _ in st.views], [v for _, v in st.views]
        checks = None if mode == "off" else gen.check_inputs(images, views)
        d = decide(mode, [f"{s.study_id}/{i}" for i in range(len(views))], views, checks, [[] for _ in views])
        decisions.append(d)
        out.append(None if d.withheld else StudyInput(views=[st.views[i] for i in d.use], indication=st.indication))
    return out, decisions


def embed(gen: ReportGenerator, studies: Sequence[Study], batch_size: int, desc: str) -> np.ndarray:
    out = []
    for i in tqdm(range(0, len(studies), batch_size), desc=desc, unit="batch", file=sys.stderr):
        inputs, _ = _inputs(gen, studies[i : i + batch_size])
        out.append(gen.embed_images(inputs))
    e = np.concatenate(out)
    return e / np.maximum(np.linalg.norm(e, axis=1, keepdims=True), 1e-8)


def evaluate(
    bundle: str = "default",
    data: str = "../shared/data/iu_xray",
    split: str = "val",
    predictions: str | None = None,
    beam_size: int | None = None,
    no_repeat_ngram_size: int | None = None,
    threads: int = 2,
    batch_size: int = 8,
    limit: int = 0,
    baselines: bool = True,
    meteor: bool = True,
    train_data: str | None = None,
    input_check: str = "enforce",
) -> dict[str, Any]:
    """Score ``bundle`` on ``split`` as the node would draft it: the same pixels, views and
    input gate (``input_check`` as ``pipeline.input_check``: a withheld study scores as an
    empty draft, a partial one is drafted from the views that pass)."""
    gen = ReportGenerator(bundle, threads=threads)
    studies = load_studies(data, [split])
    if limit:
        studies = studies[:limit]
    if not studies:
        raise SystemExit(f"{data}: no studies in split {split!r}")
    refs = [s.report for s in studies]
    hyps, rows = [], []
    outcomes: dict[str, int] = {}
    t0 = time.perf_counter()
    for i in tqdm(range(0, len(studies), batch_size), desc=f"eval {split}", unit="batch", file=sys.stderr):
        chunk = studies[i : i + batch_size]
        inputs, views = _inputs(gen, chunk)
        gated, decisions = gate(gen, chunk, inputs, input_check)
        drafted = [x for x in gated if x is not None]
        generated = iter(gen.generate(drafted, beam_size=beam_size, no_repeat_ngram_size=no_repeat_ngram_size)
                         if drafted else [])
        for s, v, g, d in zip(chunk, views, gated, decisions, strict=True):
            r = next(generated) if g is not None else None
            findings, impression = (r.findings, r.impression) if r is not None else ("", "")
            outcomes[d.outcome] = outcomes.get(d.outcome, 0) + 1
            hyps.append(" ".join(t for t in (findings, impression) if t))
            rows.append({"study_id": s.study_id, "indication": s.indication,
                         "views": [v[j] for j in d.use], "findings": findings, "impression": impression,
                         "reference": s.report, "input_check": d.outcome,
                         "observations": {k: round(p, 4) for k, p in r.observations.items()} if r else {}})
    seconds = time.perf_counter() - t0
    if predictions:
        with open(predictions, "w", encoding="utf-8") as fh:
            for row in rows:
                fh.write(json.dumps(row) + "\n")
    systems: dict[str, dict[str, Any]] = {}
    per_obs: dict[str, Any] = {}

    consistency: dict[str, dict[str, float]] = {
        "reference_reports": consistency_rates((s.findings, s.impression) for s in studies)}

    def score(name: str, texts: list[str], sections: list[tuple[str, str]]) -> None:
        ce = clinical_metrics(refs, texts)
        per_obs[name] = ce.pop("per_observation")
        consistency[name] = consistency_rates(sections)
        systems[name] = {**nlg_metrics(refs, texts, meteor=meteor), **ce, **consistency[name]}

    score("model", hyps, [(str(r["findings"]), str(r["impression"])) for r in rows])
    notes = []
    if baselines:
        train = load_studies(train_data or data, ["train"])
        if train:
            common = Counter(normalise_text(s.report) for s in train).most_common(1)[0][0]
            common_text = next(s.report for s in train if normalise_text(s.report) == common)
            common_study = next(s for s in train if s.report == common_text)
            score("most_common_train_report", [common_text] * len(studies),
                  [(common_study.findings, common_study.impression)] * len(studies))
            e_train = embed(gen, train, 16, "embed train")
            e_eval = embed(gen, studies, 16, f"embed {split}")
            nn = (e_eval @ e_train.T).argmax(axis=1)
            score("nearest_train_report", [train[int(j)].report for j in nn],
                  [(train[int(j)].findings, train[int(j)].impression) for j in nn])
        else:
            notes.append("no train split in the data folder: baselines skipped")
    return {
        "bundle": {"name": gen.name, "version": gen.version, "path": str(gen.bundle.path)},
        "data": str(Path(data)), "split": split, "n_studies": len(studies),
        "decoding": {"beam_size": beam_size or gen.beam_size,
                     "no_repeat_ngram_size": gen.no_repeat_ngram_size if no_repeat_ngram_size is None
                     else no_repeat_ngram_size, "max_tokens": gen.max_tokens,
                     "providers": gen.providers},
        "text": "findings + ' ' + impression, lower-cased, words and punctuation split",
        "labeller": "onnx_models.labels (U-ones)",
        "systems": systems,
        "consistency": consistency,
        "per_observation_f1": {k: {o: round(v["f1"], 4) for o, v in d.items()} for k, d in per_obs.items()},
        "per_observation_support": {o: v["support"] for o, v in per_obs["model"].items()},
        "input_check": {"mode": input_check, "outcomes": outcomes},
        "seconds_per_study": seconds / len(studies),
        "notes": notes,
    }
