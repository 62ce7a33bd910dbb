"""addenda, critical-result communications, reports from scratch (issue 17)

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-28 09:00:00

Two tables (models in ``dicom_node.review_records``): ``critical_results`` (who was told of a
critical result, how, when, by whom; the verified SR recording it) and ``report_addenda`` (each
addendum's verified SR and the SR it amends). A report written from scratch needs no table: it is
an ordinary draft row whose job is of kind ``manual``.
"""
import sqlalchemy as sa
from alembic import op

revision = '0004'
down_revision = '0003'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        'critical_results',
        sa.Column('id', sa.Integer(), nullable=False),
        sa.Column('draft_id', sa.Integer(), nullable=False),
        sa.Column('study_instance_uid', sa.String(length=64), nullable=False),
        sa.Column('sop_instance_uid', sa.String(length=64), nullable=False),
        sa.Column('recipient_name', sa.String(length=200), nullable=False),
        sa.Column('recipient_role', sa.String(length=64), nullable=False),
        sa.Column('method', sa.String(length=16), nullable=False),
        sa.Column('communicated_at', sa.DateTime(), nullable=False),
        sa.Column('recorded_by', sa.String(length=128), nullable=False),
        sa.Column('recorded_at', sa.DateTime(), nullable=False),
        sa.ForeignKeyConstraint(['draft_id'], ['drafts.id'], ondelete='CASCADE'),
        sa.PrimaryKeyConstraint('id'),
    )
    with op.batch_alter_table('critical_results', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_critical_results_draft_id'), ['draft_id'], unique=False)
        batch_op.create_index(batch_op.f('ix_critical_results_sop_instance_uid'), ['sop_instance_uid'], unique=False)
    op.create_table(
        'report_addenda',
        sa.Column('id', sa.Integer(), nullable=False),
        sa.Column('draft_id', sa.Integer(), nullable=False),
        sa.Column('study_instance_uid', sa.String(length=64), nullable=False),
        sa.Column('sop_instance_uid', sa.String(length=64), nullable=False),
        sa.Column('path', sa.String(length=512), nullable=False),
        sa.Column('predecessor_sop_instance_uid', sa.String(length=64), nullable=False),
        sa.Column('text', sa.Text(), nullable=False),
        sa.Column('author', sa.String(length=128), nullable=False),
        sa.Column('author_name', sa.String(length=324), nullable=False),
        sa.Column('created_at', sa.DateTime(), nullable=False),
        sa.ForeignKeyConstraint(['draft_id'], ['drafts.id'], ondelete='CASCADE'),
        sa.PrimaryKeyConstraint('id'),
        sa.UniqueConstraint('sop_instance_uid'),
    )
    with op.batch_alter_table('report_addenda', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_report_addenda_draft_id'), ['draft_id'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('report_addenda', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_report_addenda_draft_id'))
    op.drop_table('report_addenda')
    with op.batch_alter_table('critical_results', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_critical_results_sop_instance_uid'))
        batch_op.drop_index(batch_op.f('ix_critical_results_draft_id'))
    op.drop_table('critical_results')
