"""Database access: one engine per process, named SQL from sql/queries.sql, audited transactions."""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache
from typing import Any

from sqlalchemy import Connection, Engine, TextClause, create_engine, text
from sqlalchemy.engine import make_url

from payments.config import SQL_DIR

_QUERY_HEADER = re.compile(r"^-- (?P<name>[a-z_][a-z0-9_]*) --$", re.MULTILINE)


def parse_queries(source: str) -> dict[str, str]:
    """Split a file of `-- name --` headed blocks into {name: sql}."""
    parts = _QUERY_HEADER.split(source)
    queries: dict[str, str] = {}
    for i in range(1, len(parts), 2):
        name, body = parts[i], parts[i + 1].strip()
        if name in queries:
            raise ValueError(f"query {name!r} is defined twice")
        if not body:
            raise ValueError(f"query {name!r} is empty")
        queries[name] = body
    return queries


@cache
def _queries() -> dict[str, TextClause]:
    raw = parse_queries((SQL_DIR / "queries.sql").read_text())
    return {name: text(sql) for name, sql in raw.items()}


def query(name: str) -> TextClause:
    """The named statement from sql/queries.sql."""
    try:
        return _queries()[name]
    except KeyError:
        raise KeyError(f"no query named {name!r} in sql/queries.sql") from None


def sqlalchemy_url(url: str) -> str:
    """Accept plain `postgresql://` URLs (what pg_dump, psql and Heroku-style configs use)."""
    parsed = make_url(url)
    if parsed.drivername in ("postgresql", "postgres"):
        parsed = parsed.set(drivername="postgresql+psycopg")
    return parsed.render_as_string(hide_password=False)


def make_engine(url: str, *, pool_size: int = 5, connect_timeout: int = 10, pool_timeout: float = 30,
                statement_timeout_ms: int | None = None) -> Engine:
    """An engine whose connection attempts give up after `connect_timeout` seconds (a database that is
    down or unreachable fails fast instead of hanging), optionally with a per-statement time limit."""
    connect_args: dict[str, Any] = {"application_name": "x402-payments", "connect_timeout": connect_timeout}
    if statement_timeout_ms is not None:
        connect_args["options"] = f"-c statement_timeout={int(statement_timeout_ms)}"
    return create_engine(
        sqlalchemy_url(url),
        pool_size=pool_size,
        max_overflow=5,
        pool_timeout=pool_timeout,
        pool_pre_ping=True,
        connect_args=connect_args,
    )


@cache
def engine_for(url: str) -> Engine:
    """The process-wide engine for a URL (flows and tasks share it)."""
    return make_engine(url)


@contextmanager
def transaction(engine: Engine, actor: str) -> Iterator[Connection]:
    """A committed-on-success transaction whose status changes are audited as `actor`."""
    with engine.begin() as conn:
        conn.execute(text("SELECT set_config('payments.actor', :actor, true)"), {"actor": actor})
        yield conn


def fetch_all(conn: Connection, name: str, **params: Any) -> list[dict[str, Any]]:
    return [dict(r._mapping) for r in conn.execute(query(name), params)]
