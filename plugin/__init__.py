"""cxrnode's plug-in to the DICOM node: what happens to a chest radiograph study after the node
has stored it. Two subpackages, one job each:

- :mod:`plugin.drafting`: from a complete study in the node's store to a draft DICOM
  Structured Report (TID 2000, highdicom): view resolution, pixel preparation, indication
  extraction, the input check, SR building and rendering. Registered with the node as the
  ``draft`` job handler (entry point group ``cxrnode.job_handlers``).
- :mod:`plugin.review`: the review workflow the reviewer window and the tests use: worklist,
  claims, sign, reject, undo, audit (:class:`plugin.review.service.ReviewService`), and
  what a draft's ``token_info`` says besides its words (:mod:`plugin.review.draft_info`).

Neither imports Qt; ``gui`` builds on both (import-linter contracts in ``pyproject.toml``).

``plugin.drafting`` and ``plugin.review`` are loaded on first use (PEP 562): ``import plugin``
loads neither.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from plugin import drafting, review

__all__ = ["drafting", "review"]


def __getattr__(name: str) -> Any:
    if name not in __all__:
        raise AttributeError(f"module 'plugin' has no attribute {name!r}")
    return importlib.import_module(f"plugin.{name}")  # sets the attribute on this package


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
