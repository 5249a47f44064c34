"""Apply sql/migrations/015_intake_hardening.sql."""

from payments.migrate import run_sql_file

revision = "015"
down_revision = "014"
branch_labels = None
depends_on = None


def upgrade() -> None:
    run_sql_file(revision)


def downgrade() -> None:
    raise NotImplementedError("migrations are forward-only; restore from backup to go back")
