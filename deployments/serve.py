"""Serve every deployment from this process (the local stack and single-machine installs). Production
runs the same flows from prefect.yaml on a work pool (see README).

Schedules come from system_settings: a send run is due every `send_run_seconds` and ticks at
`payment_batch_interval_ms` inside; a confirm run is due every `confirm_run_seconds` and ticks at
`confirmation_interval_ms` inside.

No deployment has a Prefect concurrency limit, on purpose. A limit is a slot held by a lease that the
live run renews: a run killed together with its runner (kill -9, OOM, a lost machine) keeps its slot
until the lease runs out (300 s), and a Prefect server restart forgets the leases but not the taken
slots, so a limit of 1 or 2 lets one crash stop the pipeline. Overlapping runs are harmless instead,
because safety comes from the database:
- send: pending payments are claimed `FOR UPDATE SKIP LOCKED` with a lease, and each signer lane is a
  session advisory lock (a second run finds the lanes busy and ends; the lock goes with a dead process);
- confirm, mint, webhooks: every status change is one statement guarded by the expected old status, so
  two runs applying the same receipt or delivery change each row once;
- monitor: alert transitions are guarded statements, so two passes notify once.
What bounds the overlap: each pipeline run ticks for at most its window, and one that starts late does
not wait for work past the time an on-time run would have ended (flows.ticks: it goes on only while its
ticks fill batches); the runner starts at most RUNNER_LIMIT runs at once, runs beyond that wait in the
schedule.

Start-up (reading settings, alert automation, registering the deployments) is retried with backoff on
errors that go away by themselves: PostgreSQL or the Prefect API restarting or refusing connections,
Prefect answering 5xx."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from datetime import timedelta
from typing import Any, cast

import httpx
import psycopg
import sqlalchemy.exc
from prefect import serve
from prefect.deployments.runner import RunnerDeployment
from prefect.logging import get_logger
from sqlalchemy import text

from deployments.automations import HEARTBEAT_SECONDS
from deployments.automations import main as configure_automations
from flows.confirm import confirm_payments
from flows.mint import mint_tokens
from flows.monitor import monitor_payments
from flows.recovery import RECOVERY_FLOWS
from flows.send import send_payments
from flows.webhooks import deliver_webhooks
from payments.config import require_env
from payments.db import engine_for
from payments.settings import PipelineSettings, read_settings

SEND_DEPLOYMENT = "send-payments/send"
CONFIRM_DEPLOYMENT = "confirm-payments/confirm"
MINT_DEPLOYMENT = "mint-tokens/mint"

# Steady state is one run per scheduled deployment (5), plus the next run of a deployment, which the
# runner starts up to 10 s (its prefetch) before it is due, plus a recovery run started by hand.
# Each run is a Python process of 80-90 MB. The limit lives in this process only: a killed run frees
# its place when the runner sees it exit, and a killed serve process takes all of them with it.
RUNNER_LIMIT = 8

START_ATTEMPTS = 8  # 1 + 2 + 4 + 8 + 16 + 30 + 30 s between them: about 1.5 minutes in all
START_FIRST_DELAY = 1.0
START_MAX_DELAY = 30.0
HEALTHY_AFTER = 60.0  # a failure after this long in service starts a fresh retry budget

log = get_logger("deployments.serve")


def build_deployments(settings: PipelineSettings, monitor_interval_seconds: int = 30) -> list[RunnerDeployment]:
    pipeline_every = timedelta(seconds=max(settings.send_run_seconds, 5))
    receipts_every = timedelta(seconds=max(settings.confirm_run_seconds, 5))
    scheduled: list[tuple[Any, str, timedelta, str]] = [
        (send_payments, "send", pipeline_every,
         "Claim pending payments, sign, persist, broadcast (ticks every payment_batch_interval_ms)"),
        (confirm_payments, "confirm", receipts_every,
         "Apply receipts, release mints, handle stuck transactions (ticks every confirmation_interval_ms)"),
        (mint_tokens, "mint", receipts_every,
         "Mint what completed payments bought, from the minter wallet, and confirm it"),
        (deliver_webhooks, "webhooks", receipts_every,
         "POST merchant webhooks with HMAC signatures, retrying with backoff"),
        (monitor_payments, "monitor", timedelta(seconds=monitor_interval_seconds),
         "Queue depth, sent age, confirmation rate, processing time, gas and nonce health against the thresholds"),
    ]
    # concurrency_limit=None is sent to the server and removes a limit an earlier version registered.
    deployments = [
        f.to_deployment(name=name, interval=every, concurrency_limit=None, tags=["payments", name],
                        description=description)
        for f, name, every, description in scheduled
    ]
    deployments += [
        f.to_deployment(name="manual", tags=["payments", "recovery"],
                        description="Run by hand from the UI; dry_run defaults to true")
        for f in RECOVERY_FLOWS
    ]
    return [cast(RunnerDeployment, d) for d in deployments]


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
    """Errors that go away by themselves: the database or the Prefect API restarting, refusing or
    dropping connections, timing out, or answering 5xx (or 408/429)."""
    for e in _causes(exc):
        if isinstance(e, sqlalchemy.exc.OperationalError | sqlalchemy.exc.InterfaceError | psycopg.OperationalError
                      | httpx.TransportError | ConnectionError | TimeoutError):
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


def start() -> None:
    """Read the schedules from system_settings, set up the automations (alerts, crashed runs) and serve
    every deployment (blocks). Runs send a heartbeat every HEARTBEAT_SECONDS."""
    engine = engine_for(require_env("DATABASE_URL"))
    with engine.connect() as conn:
        settings = read_settings(conn)
        monitor_every = conn.execute(text(
            "SELECT value FROM system_settings WHERE key = 'monitor_interval_seconds'")).scalar_one_or_none()
    configure_automations()
    serve(*build_deployments(settings, max(int(monitor_every or 30), 5)), limit=RUNNER_LIMIT,
          heartbeat_seconds=HEARTBEAT_SECONDS)


def main() -> None:
    run_with_retries(start)


if __name__ == "__main__":
    main()
