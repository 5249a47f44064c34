"""Apply sql/migrations/005_payment_events.sql."""

from payments.migrate import run_sql_file

revision = "005"
down_revision = "004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    run_sql_file(revision)


def downgrade() -> None:
    raise NotImplementedError("migrations are forward-only; restore from backup to go back")
