"""Apply sql/migrations/006_update_payment_queue_status.sql."""

from payments.migrate import run_sql_file

revision = "006"
down_revision = "005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    run_sql_file(revision)


def downgrade() -> None:
    raise NotImplementedError("migrations are forward-only; restore from backup to go back")
