"""Start-up with retries for the long-lived processes (deployments.deploy, deployments.worker): errors
that go away by themselves - PostgreSQL or the Prefect API restarting, refusing or dropping connections,
Prefect answering 5xx - are retried with backoff; anything else ends the process at once."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

import httpx
import psycopg
import requests
import sqlalchemy.exc
from prefect.logging import get_logger

from payments.errors import RpcError

START_ATTEMPTS = 8  # 1 + 2 + 4 + 8 + 16 + 30 + 30 s between them: about 1.5 minutes in all
START_FIRST_DELAY = 1.0
START_MAX_DELAY = 30.0
HEALTHY_AFTER = 60.0  # a failure after this long in service starts a fresh retry budget

log = get_logger("deployments.startup")


def _causes(exc: BaseException) -> Iterator[BaseException]:
    """The exception, what it was raised from, and the members of exception groups (the runner's task
    groups wrap what failed inside them)."""
    seen: set[int] = set()
    todo = [exc]
    while todo:
        e = todo.pop()
        if id(e) in seen:
            continue
        seen.add(id(e))
        yield e
        if e.__cause__ is not None:
            todo.append(e.__cause__)
        if isinstance(e, BaseExceptionGroup):
            todo.extend(e.exceptions)


def is_transient(exc: BaseException) -> bool:
    """Errors that go away by themselves: the database, the RPC endpoint or the Prefect API restarting,
    refusing or dropping connections, timing out, or answering 5xx (or 408/429)."""
    for e in _causes(exc):
        if isinstance(e, sqlalchemy.exc.OperationalError | sqlalchemy.exc.InterfaceError | psycopg.OperationalError
                      | httpx.TransportError | ConnectionError | TimeoutError
                      | requests.ConnectionError | requests.Timeout | RpcError):
            return True
        if isinstance(e, sqlalchemy.exc.DBAPIError) and e.connection_invalidated:
            return True
        if isinstance(e, httpx.HTTPStatusError):
            code = e.response.status_code
            if code >= 500 or code in (408, 429):
                return True
    return False


def run_with_retries(start: Callable[[], None], *, attempts: int = START_ATTEMPTS,
                     first_delay: float = START_FIRST_DELAY, max_delay: float = START_MAX_DELAY,
                     sleep: Callable[[float], None] = time.sleep, clock: Callable[[], float] = time.monotonic) -> None:
    """Call `start`; on a transient error wait (doubling from first_delay up to max_delay) and call it
    again, at most `attempts` times in a row. Anything else, or the last attempt's error, is raised.
    A failure after HEALTHY_AFTER seconds of service starts a fresh budget."""
    attempt, delay = 0, first_delay
    while True:
        attempt += 1
        started = clock()
        try:
            start()
            return
        except Exception as exc:
            if clock() - started >= HEALTHY_AFTER:
                attempt, delay = 1, first_delay
            reason = f"{type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0]}"
            if not is_transient(exc) or attempt >= attempts:
                log.error("start-up failed (attempt %d/%d, %s); giving up", attempt, attempts, reason)
                raise
            log.warning("start-up failed (attempt %d/%d, %s); retrying in %.0f s", attempt, attempts, reason, delay)
        sleep(delay)
        delay = min(delay * 2, max_delay)
