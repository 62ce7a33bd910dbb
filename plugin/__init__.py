"""The report-drafting pipeline: from a complete study in the node's store to a draft DICOM
Structured Report (TID 2000, highdicom). View selection, pixel preparation, indication
extraction, the rule-based findings labeller, SR building (draft and signed), and the review
service the GUI and the tests use to claim, sign and reject drafts.
"""
