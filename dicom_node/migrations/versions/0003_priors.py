"""prior studies fetched from the PACS for comparison (issue 17)

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-28 09:00:00

Three tables, apart from the node's own studies: ``prior_studies`` (one row per prior study
fetched by Query/Retrieve, with the text of its report), ``prior_instances`` (its objects,
stored under ``storage_dir/priors/``) and ``draft_priors`` (which prior a draft was compared
with; an open draft's prior is not pruned). See :mod:`dicom_node.priors`.
"""
import sqlalchemy as sa
from alembic import op

revision = '0003'
down_revision = '0002'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        'prior_studies',
        sa.Column('id', sa.Integer(), nullable=False),
        sa.Column('study_instance_uid', sa.String(length=64), nullable=False),
        sa.Column('patient_id', sa.String(length=64), nullable=False),
        sa.Column('issuer_of_patient_id', sa.String(length=64), nullable=False),
        sa.Column('study_date', sa.String(length=8), nullable=False),
        sa.Column('study_time', sa.String(length=16), nullable=False),
        sa.Column('study_description', sa.String(length=64), nullable=False),
        sa.Column('accession_number', sa.String(length=16), nullable=False),
        sa.Column('modalities', sa.String(length=64), nullable=False),
        sa.Column('source', sa.String(length=128), nullable=False),
        sa.Column('report_kind', sa.String(length=8), nullable=False),
        sa.Column('report_sop_instance_uid', sa.String(length=64), nullable=False),
        sa.Column('report_text', sa.Text(), nullable=False),
        sa.Column('fetched_at', sa.DateTime(), nullable=False),
        sa.PrimaryKeyConstraint('id'),
        sa.UniqueConstraint('study_instance_uid'),
    )
    op.create_index('ix_prior_studies_fetched_at', 'prior_studies', ['fetched_at'], unique=False)
    op.create_table(
        'prior_instances',
        sa.Column('id', sa.Integer(), nullable=False),
        sa.Column('prior_id', sa.Integer(), nullable=False),
        sa.Column('sop_instance_uid', sa.String(length=64), nullable=False),
        sa.Column('sop_class_uid', sa.String(length=64), nullable=False),
        sa.Column('series_instance_uid', sa.String(length=64), nullable=False),
        sa.Column('modality', sa.String(length=16), nullable=False),
        sa.Column('view_position', sa.String(length=16), nullable=False),
        sa.Column('path', sa.String(length=512), nullable=False),
        sa.ForeignKeyConstraint(['prior_id'], ['prior_studies.id'], ondelete='CASCADE'),
        sa.PrimaryKeyConstraint('id'),
        sa.UniqueConstraint('sop_instance_uid'),
    )
    op.create_index('ix_prior_instances_prior_id', 'prior_instances', ['prior_id'], unique=False)
    op.create_table(
        'draft_priors',
        sa.Column('draft_id', sa.Integer(), nullable=False),
        sa.Column('prior_id', sa.Integer(), nullable=False),
        sa.ForeignKeyConstraint(['draft_id'], ['drafts.id'], ondelete='CASCADE'),
        sa.ForeignKeyConstraint(['prior_id'], ['prior_studies.id'], ondelete='CASCADE'),
        sa.PrimaryKeyConstraint('draft_id', 'prior_id'),
    )
    op.create_index('ix_draft_priors_prior_id', 'draft_priors', ['prior_id'], unique=False)


def downgrade() -> None:
    op.drop_index('ix_draft_priors_prior_id', table_name='draft_priors')
    op.drop_table('draft_priors')
    op.drop_index('ix_prior_instances_prior_id', table_name='prior_instances')
    op.drop_table('prior_instances')
    op.drop_index('ix_prior_studies_fetched_at', table_name='prior_studies')
    op.drop_table('prior_studies')
