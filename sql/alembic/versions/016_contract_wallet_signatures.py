"""Apply sql/migrations/016_contract_wallet_signatures.sql."""

from payments.migrate import run_sql_file

revision = "016"
down_revision = "015"
branch_labels = None
depends_on = None


def upgrade() -> None:
    run_sql_file(revision)


def downgrade() -> None:
    raise NotImplementedError("migrations are forward-only; restore from backup to go back")
