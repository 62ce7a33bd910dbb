"""The prior panel in the real reviewer window (offscreen): the prior's views beside the current
ones, its report text, a dated read-only header, linked window/level + zoom, Ctrl+P, and the
"no prior" messages. The prior is attached as the drafting job would after a C-GET (the end-to-end
test in tests/e2e/test_priors_e2e.py fetches it from a real Orthanc). Run with ``-k prior``."""

from __future__ import annotations

import json

import numpy as np
from PyQt6.QtCore import Qt
from support import synthetic
from support.priors import attach_prior

from dicom_node.db import Draft
from gui import imaging, prior_model
from plugin.review.priors import NO_PRIOR

WAIT = 30000
REPORT = "FINDINGS: Small left pleural effusion.\nIMPRESSIONS: Small left pleural effusion."


def _prior_images(patient_id: str) -> list:
    spec = synthetic.SyntheticStudy(key="prior-panel", patient_id=patient_id, study_date="20251110", size=512, seed=7)
    return synthetic.make_study(spec)


def _open(qtbot, w, draft_id: int) -> None:  # type: ignore[no-untyped-def]
    with qtbot.waitSignal(w.review_shown, timeout=WAIT):
        w.open_draft(draft_id)
    qtbot.waitUntil(lambda: not w.tasks.running and w._opening is None, timeout=WAIT)


def test_prior_panel_shows_views_report_and_links_window_and_zoom(qtbot, make_window, node, service) -> None:  # type: ignore[no-untyped-def]
    row = service.worklist()[0]
    assert row.draft_id is not None
    attach_prior(node.sessions, node.store, row.draft_id, _prior_images(row.patient_id), REPORT, study_date="20251110")
    detail = service.prior(row.draft_id)
    assert detail.found and len(detail.images) == 2 and all("priors" in str(i.path) for i in detail.images)
    w = make_window()
    _open(qtbot, w, row.draft_id)
    assert len(w.priors.views) == 2 and all(label.startswith("PRIOR") for label in w.priors.labels())
    header = w.priors.header_text()
    assert header.startswith("PRIOR 2025-11-10") and "READ-ONLY" in header and "days earlier" in header
    assert w.priors.report.toPlainText() == REPORT and w.priors.report.isReadOnly()
    assert "read-only" in w.priors.report_title.text()
    # linked: W/L relative to each image's own window, zoom and invert as they are
    cur, pri = w.study.views[0], w.priors.views[0]
    assert cur.state is not None and pri.state is not None
    cur.drag_window(-200, 40)
    want = prior_model.linked_window(cur.state, pri.state.picture)
    assert pri.state.window == want and want is not None
    cur.zoom_by(2.0)
    cur.toggle_invert()
    assert pri.transform.zoom == cur.transform.zoom and pri.state.invert
    # and the other way: a drag on the prior moves the current views
    before = cur.state.effective_window
    pri.drag_window(0, 80)
    assert cur.state.effective_window != before
    # Ctrl+P hides and shows the prior, with the focus anywhere (the report editor here)
    w.report.findings.setFocus()
    qtbot.keyClick(w.report.findings, Qt.Key.Key_P, Qt.KeyboardModifier.ControlModifier)
    assert not w.priors.isVisible()
    qtbot.keyClick(w.report.findings, Qt.Key.Key_P, Qt.KeyboardModifier.ControlModifier)
    assert w.priors.isVisible()


def test_prior_panel_says_when_there_is_none(qtbot, make_window, node, service) -> None:  # type: ignore[no-untyped-def]
    rows = [r for r in service.worklist() if r.draft_id is not None]
    with node.sessions() as s, s.begin():
        d = s.get(Draft, rows[1].draft_id)
        assert d is not None
        info = json.loads(d.token_info or "{}")
        info["prior"] = {"outcome": "none", "reason": "no prior chest radiograph (CR/DX) at PACS@10.0.0.1:104"}
        d.token_info = json.dumps(info)
    w = make_window()
    _open(qtbot, w, rows[1].draft_id)
    assert w.priors.header_text() == NO_PRIOR
    assert w.priors.message.isVisible() and w.priors.message.text().startswith(NO_PRIOR)
    assert w.priors.views == [] and not w.priors.report.isVisible()
    _open(qtbot, w, rows[2].draft_id)  # drafted with priors off: says so, shows nothing
    assert w.priors.header_text() == "No prior shown" and "not fetched" in w.priors.message.text()
    assert not w.priors.isVisible()  # no panel at all for a draft made with priors off


def test_prior_linked_window_is_relative_to_each_images_own_window() -> None:
    def picture(center: float, width: float) -> imaging.Picture:
        codes = np.zeros((2, 2), dtype=np.uint16)
        from pydicom import Dataset

        return imaging.Picture("1", "PA", codes, np.array([0.0, 4095.0]), Dataset(), False,
                               imaging.WindowLevel(center, width), True)

    src = imaging.ViewState(picture(2000, 4000))
    assert prior_model.linked_window(src, picture(500, 1000)) is None  # as sent stays as sent
    src.window = imaging.WindowLevel(2400, 2000)  # half as wide, 0.1 width brighter
    out = prior_model.linked_window(src, picture(500, 1000))
    assert out == imaging.WindowLevel(600, 500)
