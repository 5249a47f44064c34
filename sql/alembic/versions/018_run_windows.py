"""Apply sql/migrations/018_run_windows.sql."""

from payments.migrate import run_sql_file

revision = "018"
down_revision = "017"
branch_labels = None
depends_on = None


def upgrade() -> None:
    run_sql_file(revision)


def downgrade() -> None:
    raise NotImplementedError("migrations are forward-only; restore from backup to go back")
