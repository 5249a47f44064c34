"""Apply sql/migrations/014_transaction_manager.sql."""

from payments.migrate import run_sql_file

revision = "014"
down_revision = "013"
branch_labels = None
depends_on = None


def upgrade() -> None:
    run_sql_file(revision)


def downgrade() -> None:
    raise NotImplementedError("migrations are forward-only; restore from backup to go back")
