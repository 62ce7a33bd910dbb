"""The DICOM node: configuration, Storage SCP and SCU (pynetdicom), the durable file store,
the study index and its migrations (SQLAlchemy + Alembic), the job queue that turns quiet
studies into report-drafting jobs, the outbound transfer queue, and the ``serve`` and
``status`` commands. It is the only package that speaks DIMSE; it knows nothing of models,
reports or Qt.
"""
