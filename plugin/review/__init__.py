"""Review: the workflow in which a radiologist claims, edits, signs or rejects a draft.

- :mod:`~plugin.review.service`: :class:`~plugin.review.service.ReviewService` (worklist,
  claims, sign, reject, undo, audit) and the typed rows it returns;
- :mod:`~plugin.review.draft_info`: what a draft's ``token_info`` says besides its words
  (input gate outcome, observation probabilities and their thresholds).

Qt-free and usable without the reviewer window (tests and scripts drive it directly).
"""
