"""Apply sql/migrations/017_alert_context.sql."""

from payments.migrate import run_sql_file

revision = "017"
down_revision = "016"
branch_labels = None
depends_on = None


def upgrade() -> None:
    run_sql_file(revision)


def downgrade() -> None:
    raise NotImplementedError("migrations are forward-only; restore from backup to go back")
