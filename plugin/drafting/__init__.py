"""Drafting: from a complete study in the node's store to a draft DICOM SR.

Modules, in the order a study goes through them:

- :mod:`~plugin.drafting.views`: which image is which view (DICOM headers), one rule with
  :mod:`onnx_models.views`;
- :mod:`~plugin.drafting.pixels`: stored pixels to the model's input (pydicom's LUTs);
- :mod:`~plugin.drafting.indication`: the clinical indication from the request attributes;
- :mod:`~plugin.drafting.input_check`: header checks of the input gate (field of view);
- :mod:`~plugin.drafting.pipeline`: the ``draft`` job handler (:func:`~plugin.drafting.pipeline.handle_job`);
- :mod:`~plugin.drafting.sr`: the TID 2000 Basic Diagnostic Imaging Report (draft and signed);
- :mod:`~plugin.drafting.render`: a Secondary Capture / Encapsulated PDF rendering of a report;
- :mod:`~plugin.drafting.samples`: the sample study shipped for ``cxrnode demo``.
"""
