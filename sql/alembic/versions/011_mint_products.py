"""Apply sql/migrations/011_mint_products.sql."""

from payments.migrate import run_sql_file

revision = "011"
down_revision = "010"
branch_labels = None
depends_on = None


def upgrade() -> None:
    run_sql_file(revision)


def downgrade() -> None:
    raise NotImplementedError("migrations are forward-only; restore from backup to go back")
