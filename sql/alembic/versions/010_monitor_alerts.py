"""Apply sql/migrations/010_monitor_alerts.sql."""

from payments.migrate import run_sql_file

revision = "010"
down_revision = "009"
branch_labels = None
depends_on = None


def upgrade() -> None:
    run_sql_file(revision)


def downgrade() -> None:
    raise NotImplementedError("migrations are forward-only; restore from backup to go back")
