"""audit_events is append-only: UPDATE and DELETE (and TRUNCATE) refused by the database

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-28 06:00:00

The audit trail (who received, drafted, claimed, signed, rejected, sent what) must not be
rewritten by the program that writes it, by a reviewer's session, or by a bug. SQLite: two
``BEFORE UPDATE/DELETE`` triggers that ``RAISE(ABORT)``. PostgreSQL: a trigger function raising
``insufficient_privilege`` for row UPDATE/DELETE and statement TRUNCATE, and the three
privileges revoked from PUBLIC (roles other than the owner get INSERT/SELECT only if granted).

Not defended: the table's owner (the node's own database role) can still drop the triggers with
DDL; see docs/SECURITY.md. A later migration that rebuilds ``audit_events`` (SQLite batch mode
copies the table) must create the triggers again.
"""
from alembic import op

revision = '0002'
down_revision = '0001'
branch_labels = None
depends_on = None

MESSAGE = "audit_events is append-only"


def upgrade() -> None:
    dialect = op.get_bind().dialect.name
    if dialect == "sqlite":
        for event in ("UPDATE", "DELETE"):
            op.execute(
                f"CREATE TRIGGER audit_events_no_{event.lower()} BEFORE {event} ON audit_events "
                f"BEGIN SELECT RAISE(ABORT, '{MESSAGE}: {event} refused'); END"
            )
    elif dialect == "postgresql":
        op.execute(
            "CREATE OR REPLACE FUNCTION cxrnode_audit_append_only() RETURNS trigger LANGUAGE plpgsql AS $$ "
            f"BEGIN RAISE EXCEPTION '{MESSAGE}: % refused', TG_OP USING ERRCODE = 'insufficient_privilege'; END $$"
        )
        op.execute(
            "CREATE TRIGGER audit_events_append_only BEFORE UPDATE OR DELETE ON audit_events "
            "FOR EACH ROW EXECUTE FUNCTION cxrnode_audit_append_only()"
        )
        op.execute(
            "CREATE TRIGGER audit_events_no_truncate BEFORE TRUNCATE ON audit_events "
            "FOR EACH STATEMENT EXECUTE FUNCTION cxrnode_audit_append_only()"
        )
        op.execute("REVOKE UPDATE, DELETE, TRUNCATE ON audit_events FROM PUBLIC")
    else:  # pragma: no cover - the node supports SQLite and PostgreSQL
        raise NotImplementedError(f"audit_events append-only triggers: no recipe for {dialect}")


def downgrade() -> None:
    dialect = op.get_bind().dialect.name
    if dialect == "sqlite":
        op.execute("DROP TRIGGER IF EXISTS audit_events_no_update")
        op.execute("DROP TRIGGER IF EXISTS audit_events_no_delete")
    elif dialect == "postgresql":
        op.execute("DROP TRIGGER IF EXISTS audit_events_no_truncate ON audit_events")
        op.execute("DROP TRIGGER IF EXISTS audit_events_append_only ON audit_events")
        op.execute("DROP FUNCTION IF EXISTS cxrnode_audit_append_only()")
