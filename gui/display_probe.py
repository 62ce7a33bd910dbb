"""``python -m gui.display_probe``: can the reviewer open a window here? Run by ``cxrnode doctor``
in a subprocess (doctor never imports Qt, and Qt aborts the process it fails in).

Exit 0 and print Qt's platform plugin name when it loads; exit 3 and print the problem when
:func:`gui.cli.display_problem` finds one before Qt is touched (no display, missing libraries);
any other exit is Qt's own failure (its message on standard error).
"""

from __future__ import annotations

import sys


def main() -> int:
    from gui.cli import display_problem

    problem = display_problem()
    if problem:
        print(problem)
        return 3
    from PyQt6.QtGui import QGuiApplication

    app = QGuiApplication(sys.argv[:1])
    print(app.platformName())
    return 0


if __name__ == "__main__":
    sys.exit(main())
