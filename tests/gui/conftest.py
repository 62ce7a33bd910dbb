"""GUI test fixtures: Qt offscreen, a node directory drafted by the real pipeline, fresh copies.

``QT_QPA_PLATFORM=offscreen`` is set before anything imports Qt, so the widget tests run
without a screen (the screenshot test starts its own Xvfb).
"""

from __future__ import annotations

import os

os.environ["QT_QPA_PLATFORM"] = "offscreen"  # never a real window here (the screenshot test has its own)

from collections.abc import Callable, Iterator  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
from support import synthetic  # noqa: E402
from support.postgres import private_database

from plugin.review.service import ReviewService  # noqa: E402


@pytest.fixture(autouse=True)
def reviewer_settings(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Each test's reviewer keeps its layout and text size (QSettings, INI) in a fresh folder,
    never in the user's ~/.config: nothing carries over from one test to the next."""
    from PyQt6.QtCore import QSettings

    folder = tmp_path_factory.mktemp("qsettings")
    QSettings.setPath(QSettings.Format.IniFormat, QSettings.Scope.UserScope, str(folder))
    yield folder


@pytest.fixture(scope="session")
def golden_node(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three 2-view studies (512 x 512, 12-bit), drafted once per session by the real pipeline."""
    root = tmp_path_factory.mktemp("gui-golden")
    node = synthetic.build_node(root, synthetic.sample_studies(3, size=512, prefix="gui"))
    node.engine.dispose()
    return root


@pytest.fixture
def node(golden_node: Path, tmp_path: Path) -> Iterator[synthetic.NodeFixture]:
    n = synthetic.open_node(synthetic.copy_node(golden_node, tmp_path / "node"))
    yield n
    n.engine.dispose()


@pytest.fixture
def service(node: synthetic.NodeFixture) -> ReviewService:
    return ReviewService(node.config, node.sessions, node.store)


@pytest.fixture
def make_window(qtbot, service: ReviewService) -> Callable[..., object]:  # type: ignore[no-untyped-def]
    """Build a ReviewerWindow whose dialogs are answered by the test (never modal)."""
    from gui.window import ReviewerWindow

    made: list[ReviewerWindow] = []

    def make(user: str = "alice", svc: ReviewService | None = None, **kwargs: object) -> ReviewerWindow:
        kwargs.setdefault("refresh_interval_s", 0)
        w = ReviewerWindow(svc or service, user, **kwargs)  # type: ignore[arg-type]
        w.errors = []  # type: ignore[attr-defined]
        w.show_error = lambda title, text: w.errors.append((title, text))  # type: ignore[attr-defined]
        w.confirm = lambda title, text: True
        w.ask_reason = lambda: "wrong side marker"
        qtbot.addWidget(w)
        w.resize(1400, 850)
        w.show()
        made.append(w)
        return w

    yield make
    for w in made:
        w.timer.stop()
        w.tasks.wait(10000)


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """A fresh PostgreSQL database on ``CXRNODE_TEST_POSTGRES_URL``'s server (dropped afterwards)."""
    with private_database("gui") as url:
        yield url
