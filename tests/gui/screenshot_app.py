"""Run the real reviewer window on an X display and save a screenshot of the screen.

Used by ``test_screenshot.py`` under its own Xvfb (``DISPLAY`` set, ``QT_QPA_PLATFORM=xcb``):
``python tests/gui/screenshot_app.py WORKDIR OUT.png``. Five 2-view studies are stored and
drafted by the real pipeline; bob holds one, one is signed; alice opens the oldest.
"""

from __future__ import annotations

import sys
from pathlib import Path

from PyQt6.QtCore import QEventLoop, QTimer
from PyQt6.QtWidgets import QApplication

from gui import synthetic
from gui.window import ReviewerWindow
from plugin.review import ReviewService


def wait(signal: object, ms: int = 60000) -> None:
    loop = QEventLoop()
    signal.connect(loop.quit)  # type: ignore[attr-defined]
    QTimer.singleShot(ms, loop.quit)
    loop.exec()


def main(workdir: str, out: str) -> int:
    root = Path(workdir)
    node = synthetic.build_node(root / "node", synthetic.sample_studies(5, size=1024, prefix="shot"))
    svc = ReviewService(node.config, node.sessions, node.store)
    rows = {r.patient_id: r.draft_id for r in svc.worklist()}
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
    first = next(i for i, r in enumerate(w.worklist_vm.rows) if r.patient_id == "CXR-10001")
    w._row_chosen(first)
    wait(w.review_shown)
    # a touch of real use: a narrower window on the frontal view, an edited impression
    if w.study.views:
        w.study.views[0].drag_window(-250, 60)
    imp = w.report.impression
    imp.setPlainText(imp.toPlainText().replace("No acute cardiopulmonary abnormality.",
                                               "No acute cardiopulmonary abnormality. No pneumonia."))
    w.tasks.wait()
    for _ in range(20):
        app.processEvents()
    screen = app.primaryScreen()
    assert screen is not None
    pixmap = screen.grabWindow(0, 0, 0, 1600, 900)  # what the X server shows
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    if not pixmap.save(out, "PNG"):
        print(f"could not save {out}", file=sys.stderr)
        return 1
    w.confirm = lambda title, text: True  # discard the demo edit on close
    w.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2]))
