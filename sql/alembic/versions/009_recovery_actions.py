"""Apply sql/migrations/009_recovery_actions.sql."""

from payments.migrate import run_sql_file

revision = "009"
down_revision = "008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    run_sql_file(revision)


def downgrade() -> None:
    raise NotImplementedError("migrations are forward-only; restore from backup to go back")
