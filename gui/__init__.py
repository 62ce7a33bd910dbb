"""The PyQt6 reviewer: worklist, side-by-side views with window/level, the indication and
the editable draft, and sign-off. Qt-free view-models hold the logic; the widgets are thin.
The only package that imports PyQt6.

Modules:

- Qt-free: :mod:`~gui.viewmodels` (:class:`WorklistModel`, :class:`ReviewModel`,
  :func:`open_review`), :mod:`~gui.highlight` (the reviewer's marks: ``highlight.highlight``,
  :class:`HighlightPolicy`, :class:`Span`), :mod:`~gui.imaging` (pictures and window/level),
  :mod:`~gui.presets`, :mod:`~gui.keys`, :mod:`~gui.prior_model` (:class:`PriorModel`);
- Qt: :mod:`~gui.window` (:class:`ReviewerWindow`), :mod:`~gui.widgets`,
  :mod:`~gui.after_signing`, :mod:`~gui.priors_panel` (:class:`PriorPanel`),
  :mod:`~gui.templates` (:class:`TemplateHook`, :class:`TemplatePicker`),
  :mod:`~gui.critical_notice`, :mod:`~gui.tools`, :mod:`~gui.app`;
- commands: :mod:`~gui.cli` (``cxrnode review``, ``cxrnode worklist``;
  :func:`display_problem`), :mod:`~gui.templates_cli` (``cxrnode templates``).

The names in ``__all__`` are importable from the package (``from gui import ReviewModel``);
each is loaded on first use (PEP 562), so ``import gui`` does not load PyQt6 (the Qt-free
models do not load it either).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from gui.cli import display_problem
    from gui.highlight import HighlightPolicy, Span
    from gui.prior_model import PriorModel
    from gui.priors_panel import PriorPanel
    from gui.templates import TemplateHook, TemplatePicker
    from gui.viewmodels import ReviewModel, WorklistModel, open_review
    from gui.window import ReviewerWindow

#: each public name -> the module that defines it (loaded on first use)
_EXPORTS: dict[str, str] = {
    "display_problem": "gui.cli",
    "HighlightPolicy": "gui.highlight",
    "Span": "gui.highlight",
    "PriorModel": "gui.prior_model",
    "PriorPanel": "gui.priors_panel",
    "TemplateHook": "gui.templates",
    "TemplatePicker": "gui.templates",
    "ReviewModel": "gui.viewmodels",
    "WorklistModel": "gui.viewmodels",
    "open_review": "gui.viewmodels",
    "ReviewerWindow": "gui.window",
}

__all__ = [
    "HighlightPolicy",
    "PriorModel",
    "PriorPanel",
    "ReviewModel",
    "ReviewerWindow",
    "Span",
    "TemplateHook",
    "TemplatePicker",
    "WorklistModel",
    "display_problem",
    "open_review",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'gui' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # loaded once
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
