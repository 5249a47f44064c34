"""Apply sql/migrations/004_mint_queue.sql."""

from payments.migrate import run_sql_file

revision = "004"
down_revision = "003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    run_sql_file(revision)


def downgrade() -> None:
    raise NotImplementedError("migrations are forward-only; restore from backup to go back")
