"""Apply sql/migrations/013_webhooks.sql."""

from payments.migrate import run_sql_file

revision = "013"
down_revision = "012"
branch_labels = None
depends_on = None


def upgrade() -> None:
    run_sql_file(revision)


def downgrade() -> None:
    raise NotImplementedError("migrations are forward-only; restore from backup to go back")
