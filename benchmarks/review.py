"""Reviewer: keys and milliseconds from a study shown to it signed and the next one shown
(Sign & next), for an unchanged AI draft and for an edited one.

Two-view studies of 2048 x 2048 12-bit DX images are stored through the node's Store and index
and drafted by the real pipeline; the real :class:`gui.window.ReviewerWindow` runs (offscreen
unless ``DISPLAY`` is set) and is driven with key events only (``QTest.keyClick`` on the widget
that has the focus, so every key goes through Qt's shortcut handling as a real one would). The
sign question is the window's real dialog, answered with keys. Studies are taken in worklist
order, as Sign & next opens them:

* **unchanged**: a draft without ``xxxx`` placeholders, signed as drafted. The first ones are
  asked about (F12, Enter: 2 keys); at one the reviewer ticks "Don't ask again for unchanged
  drafts this session" (F12, Alt+D, Enter: 3 keys); after that F12 alone (1 key).
* **edited**: the findings replaced by typing a short text (Ctrl+A, the text), then F12,
  Enter (an edited report is always asked about). A draft holding ``xxxx`` is always edited.

For each study: ``keys`` pressed, ``open_to_next_ms`` from the study shown (``review_shown``) to
the next one shown, which includes the simulated keys but no human reading time (the window's
guard against a double press, ``min_dwell_s``, is set to 0 for this reason), and its parts
``sign_ms`` (last key to the verified SR committed, the ``signed`` signal) and ``next_open_ms``
(``signed`` to the next study's views and draft painted: claim, decode, window, fill).

Peer in the same run: decoding both views with ``plugin.drafting.pixels.prepare`` (the float
pipeline the model uses) at full size, i.e. what opening would cost without the reviewer's LUT
path. Targets (issues 6 and 17): p50 open < 500 ms, p50 sign < 1 s, an unchanged draft signed
and the next one open in two key presses. Prints JSON (``benchmarks/results/review.json``).

    python benchmarks/review.py [--studies 12] [--size 2048] [--workdir DIR] [--fsync]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))  # support.synthetic: the test fixtures
if not os.environ.get("DISPLAY"):
    os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

EDIT_TEXT = "Heart size normal. Lungs clear. No effusion or pneumothorax."


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    k = (len(s) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def summary(values: list[float]) -> dict[str, Any]:
    if not values:
        return {"n": 0}
    return {
        "n": len(values),
        "p50_ms": round(statistics.median(values), 1),
        "p95_ms": round(pct(values, 0.95), 1),
        "min_ms": round(min(values), 1),
        "max_ms": round(max(values), 1),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--studies", type=int, default=12)
    ap.add_argument("--size", type=int, default=2048)
    ap.add_argument("--workdir", default="")
    ap.add_argument("--fsync", action="store_true", help="fsync the store as in production (default off)")
    ap.add_argument("--asked", type=int, default=3, help="unchanged drafts asked about before opting out")
    args = ap.parse_args(argv)

    import pydicom
    from PyQt6.QtCore import QEventLoop, QSettings, Qt, QTimer
    from PyQt6.QtTest import QTest as _QTest
    from PyQt6.QtWidgets import QApplication, QMessageBox
    from support import synthetic

    from gui.highlight import DEID_PLACEHOLDER
    from gui.window import ReviewerWindow
    from plugin.drafting import pixels
    from plugin.review.service import ReviewService

    QTest: Any = _QTest  # (PyQt6's stubs type its static methods as instance methods)
    tmp = tempfile.TemporaryDirectory(prefix="cxrnode-bench-review-")
    root = Path(args.workdir or tmp.name) / "node"
    t0 = time.perf_counter()
    node = synthetic.build_node(root, synthetic.sample_studies(args.studies, size=args.size, prefix="bench"))
    if args.fsync:  # the fixture node runs without fsync; sign through a durable store as in production
        from dicom_node.store import Store

        node.store = Store(node.config.node.storage_dir, fsync=True)
    build_s = time.perf_counter() - t0
    svc = ReviewService(node.config, node.sessions, node.store)

    app = QApplication.instance() or QApplication(sys.argv[:1])
    assert isinstance(app, QApplication)
    QSettings.setPath(QSettings.Format.IniFormat, QSettings.Scope.UserScope, str(Path(tmp.name) / "settings"))
    w = ReviewerWindow(svc, "alice", refresh_interval_s=0)
    w.min_dwell_s = 0.0  # no human reading time in a benchmark (see the docstring)
    errors: list[str] = []
    w.show_error = lambda title, text: errors.append(f"{title}: {text}")
    w.resize(1600, 900)
    w.show()
    QApplication.setActiveWindow(w)

    def wait(signal: Any, ms: int = 60000) -> bool:
        got: list[Any] = []
        loop = QEventLoop()
        def done(*a: Any) -> None:
            got.append(a)
            loop.quit()

        signal.connect(done)
        QTimer.singleShot(ms, loop.quit)
        loop.exec()
        signal.disconnect(done)
        return bool(got)

    def settle() -> None:
        w.tasks.wait()
        for _ in range(5):
            app.processEvents()

    def press(key: Qt.Key, mod: Qt.KeyboardModifier = Qt.KeyboardModifier.NoModifier) -> None:
        QTest.keyClick(app.focusWidget() or w, key, mod)

    answers: list[list[tuple[Qt.Key, Qt.KeyboardModifier]]] = []  # keys for the next question
    answered: list[float] = []  # when each of the question's keys was pressed

    def answer_question() -> None:
        box = QApplication.activeModalWidget()
        if not isinstance(box, QMessageBox):
            QTimer.singleShot(5, answer_question)
            return
        QApplication.setActiveWindow(box)  # as on a desktop: the question has the keyboard
        keys = answers.pop(0) if answers else [(Qt.Key.Key_Escape, Qt.KeyboardModifier.NoModifier)]
        for key, mod in keys:
            if mod & Qt.KeyboardModifier.AltModifier:
                QTest.keyClick(box, key, mod)
                answered.append(time.perf_counter())
                QTest.qWait(120)  # a mnemonic ticks its check box after 100 ms
            else:
                answered.append(time.perf_counter())
                QTest.keyClick(box, key, mod)
        QTimer.singleShot(0, lambda: QApplication.setActiveWindow(w))

    wait(w.worklist_refreshed)
    settle()
    enter = (Qt.Key.Key_Return, Qt.KeyboardModifier.NoModifier)
    alt_d = (Qt.Key.Key_D, Qt.KeyboardModifier.AltModifier)
    # the first study, chosen in the worklist (not counted: every session starts with one)
    first = next((i for i, r in enumerate(w.worklist_vm.rows) if r.state == "new"), None)
    if first is None:
        errors.append("no study waiting")
    else:
        t = time.perf_counter()
        w._row_chosen(first)
        if not wait(w.review_shown):
            errors.append("first open timed out")
    prev_shown = time.perf_counter()
    first_open_ms = (prev_shown - t) * 1000 if first is not None else 0.0
    settle()
    studies: list[dict[str, Any]] = []
    unchanged_seen = 0
    while w.review is not None and not w.review.is_final and not errors:
        vm = w.review
        shown_at = prev_shown  # the window's own work after showing it (refresh) counts too
        keys = 0
        answered.clear()
        has_placeholder = bool(DEID_PLACEHOLDER.search(vm.findings + "\n" + vm.impression))
        if has_placeholder or len(studies) % 3 == 2:  # every third study edited, for a sample of both
            kind = "edited"
            w.report.findings.setFocus()
            press(Qt.Key.Key_A, Qt.KeyboardModifier.ControlModifier)
            QTest.keyClicks(w.report.findings, EDIT_TEXT)
            keys += 1 + len(EDIT_TEXT)
            if DEID_PLACEHOLDER.search(vm.impression):
                press(Qt.Key.Key_Tab)
                press(Qt.Key.Key_A, Qt.KeyboardModifier.ControlModifier)
                QTest.keyClicks(w.report.impression, "No acute abnormality.")
                keys += 2 + len("No acute abnormality.")
            answers.append([enter])
        elif w.skip_unchanged_confirmation:
            kind = "unchanged, not asked (opted out this session)"
        elif unchanged_seen < args.asked:
            kind = "unchanged, asked (F12, Enter)"
            answers.append([enter])
        else:
            kind = "unchanged, opting out (F12, Alt+D, Enter)"
            answers.append([alt_d, enter])
        if kind != "edited":
            unchanged_seen += 1
        if answers:
            QTimer.singleShot(0, answer_question)
        signed_at: list[float] = []

        def on_signed(*_: Any, signed_at: list[float] = signed_at) -> None:
            signed_at.append(time.perf_counter())

        w.signed.connect(on_signed)
        expect_next = bool(w.worklist_vm.open_rows_after(vm.detail.draft_id))
        t_key = time.perf_counter()
        press(Qt.Key.Key_F12)
        keys += 1
        if not signed_at and not wait(w.signed):
            errors.append(f"sign timed out ({kind})")
            break
        w.signed.disconnect(on_signed)
        keys += len(answered)
        last_key = answered[-1] if answered else t_key  # sign_ms: from the last key pressed
        next_shown = wait(w.review_shown) if expect_next else False
        t_end = prev_shown = time.perf_counter()
        studies.append({
            "kind": kind,
            "keys": keys,
            "open_to_next_ms": round((t_end - shown_at) * 1000, 1),
            "sign_ms": round((signed_at[0] - last_key) * 1000, 1),
            "next_open_ms": round((t_end - signed_at[0]) * 1000, 1) if next_shown else None,
        })
        settle()
        if not next_shown:
            break  # nothing else is waiting
        if w.review is vm:
            errors.append("Sign & next did not move on")
            break

    # peer: the float pipeline on both views of each study
    peer_ms: list[float] = []
    for r in svc.worklist(states=None)[: args.studies]:
        if r.draft_id is None:
            continue
        d = svc.detail(r.draft_id)
        t = time.perf_counter()
        for v in d.views:
            if v.path is not None:
                pixels.prepare(pydicom.dcmread(v.path))
        peer_ms.append((time.perf_counter() - t) * 1000)

    w.confirm = lambda title, text: True
    w.close()

    def group(prefix: str) -> dict[str, Any]:
        rows = [s for s in studies if s["kind"].startswith(prefix)]
        return {
            "studies": len(rows),
            "keys": sorted({s["keys"] for s in rows}),
            "open_to_signed_and_next": summary([s["open_to_next_ms"] for s in rows if s["next_open_ms"] is not None]),
        }

    unchanged_keys = [s["keys"] for s in studies if s["kind"].startswith("unchanged")]
    sign_ms = [s["sign_ms"] for s in studies]
    open_ms = [s["next_open_ms"] for s in studies if s["next_open_ms"] is not None]
    result = {
        "benchmark": "review: keys and ms from a study shown to it signed and the next one shown (Sign & next)",
        "command": "python3 benchmarks/review.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "studies": args.studies,
        "image": f"{args.size}x{args.size} 12-bit DX, 2 views",
        "platform": f"{platform.machine()} {os.cpu_count()} cpu, Qt {os.environ.get('QT_QPA_PLATFORM', 'xcb')}",
        "fsync": bool(args.fsync),
        "load_average_1_5_15_min_at_end": [round(x, 2) for x in os.getloadavg()],
        "setup_s": round(build_s, 1),
        "note": "machine time with simulated keys, no human reading time; the double-press guard "
                "(min_dwell_s) is 0 here; the edited report's typing is QTest.keyClicks of "
                f"{len(EDIT_TEXT)} characters",
        "first_open_from_worklist_ms": round(first_open_ms, 1),
        "unchanged_asked": group("unchanged, asked"),
        "unchanged_opting_out": group("unchanged, opting out"),
        "unchanged_not_asked": group("unchanged, not asked"),
        "edited": group("edited"),
        "sign_key_to_verified_sr_committed": summary(sign_ms),
        "signed_to_next_study_shown": summary(open_ms),
        "peer_decode_both_views_with_plugin_pixels_prepare": summary(peer_ms),
        "per_study": studies,
        "targets": {"open_p50_ms": 500, "sign_p50_ms": 1000, "unchanged_keys_max": 2},
        "meets_targets": bool(sign_ms and open_ms and unchanged_keys and statistics.median(open_ms) < 500
                              and statistics.median(sign_ms) < 1000 and max(
                                  s["keys"] for s in studies if s["kind"].startswith("unchanged, asked")
                                  or s["kind"].startswith("unchanged, not asked")) <= 2),
        "errors": errors,
    }
    print(json.dumps(result, indent=2))
    node.engine.dispose()
    tmp.cleanup()
    return 0 if not errors else 1


if __name__ == "__main__":
    sys.exit(main())
