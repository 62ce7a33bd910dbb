"""report templates/macros and study priority (issue 17)

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-28 09:00:00

Reserved this session (issue 17) so that three changes can be written at once in a fixed order;
the owner fills in upgrade/downgrade. Until then it changes nothing.
"""

revision = '0005'
down_revision = '0004'
branch_labels = None
depends_on = None


def upgrade() -> None:
    pass


def downgrade() -> None:
    pass
