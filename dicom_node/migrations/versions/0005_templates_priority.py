"""report templates/macros and study priority (issue 17)

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-28 09:00:00

* ``studies.priority``: STAT / ED / inpatient / outpatient, or '' when the request said nothing
  (``dicom_node.priority``); set by the index from each received instance. Studies indexed before
  this revision read '' (not stated) until a new instance of theirs arrives.
* ``report_templates``: the reviewers' text snippets (trigger word, optional slot 1-9, name, text,
  who changed it last and when); changes are audited in ``audit_events`` by
  ``plugin.review.templates``. Empty after the upgrade: a site imports its set (or the shipped
  chest set) with ``cxrnode templates import``.

``op.add_column`` is a plain ``ALTER TABLE ... ADD COLUMN`` on both SQLite and PostgreSQL: no
table is rebuilt (``audit_events`` and its append-only triggers are not touched).
"""
import sqlalchemy as sa
from alembic import op

revision = '0005'
down_revision = '0004'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column('studies', sa.Column('priority', sa.String(length=16), nullable=False, server_default=''))
    op.create_table(
        'report_templates',
        sa.Column('id', sa.Integer(), nullable=False),
        sa.Column('trigger', sa.String(length=32), nullable=False),
        sa.Column('name', sa.String(length=64), nullable=False),
        sa.Column('text', sa.Text(), nullable=False),
        sa.Column('slot', sa.Integer(), nullable=True),
        sa.Column('created_at', sa.DateTime(), nullable=False),
        sa.Column('updated_at', sa.DateTime(), nullable=False),
        sa.Column('updated_by', sa.String(length=128), nullable=False),
        sa.PrimaryKeyConstraint('id'),
        sa.UniqueConstraint('trigger'),
        sa.UniqueConstraint('slot'),
    )


def downgrade() -> None:
    op.drop_table('report_templates')
    # not batch mode: rebuilding ``studies`` on SQLite would drop it, and with foreign keys on
    # that cascades to series, instances, jobs and drafts (SQLite >= 3.35 drops a column in place)
    op.execute("ALTER TABLE studies DROP COLUMN priority")
