"""Apply sql/migrations/001_payment_queue.sql."""

from payments.migrate import run_sql_file

revision = "001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    run_sql_file(revision)


def downgrade() -> None:
    raise NotImplementedError("migrations are forward-only; restore from backup to go back")
