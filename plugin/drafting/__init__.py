"""Drafting: from a complete study in the node's store to a draft DICOM SR.

Modules, in the order a study goes through them:

- :mod:`~plugin.drafting.views`: which image is which view (DICOM headers), one rule with
  :mod:`onnx_models.views` (:func:`select_images`, :func:`view_from_tags`, :func:`resolve_view`);
- :mod:`~plugin.drafting.pixels`: stored pixels to the model's input (pydicom's LUTs);
- :mod:`~plugin.drafting.indication`: the clinical indication from the request attributes
  (:class:`Indication`);
- :mod:`~plugin.drafting.input_check`: header checks of the input gate
  (:func:`field_of_view_problem`);
- :mod:`~plugin.drafting.priors`: the patient's prior studies, fetched while the model runs;
- :mod:`~plugin.drafting.pipeline`: the ``draft`` job handler (:func:`handle_job`);
- :mod:`~plugin.drafting.sr`: the TID 2000 Basic Diagnostic Imaging Report (draft, signed,
  addendum, no-AI draft: :func:`build_draft_sr`, :func:`build_signed_sr`,
  :func:`build_addendum_sr`, :func:`build_no_ai_draft_sr`; :func:`read_report` reads one back);
- :mod:`~plugin.drafting.render`: a Secondary Capture / Encapsulated PDF rendering of a report;
- :mod:`~plugin.drafting.samples`: the sample study shipped for ``cxrnode demo``.

The names in ``__all__`` are importable from the package (``from plugin.drafting import
handle_job``); each is loaded on first use (PEP 562).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from plugin.drafting.indication import Indication, IndicationError
    from plugin.drafting.input_check import field_of_view_problem
    from plugin.drafting.pipeline import handle_job
    from plugin.drafting.pixels import PixelError, PixelOptions, PreparedImage
    from plugin.drafting.render import RenderError
    from plugin.drafting.sr import (
        AddendumText,
        CriticalCommunication,
        DraftContent,
        PriorComparison,
        ReportText,
        SRError,
        build_addendum_sr,
        build_draft_sr,
        build_no_ai_draft_sr,
        build_signed_sr,
        deterministic_uid,
        read_report,
    )
    from plugin.drafting.views import (
        InstanceHeader,
        ResolvedView,
        Selection,
        TagView,
        resolve_view,
        select_images,
        view_from_tags,
    )

#: each public name -> the module that defines it (loaded on first use)
_EXPORTS: dict[str, str] = {
    "Indication": "plugin.drafting.indication",
    "IndicationError": "plugin.drafting.indication",
    "field_of_view_problem": "plugin.drafting.input_check",
    "handle_job": "plugin.drafting.pipeline",
    "PixelError": "plugin.drafting.pixels",
    "PixelOptions": "plugin.drafting.pixels",
    "PreparedImage": "plugin.drafting.pixels",
    "RenderError": "plugin.drafting.render",
    "AddendumText": "plugin.drafting.sr",
    "CriticalCommunication": "plugin.drafting.sr",
    "DraftContent": "plugin.drafting.sr",
    "PriorComparison": "plugin.drafting.sr",
    "ReportText": "plugin.drafting.sr",
    "SRError": "plugin.drafting.sr",
    "build_addendum_sr": "plugin.drafting.sr",
    "build_draft_sr": "plugin.drafting.sr",
    "build_no_ai_draft_sr": "plugin.drafting.sr",
    "build_signed_sr": "plugin.drafting.sr",
    "deterministic_uid": "plugin.drafting.sr",
    "read_report": "plugin.drafting.sr",
    "InstanceHeader": "plugin.drafting.views",
    "ResolvedView": "plugin.drafting.views",
    "Selection": "plugin.drafting.views",
    "TagView": "plugin.drafting.views",
    "resolve_view": "plugin.drafting.views",
    "select_images": "plugin.drafting.views",
    "view_from_tags": "plugin.drafting.views",
}

__all__ = [
    "AddendumText",
    "CriticalCommunication",
    "DraftContent",
    "Indication",
    "IndicationError",
    "InstanceHeader",
    "PixelError",
    "PixelOptions",
    "PreparedImage",
    "PriorComparison",
    "RenderError",
    "ReportText",
    "ResolvedView",
    "SRError",
    "Selection",
    "TagView",
    "build_addendum_sr",
    "build_draft_sr",
    "build_no_ai_draft_sr",
    "build_signed_sr",
    "deterministic_uid",
    "field_of_view_problem",
    "handle_job",
    "read_report",
    "resolve_view",
    "select_images",
    "view_from_tags",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'plugin.drafting' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # loaded once
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
