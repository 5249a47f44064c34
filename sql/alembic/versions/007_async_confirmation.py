"""Apply sql/migrations/007_async_confirmation.sql."""

from payments.migrate import run_sql_file

revision = "007"
down_revision = "006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    run_sql_file(revision)


def downgrade() -> None:
    raise NotImplementedError("migrations are forward-only; restore from backup to go back")
