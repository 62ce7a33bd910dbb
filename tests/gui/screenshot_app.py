"""Run the real reviewer window on an X display and save screenshots of the screen.

Used by ``test_screenshot.py`` under its own Xvfb (``DISPLAY`` set, ``QT_QPA_PLATFORM=xcb``):
``python tests/gui/screenshot_app.py WORKDIR DRAFTED.png [WITHHELD.png]``. Five 2-view studies
are stored and drafted by the real pipeline; bob holds one, one is signed. A sixth study holds two
real chest radiographs (``shared/data/dicom_samples``), which the shipped bundle's input gate
withholds. Alice edits and signs CXR-10003 with Sign & next, then opens the oldest drafted study
and puts the lung window on it with F2 from the report editor (``DRAFTED.png``: the undo bar
names the study just signed), then the withheld one (``WITHHELD.png``). The window's settings
(QSettings) live in WORKDIR, never in the user's.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

from PyQt6.QtCore import QEventLoop, QSettings, Qt, QTimer
from PyQt6.QtTest import QTest
from PyQt6.QtWidgets import QApplication

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: the support package
from support import synthetic  # noqa: E402

from gui.window import ReviewerWindow  # noqa: E402
from plugin.review.service import ReviewService  # noqa: E402


def wait(signal: object, ms: int = 60000) -> None:
    loop = QEventLoop()
    signal.connect(loop.quit)  # type: ignore[attr-defined]
    QTimer.singleShot(ms, loop.quit)
    loop.exec()


def grab(app: QApplication, out: str) -> bool:
    for _ in range(20):
        app.processEvents()
    screen = app.primaryScreen()
    assert screen is not None
    pixmap = screen.grabWindow(0, 0, 0, 1600, 900)  # what the X server shows
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    if not pixmap.save(out, "PNG"):
        print(f"could not save {out}", file=sys.stderr)
        return False
    return True


def open_patient(w: ReviewerWindow, patient_id: str) -> None:
    row = next(i for i, r in enumerate(w.worklist_vm.rows) if r.patient_id == patient_id)
    w._row_chosen(row)
    wait(w.review_shown)
    w.tasks.wait()


def main(workdir: str, out: str, out_withheld: str = "") -> int:
    root = Path(workdir)
    specs = synthetic.sample_studies(6, size=1024, prefix="shot")
    # the request attributes a RIS sends, for the Priority column (dicom_node.priority)
    for spec, attrs in zip(specs, ({"CurrentPatientLocation": "ED"}, {"RequestingService": "Outpatient clinic"},
                                   {"AdmissionID": "ADM-2291", "CurrentPatientLocation": "Ward 5B"},
                                   {"RequestedProcedurePriority": "STAT"}), strict=False):
        spec.extra.update(attrs)
    node = synthetic.build_node(root / "node", specs[:5])
    real = synthetic.real_film_study(specs[5])
    if out_withheld and not real:
        print("the real radiographs of shared/data/dicom_samples are needed for the withheld screenshot", file=sys.stderr)
        return 1
    if real:
        synthetic.store_study(node.sessions, node.store, real)
        synthetic.run_draft_job(node, specs[5].study_instance_uid)
    # a long undo window: the screenshot shows the bar of the signature made just before
    config = dataclasses.replace(node.config, review=dataclasses.replace(node.config.review, undo_window_s=300.0))
    svc = ReviewService(config, node.sessions, node.store)
    rows = {r.patient_id: r.draft_id for r in svc.worklist()}
    if real and not svc.detail(rows["CXR-10006"] or 0).withheld:
        print("the input gate did not withhold the real radiographs", file=sys.stderr)
        return 1
    svc.claim(rows["CXR-10004"] or 0, "bob")
    d5 = svc.detail(rows["CXR-10005"] or 0)
    svc.sign(d5.draft_id, "bob", d5.findings or "Small right pleural effusion, decreased.",
             "Decreasing right pleural effusion.")

    app = QApplication(sys.argv[:1])
    app.setStyle("Fusion")
    w = ReviewerWindow(svc, "alice", refresh_interval_s=0)
    w.setGeometry(0, 0, 1600, 900)
    w.show()
    wait(w.worklist_refreshed)
    w.worklist.state.setCurrentText("All")
    wait(w.worklist_refreshed)
    # Sign & next on an edited report (F12, the question answered yes); keys go to the active window
    w.confirm = lambda title, text: True
    w.activateWindow()
    QApplication.setActiveWindow(w)
    open_patient(w, "CXR-10003")
    w.report.findings.setPlainText("Heart size is normal. The lungs are clear. No pleural effusion or pneumothorax.")
    w.report.impression.setPlainText("No acute cardiopulmonary abnormality.")
    QTest.keyClick(w.report.findings, Qt.Key.Key_F12)
    wait(w.review_shown)
    w.tasks.wait()
    if w.review is None or w.review.detail.patient_id != "CXR-10001":
        open_patient(w, "CXR-10001")
    # a touch of real use: the lung window from the keyboard, an edited impression
    QTest.keyClick(w.report.findings, Qt.Key.Key_F2)
    imp = w.report.impression
    imp.setPlainText(imp.toPlainText().rstrip() + " Clinical correlation for pneumonia.")
    w.tasks.wait()
    if not grab(app, out):
        return 1
    if out_withheld:
        w.confirm = lambda title, text: True  # discard the demo edit
        open_patient(w, "CXR-10006")
        if not grab(app, out_withheld):
            return 1
    w.confirm = lambda title, text: True
    w.close()
    return 0


def prior_scene(workdir: str, out: str) -> int:
    """``--prior WORKDIR OUT.png`` (issue 17, priors): a drafted study with its patient's prior
    (fetched as the node does after a C-GET) beside it, the prior's report under it; the current
    frontal view windowed narrower, the prior following (linked)."""
    from support.priors import attach_prior

    root = Path(workdir)
    specs = synthetic.sample_studies(2, size=1024, prefix="shot-prior")
    node = synthetic.build_node(root / "node", specs)
    svc = ReviewService(node.config, node.sessions, node.store)
    row = next(r for r in svc.worklist() if r.patient_id == specs[0].patient_id)
    prior = synthetic.SyntheticStudy(key="shot-prior-old", patient_id=specs[0].patient_id,
                                     patient_name=specs[0].patient_name, study_date="20251103", size=1024, seed=11)
    attach_prior(node.sessions, node.store, row.draft_id or 0, synthetic.make_study(prior),
                 "FINDINGS: Small right pleural effusion. Heart size is normal. No pneumothorax.\n"
                 "IMPRESSIONS: Small right pleural effusion.", study_date="20251103")
    app = QApplication(sys.argv[:1])
    app.setStyle("Fusion")
    w = ReviewerWindow(svc, "alice", refresh_interval_s=0)
    w.setGeometry(0, 0, 1600, 900)
    w.show()
    wait(w.worklist_refreshed)
    open_patient(w, specs[0].patient_id)
    if w.study.views:
        w.study.views[0].drag_window(-250, 60)
    w.tasks.wait()
    ok = grab(app, out)
    w.confirm = lambda title, text: True
    w.close()
    return 0 if ok else 1


def after_signing_scenes(workdir: str, out_critical: str, out_addendum: str) -> int:
    """``--after-signing WORKDIR CRITICAL.png ADDENDUM.png`` (issue 17): alice flags a critical
    result before signing (who was told, role, how, when: ``CRITICAL.png``), signs, then adds an
    addendum to the signed report (``ADDENDUM.png``: the recorded critical result and the addendum
    under the verified report)."""
    import datetime as dt

    root = Path(workdir)
    specs = synthetic.sample_studies(2, size=1024, prefix="shot-after")
    node = synthetic.build_node(root / "node", specs, extra_toml="[review]\nundo_window_s = 0\n")
    svc = ReviewService(node.config, node.sessions, node.store)
    app = QApplication(sys.argv[:1])
    app.setStyle("Fusion")
    w = ReviewerWindow(svc, "alice", refresh_interval_s=0)
    w.setGeometry(0, 0, 1600, 900)
    w.confirm = lambda title, text: True
    w.show()
    wait(w.worklist_refreshed)
    open_patient(w, specs[0].patient_id)
    w.report.findings.setPlainText("Large right pneumothorax with leftward mediastinal shift. "
                                   "The left lung is clear. Heart size is normal.")
    w.report.impression.setPlainText("Large right tension pneumothorax. Findings discussed with the ED physician.")
    w.report.after.critical.fill("Dr Ann Lee", "ED physician", "telephone",
                                 dt.datetime.now(dt.UTC) - dt.timedelta(minutes=4))
    w.tasks.wait()
    ok = grab(app, out_critical)
    w.sign()
    wait(w.signed)
    w.tasks.wait()
    w.report.after.records.text.setPlainText("Chest tube placed at 10:20; follow-up radiograph requested.")
    w.add_addendum()
    wait(w.addendum_added)
    w.tasks.wait()
    ok = grab(app, out_addendum) and ok
    w.close()
    return 0 if ok else 1


if __name__ == "__main__":
    import tempfile

    QSettings.setPath(QSettings.Format.IniFormat, QSettings.Scope.UserScope, tempfile.mkdtemp(prefix="cxrnode-shot-"))
    if sys.argv[1:2] == ["--prior"]:
        sys.exit(prior_scene(*sys.argv[2:]))
    if sys.argv[1:2] == ["--after-signing"]:
        sys.exit(after_signing_scenes(*sys.argv[2:]))
    sys.exit(main(*sys.argv[1:]))
