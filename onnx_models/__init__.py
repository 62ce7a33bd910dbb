"""Report-generation models: the bundle format (manifest, ONNX graphs, tokenizer, model
card), the ONNX Runtime generator used at run time, the input gate, the report labeller, the
reference torch model with its training, export and evaluation. Only the offline tooling
(``train``, ``train_findings``, ``export``, ``torch_model``, ``import_hf*``) imports torch or
transformers; the runtime needs numpy, onnxruntime and tokenizers only.

Modules, by what they own:

- :mod:`~onnx_models.bundle`: the bundle format (:func:`load_bundle`, :class:`Bundle`,
  :class:`BundleError`);
- :mod:`~onnx_models.runtime`: the generator (:class:`ReportGenerator`, :class:`StudyInput`,
  :class:`GeneratedReport`), the only owner of resizing and normalising model input
  (:mod:`~onnx_models.imaging`);
- :mod:`~onnx_models.input_gate`: whether a film is like the training data (:func:`decide`,
  :class:`GateDecision`, :class:`ViewCheck`); statistics by :mod:`~onnx_models.gate_calibration`;
- :mod:`~onnx_models.labels`: the report labeller, stdlib-only (:func:`label`,
  :func:`mentions`, :class:`Presence`, ``OBSERVATIONS``, ``SNOMED``);
- :mod:`~onnx_models.consistency`: contradictions, duplicates and fragments in a report;
- :mod:`~onnx_models.views`: view names and the one view rule (:func:`view_from_position`);
- :mod:`~onnx_models.tokenizer`, :mod:`~onnx_models.card`: word pieces and the model card;
- offline tooling: :mod:`~onnx_models.data`, :mod:`~onnx_models.train`,
  :mod:`~onnx_models.train_findings`, :mod:`~onnx_models.export`,
  :mod:`~onnx_models.evaluate`, :mod:`~onnx_models.import_hf` (and its families),
  :mod:`~onnx_models.torch_model`, :mod:`~onnx_models.cli`.

The names in ``__all__`` are importable from the package (``from onnx_models import
load_bundle``); each is loaded on first use (PEP 562), so importing the package loads neither
onnxruntime nor torch nor transformers.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from onnx_models.bundle import Bundle, BundleError, available_bundles, load_bundle
    from onnx_models.input_gate import GateDecision, ViewCheck, decide
    from onnx_models.labels import (
        OBSERVATIONS,
        SNOMED,
        Mention,
        Presence,
        label,
        mentions,
        sentences,
    )
    from onnx_models.runtime import GeneratedReport, ReportGenerator, StudyInput
    from onnx_models.views import view_from_position

#: each public name -> the module that defines it (loaded on first use)
_EXPORTS: dict[str, str] = {
    "Bundle": "onnx_models.bundle",
    "BundleError": "onnx_models.bundle",
    "available_bundles": "onnx_models.bundle",
    "load_bundle": "onnx_models.bundle",
    "GateDecision": "onnx_models.input_gate",
    "ViewCheck": "onnx_models.input_gate",
    "decide": "onnx_models.input_gate",
    "OBSERVATIONS": "onnx_models.labels",
    "SNOMED": "onnx_models.labels",
    "Mention": "onnx_models.labels",
    "Presence": "onnx_models.labels",
    "label": "onnx_models.labels",
    "mentions": "onnx_models.labels",
    "sentences": "onnx_models.labels",
    "GeneratedReport": "onnx_models.runtime",
    "ReportGenerator": "onnx_models.runtime",
    "StudyInput": "onnx_models.runtime",
    "view_from_position": "onnx_models.views",
}

__all__ = [
    "Bundle",
    "BundleError",
    "GateDecision",
    "GeneratedReport",
    "Mention",
    "OBSERVATIONS",
    "Presence",
    "ReportGenerator",
    "SNOMED",
    "StudyInput",
    "ViewCheck",
    "available_bundles",
    "decide",
    "label",
    "load_bundle",
    "mentions",
    "sentences",
    "view_from_position",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'onnx_models' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # loaded once
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
