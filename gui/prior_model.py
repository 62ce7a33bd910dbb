"""The prior study beside the current one, Qt-free: what the prior panel says and shows, and the
rule that links window/level and zoom between a current view and a prior view.

:func:`load_prior` (blocking, run with the draft's views in :func:`gui.viewmodels.open_review`)
asks the review service for the draft's prior (:meth:`ReviewService.prior`) and decodes its views
through the same :func:`gui.imaging.load_picture` as the current ones. The prior is read-only and
dated: :meth:`PriorModel.header` says so in one line ("PRIOR 2010-01-15 · 433 days earlier ·
READ-ONLY").

Linking: two films of one patient are seldom in the same units (another detector, another bit
depth), so a window is linked *relative to each image's own window*: the current view's width as
a multiple of its default width, and its level offset in default widths, are applied to the
prior's default window (:func:`linked_window`). Zoom and pan are linked as they are (zoom is
relative to fit already).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import pydicom.errors

from gui import imaging
from plugin.review.priors import NO_PRIOR, PriorDetail, age_days, format_date
from plugin.review.service import ReviewService

REPORT_KINDS = {"sr": "structured report", "text": "text report", "pdf": "PDF report"}


@dataclass
class PriorModel:
    """One draft's prior, loaded.

    Attributes
    ----------
    detail:
        What the service says of the prior (:class:`plugin.review.priors.PriorDetail`).
    current_study_date:
        The current study's date (DA), to say how old the prior is.
    pictures:
        The prior's views, decoded.
    errors:
        Views that could not be decoded, and why.
    """

    detail: PriorDetail
    current_study_date: str = ""
    pictures: list[imaging.Picture] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    @property
    def found(self) -> bool:
        return self.detail.found

    def header(self) -> str:
        """The panel's title: what the prior is, how old, and that it is read-only."""
        d = self.detail
        if not d.found:
            return NO_PRIOR if d.outcome == "none" else "No prior shown"
        days = age_days(d.study_date, self.current_study_date)
        when = f"{days} days earlier" if days is not None and days >= 0 else ""
        parts = ["PRIOR " + format_date(d.study_date), when, d.study_description, "READ-ONLY"]
        return " · ".join(p for p in parts if p)

    def message(self) -> str:
        """Why no prior is shown (empty when one is)."""
        return "" if self.detail.found else self.detail.message

    def report_title(self) -> str:
        d = self.detail
        if not d.found:
            return ""
        kind = REPORT_KINDS.get(d.report_kind, "no report")
        return f"Prior report ({format_date(d.study_date)}, {kind}, read-only)"

    def report_text(self) -> str:
        return self.detail.report_text if self.detail.found else ""


def load_prior(service: ReviewService, draft_id: int, current_study_date: str,
               progress: Callable[[int, int, str], None] | None = None) -> PriorModel:
    """*Blocking*: the draft's prior with its views decoded (errors listed, never raised)."""
    model = PriorModel(service.prior(draft_id), current_study_date)
    total = len(model.detail.images)
    for i, img in enumerate(model.detail.images):
        if progress:
            progress(i, total, "Loading the prior's views")
        try:
            model.pictures.append(imaging.load_picture(img.path, view=f"PRIOR {img.view or '?'}"))
        except (OSError, ValueError, pydicom.errors.InvalidDicomError) as exc:
            model.errors.append(f"prior {img.sop_instance_uid}: cannot display: {exc}")
    return model


def linked_window(source: imaging.ViewState, target: imaging.Picture) -> imaging.WindowLevel | None:
    """The target's window matching the source's change from its own default (None: as sent)."""
    if source.window is None:
        return None
    d = source.picture.default_window
    width_ratio = source.window.width / max(d.width, 1e-6)
    offset = (source.window.center - d.center) / max(d.width, 1e-6)
    t = target.default_window
    return imaging.WindowLevel(t.center + offset * t.width, max(1.0, t.width * width_ratio))


def safe_load_prior(service: ReviewService, draft_id: int, current_study_date: str,
                    progress: Callable[[int, int, str], None] | None = None) -> PriorModel:
    """:func:`load_prior`, but a failure (database, store) becomes a panel that says so: the
    prior is a help for comparison and never stops a draft from opening."""
    try:
        return load_prior(service, draft_id, current_study_date, progress)
    except Exception as exc:
        return PriorModel(PriorDetail("unavailable", f"The prior could not be loaded: {type(exc).__name__}: {exc}"),
                          current_study_date)
