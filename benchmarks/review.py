"""Reviewer latency: choosing a worklist row -> both views and the draft shown; Sign -> SR committed.

Two-view studies of 2048 x 2048 12-bit DX images are stored through the node's Store and index
and drafted by the real pipeline; the real :class:`gui.window.ReviewerWindow` runs (offscreen
unless ``DISPLAY`` is set). For each study we time

* ``open``: from choosing its worklist row to the ``review_shown`` signal (claim, decode both
  views, window them, fill the draft, and both views painted);
* ``sign``: from Sign to the ``signed`` signal (verified SR built, written durably, indexed,
  audited, queued; the transaction committed).

Peer in the same run: decoding both views with ``plugin.drafting.pixels.prepare`` (the float pipeline
the model uses) at full size, i.e. what opening would cost without the reviewer's LUT path.

Targets (issue 6): p50 open < 500 ms, p50 sign < 1 s. Prints JSON.

    python benchmarks/review.py [--studies 8] [--size 2048] [--workdir DIR] [--fsync]
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


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    k = (len(s) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def summary(values: list[float]) -> dict[str, Any]:
    return {
        "n": len(values),
        "p50_ms": round(statistics.median(values), 1),
        "p95_ms": round(pct(values, 0.95), 1),
        "min_ms": round(min(values), 1),
        "max_ms": round(max(values), 1),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--studies", type=int, default=8)
    ap.add_argument("--size", type=int, default=2048)
    ap.add_argument("--workdir", default="")
    ap.add_argument("--fsync", action="store_true", help="fsync the store as in production (default off)")
    args = ap.parse_args(argv)

    import pydicom
    from PyQt6.QtCore import QEventLoop, QTimer
    from PyQt6.QtWidgets import QApplication
    from support import synthetic

    from gui.highlight import DEID_PLACEHOLDER as deid_placeholder
    from gui.window import ReviewerWindow
    from plugin.drafting import pixels
    from plugin.review.service import ReviewService

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
    w = ReviewerWindow(svc, "alice", refresh_interval_s=0)
    w.confirm = lambda title, text: True
    errors: list[str] = []
    w.show_error = lambda title, text: errors.append(f"{title}: {text}")
    w.resize(1600, 900)
    w.show()

    def wait(signal: Any, ms: int = 60000) -> bool:
        got: list[Any] = []
        loop = QEventLoop()
        signal.connect(lambda *a: (got.append(a), loop.quit()))
        QTimer.singleShot(ms, loop.quit)
        loop.exec()
        return bool(got)

    def settle() -> None:
        w.tasks.wait()
        for _ in range(5):
            app.processEvents()

    wait(w.worklist_refreshed)
    open_ms: list[float] = []
    sign_ms: list[float] = []
    for _ in range(args.studies):
        settle()
        row = next((i for i, r in enumerate(w.worklist_vm.rows) if r.state == "new"), None)
        if row is None:
            break
        t = time.perf_counter()
        w._row_chosen(row)
        if not wait(w.review_shown):
            errors.append("open timed out")
            break
        open_ms.append((time.perf_counter() - t) * 1000)
        settle()
        assert w.review is not None
        w.report.impression.setPlainText(w.review.impression + " Reviewed.")
        # a draft's "xxxx" placeholders must be replaced before the reviewer signs (issue 17)
        w.report.findings.setPlainText(deid_placeholder.sub("bones", w.review.findings))
        t = time.perf_counter()
        w.sign()
        if not wait(w.signed):
            errors.append("sign timed out")
            break
        sign_ms.append((time.perf_counter() - t) * 1000)

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

    w.close()
    result = {
        "benchmark": "review",
        "studies": args.studies,
        "image": f"{args.size}x{args.size} 12-bit DX, 2 views",
        "platform": f"{platform.machine()} {os.cpu_count()} cpu, Qt {os.environ.get('QT_QPA_PLATFORM', 'xcb')}",
        "fsync": bool(args.fsync),
        "setup_s": round(build_s, 1),
        "open_row_to_views_and_draft_shown": summary(open_ms) if open_ms else None,
        "sign_to_verified_sr_committed": summary(sign_ms) if sign_ms else None,
        "peer_decode_both_views_with_plugin_pixels_prepare": summary(peer_ms) if peer_ms else None,
        "targets_ms": {"open_p50": 500, "sign_p50": 1000},
        "meets_targets": bool(open_ms and sign_ms and statistics.median(open_ms) < 500 and statistics.median(sign_ms) < 1000),
        "errors": errors,
    }
    print(json.dumps(result, indent=2))
    node.engine.dispose()
    tmp.cleanup()
    return 0 if not errors else 1


if __name__ == "__main__":
    sys.exit(main())
