"""Start the Qt application and show the reviewer window (imported by ``cxrnode review`` only)."""

from __future__ import annotations

import sys

from PyQt6.QtWidgets import QApplication

from gui.window import ReviewerWindow
from plugin.review.service import ReviewService


def run(service: ReviewService, user: str, study_uid: str = "", refresh_interval_s: float = 15.0) -> int:
    app = QApplication.instance() or QApplication(sys.argv[:1])
    assert isinstance(app, QApplication)
    app.setApplicationName("cxrnode reviewer")
    app.setStyle("Fusion")
    window = ReviewerWindow(service, user, refresh_interval_s=refresh_interval_s, study_uid=study_uid)
    window.show()
    return int(app.exec())
