"""Apply sql/migrations/003_signer_nonces.sql."""

from payments.migrate import run_sql_file

revision = "003"
down_revision = "002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    run_sql_file(revision)


def downgrade() -> None:
    raise NotImplementedError("migrations are forward-only; restore from backup to go back")
