"""Apply sql/migrations/008_monitor_settings.sql."""

from payments.migrate import run_sql_file

revision = "008"
down_revision = "007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    run_sql_file(revision)


def downgrade() -> None:
    raise NotImplementedError("migrations are forward-only; restore from backup to go back")
