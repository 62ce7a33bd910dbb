"""``cxrnode calibrate-gate``: compute a bundle's input gate from its training images.

Fits the statistics on the train split less its ``tune`` hold-out, sets the limits on the
hold-out, measures the share of val views rejected, and writes ``input_check.npz`` and the
manifest's ``input_check`` section into the bundle (re-checksummed). See
:mod:`onnx_models.input_gate` for the method. Views are resolved as the node resolves
them (view classifier + ViewPosition tag).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from .bundle import resolve
from .card import CARD_GATE_HEADING, gate_section
from .data import is_tune, load_studies, read_image
from .evaluate import views_for
from .input_gate import calibrate, write_input_check
from .runtime import ReportGenerator


def study_views(gen: ReportGenerator, studies: list[Any]) -> list[tuple[np.ndarray, str]]:
    """Every view of ``studies`` with the view position the node would read it as (the view
    classifier and the tag, :func:`onnx_models.evaluate.views_for`), so the gate is fitted on
    the embeddings the node computes."""
    out = []
    for s in studies:
        px = [read_image(im.path) for im in s.images]
        out += list(zip(px, views_for(gen, s, px), strict=True))
    return out


def _update_card(path: Path, section: dict[str, Any]) -> None:
    card = path / "MODEL_CARD.md"
    text = card.read_text(encoding="utf-8") if card.is_file() else ""
    if CARD_GATE_HEADING in text:
        head, _, rest = text.partition(CARD_GATE_HEADING)
        nxt = rest.find("\n## ")
        text = head + gate_section(section) + (rest[nxt + 1 :] if nxt >= 0 else "")
    else:
        text = text.rstrip("\n") + "\n\n" + gate_section(section)
    card.write_text(text, encoding="utf-8")


def calibrate_bundle(bundle: str | Path, data: str | Path, quantile: float = 0.99,
                     threads: int = 2, version: str = "") -> dict[str, Any]:
    """Calibrate ``bundle`` (a folder, changed in place) on ``data``: statistics file, manifest
    section (and ``version`` when given), model card section. Returns the manifest section."""
    path = resolve(bundle)
    gen = ReportGenerator(path, threads=threads)
    train = [s for s in load_studies(data, ["train"]) if not is_tune(s.study_id)]
    tune = load_studies(data, ["tune"])
    val = load_studies(data, ["val"])
    fit, hold_out, measure = (study_views(gen, s) for s in (train, tune, val))
    with tqdm(total=len(fit) + len(hold_out) + len(measure), desc="calibrate gate", unit="view",
              file=sys.stderr) as bar:
        stats, section = calibrate(gen.view_embeddings, fit, hold_out, measure, quantile=quantile,
                                   progress=bar.update)
    section["data"] = {"fit": f"{Path(data).name} train less tune ({len(train)} studies)",
                       "limits": f"{Path(data).name} tune ({len(tune)} studies)",
                       "measured": f"{Path(data).name} val ({len(val)} studies)"}
    _update_card(path, section)
    write_input_check(path, stats, section, version=version)
    return section
