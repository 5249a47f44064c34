"""Apply sql/migrations/012_mint_sending.sql."""

from payments.migrate import run_sql_file

revision = "012"
down_revision = "011"
branch_labels = None
depends_on = None


def upgrade() -> None:
    run_sql_file(revision)


def downgrade() -> None:
    raise NotImplementedError("migrations are forward-only; restore from backup to go back")
