"""Schema migrations: alembic runs the numbered files in sql/migrations, one revision each.

`python -m payments.migrate` (or `make migrate`) applies what is missing; it is idempotent and safe to
run from several processes at once (advisory lock in sql/alembic/env.py).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from alembic import command, op
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import create_engine

from payments.config import SQL_DIR
from payments.db import sqlalchemy_url

MIGRATIONS_DIR = SQL_DIR / "migrations"


def migration_file(revision: str) -> Path:
    matches = sorted(MIGRATIONS_DIR.glob(f"{revision}_*.sql"))
    if len(matches) != 1:
        raise FileNotFoundError(f"expected exactly one sql/migrations/{revision}_*.sql, found {matches}")
    return matches[0]


def run_sql_file(revision: str) -> None:
    """Called from a revision script: execute that revision's .sql file."""
    # straight to the driver without parameters, so `%` in PL/pgSQL bodies is not taken for a placeholder
    cursor = op.get_bind().connection.dbapi_connection.cursor()  # type: ignore[union-attr]
    cursor.execute(migration_file(revision).read_text())


def alembic_config(database_url: str) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(SQL_DIR / "alembic"))
    cfg.set_main_option("sqlalchemy.url", sqlalchemy_url(database_url).replace("%", "%%"))
    return cfg


def upgrade(database_url: str, revision: str = "head") -> None:
    command.upgrade(alembic_config(database_url), revision)


def current_revision(database_url: str) -> str | None:
    engine = create_engine(sqlalchemy_url(database_url))
    try:
        with engine.connect() as conn:
            return MigrationContext.configure(conn).get_current_revision()
    finally:
        engine.dispose()


def head_revision() -> str:
    head = ScriptDirectory.from_config(alembic_config("postgresql://localhost/x")).get_current_head()
    assert head is not None
    return head


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--database-url", default=os.environ.get("DATABASE_URL"))
    parser.add_argument("--revision", default="head")
    args = parser.parse_args()
    if not args.database_url:
        parser.error("DATABASE_URL is not set (or pass --database-url)")
    upgrade(args.database_url, args.revision)
    print(f"schema at revision {current_revision(args.database_url)}")


if __name__ == "__main__":
    main()
