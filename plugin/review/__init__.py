"""Review: the workflow in which a radiologist claims, edits, signs or rejects a draft, and
what happens after signing.

- :mod:`~plugin.review.service`: :class:`ReviewService` (worklist, claims, sign, reject, undo,
  audit), the rows it returns (:class:`WorklistRow`, :class:`DraftDetail`) and its errors
  (:class:`ReviewError` and its subclasses);
- :mod:`~plugin.review.results`: the typed results of sign, reject, addenda and retries
  (:class:`SignResult`, :class:`RejectResult`, ...), never ORM rows;
- :mod:`~plugin.review.connect`: a service from a configuration (:func:`open_service`);
- :mod:`~plugin.review.draft_info`: what a draft's ``token_info`` says besides its words
  (input gate outcome, observation probabilities and their thresholds);
- :mod:`~plugin.review.critical`: the one table of critical observations
  (:func:`critical_findings`);
- :mod:`~plugin.review.addenda` and :mod:`~plugin.review.scratch`: after signing (addenda,
  the report record) and studies without a draft (report from scratch, retry drafting);
- :mod:`~plugin.review.priors`: the prior study shown beside a draft (:class:`PriorDetail`);
- :mod:`~plugin.review.templates`: the reviewers' report templates (:class:`TemplateLibrary`).

Qt-free and usable without the reviewer window (tests and scripts drive it directly). The
names in ``__all__`` are importable from the package (``from plugin.review import
ReviewService``); each is loaded on first use (PEP 562).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from plugin.review.addenda import (
        AddendumConflictError,
        ReportRecord,
        add_addendum,
        report_record,
    )
    from plugin.review.connect import open_service, open_sessions
    from plugin.review.critical import (
        CRITICAL_RULES,
        CriticalFinding,
        CriticalRule,
        critical_findings,
    )
    from plugin.review.draft_info import InputCheck, ObservationCall, ViewCheck, decision_thresholds
    from plugin.review.priors import PriorDetail, PriorImage
    from plugin.review.results import (
        AddendumResult,
        CriticalNotice,
        RejectResult,
        RetryResult,
        SignResult,
    )
    from plugin.review.scratch import report_from_scratch, retry_drafting, study_detail
    from plugin.review.service import (
        ClaimConflictError,
        DraftDetail,
        NotReviewableError,
        PlaceholderError,
        ReviewError,
        ReviewService,
        StudyChangedError,
        SupersededError,
        UndoExpiredError,
        UnknownReviewerError,
        UntrustedConfigError,
        ViewRef,
        WorklistRow,
        current_user,
        read_installed_config,
        text_diff,
    )
    from plugin.review.templates import (
        ImportResult,
        Template,
        TemplateError,
        TemplateLibrary,
        TemplatePermissionError,
        expansion,
    )

#: each public name -> the module that defines it (loaded on first use)
_EXPORTS: dict[str, str] = {
    "AddendumConflictError": "plugin.review.addenda",
    "ReportRecord": "plugin.review.addenda",
    "add_addendum": "plugin.review.addenda",
    "report_record": "plugin.review.addenda",
    "open_service": "plugin.review.connect",
    "open_sessions": "plugin.review.connect",
    "CRITICAL_RULES": "plugin.review.critical",
    "CriticalFinding": "plugin.review.critical",
    "CriticalRule": "plugin.review.critical",
    "critical_findings": "plugin.review.critical",
    "InputCheck": "plugin.review.draft_info",
    "ObservationCall": "plugin.review.draft_info",
    "ViewCheck": "plugin.review.draft_info",
    "decision_thresholds": "plugin.review.draft_info",
    "PriorDetail": "plugin.review.priors",
    "PriorImage": "plugin.review.priors",
    "AddendumResult": "plugin.review.results",
    "CriticalNotice": "plugin.review.results",
    "RejectResult": "plugin.review.results",
    "RetryResult": "plugin.review.results",
    "SignResult": "plugin.review.results",
    "report_from_scratch": "plugin.review.scratch",
    "retry_drafting": "plugin.review.scratch",
    "study_detail": "plugin.review.scratch",
    "ClaimConflictError": "plugin.review.service",
    "DraftDetail": "plugin.review.service",
    "NotReviewableError": "plugin.review.service",
    "PlaceholderError": "plugin.review.service",
    "ReviewError": "plugin.review.service",
    "ReviewService": "plugin.review.service",
    "StudyChangedError": "plugin.review.service",
    "SupersededError": "plugin.review.service",
    "UndoExpiredError": "plugin.review.service",
    "UnknownReviewerError": "plugin.review.service",
    "UntrustedConfigError": "plugin.review.service",
    "ViewRef": "plugin.review.service",
    "WorklistRow": "plugin.review.service",
    "current_user": "plugin.review.service",
    "read_installed_config": "plugin.review.service",
    "text_diff": "plugin.review.service",
    "ImportResult": "plugin.review.templates",
    "Template": "plugin.review.templates",
    "TemplateError": "plugin.review.templates",
    "TemplateLibrary": "plugin.review.templates",
    "TemplatePermissionError": "plugin.review.templates",
    "expansion": "plugin.review.templates",
}

__all__ = [
    "AddendumConflictError",
    "AddendumResult",
    "CRITICAL_RULES",
    "ClaimConflictError",
    "CriticalFinding",
    "CriticalNotice",
    "CriticalRule",
    "DraftDetail",
    "ImportResult",
    "InputCheck",
    "NotReviewableError",
    "ObservationCall",
    "PlaceholderError",
    "PriorDetail",
    "PriorImage",
    "RejectResult",
    "ReportRecord",
    "RetryResult",
    "ReviewError",
    "ReviewService",
    "SignResult",
    "StudyChangedError",
    "SupersededError",
    "Template",
    "TemplateError",
    "TemplateLibrary",
    "TemplatePermissionError",
    "UndoExpiredError",
    "UnknownReviewerError",
    "UntrustedConfigError",
    "ViewCheck",
    "ViewRef",
    "WorklistRow",
    "add_addendum",
    "critical_findings",
    "current_user",
    "decision_thresholds",
    "expansion",
    "open_service",
    "open_sessions",
    "read_installed_config",
    "report_from_scratch",
    "report_record",
    "retry_drafting",
    "study_detail",
    "text_diff",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'plugin.review' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # loaded once
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
