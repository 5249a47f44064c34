"""Serve the send and confirm deployments from this process (the local stack and single-machine
installs). Production runs the same flows from prefect.yaml on a work pool (see README).

Schedules come from system_settings: a send run is due every `send_run_seconds` and ticks at
`payment_batch_interval_ms` inside; a confirm run is due every `confirm_run_seconds` and ticks at
`confirmation_interval_ms` inside."""

from __future__ import annotations

from datetime import timedelta
from typing import Any, cast

from prefect import serve
from prefect.client.schemas.objects import ConcurrencyLimitConfig, ConcurrencyLimitStrategy
from prefect.deployments.runner import RunnerDeployment
from sqlalchemy import text

from deployments.automations import main as configure_alerts
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


def build_deployments(settings: PipelineSettings, monitor_interval_seconds: int = 30) -> list[RunnerDeployment]:
    # Two overlapping runs are harmless (lane locks, SKIP LOCKED claims, guarded updates); more than two
    # would only queue up behind each other.
    limit = ConcurrencyLimitConfig(limit=2, collision_strategy=ConcurrencyLimitStrategy.ENQUEUE)
    pipeline_every = timedelta(seconds=max(settings.send_run_seconds, 5))
    receipts_every = timedelta(seconds=max(settings.confirm_run_seconds, 5))
    scheduled: list[tuple[Any, str, timedelta, Any, str]] = [
        (send_payments, "send", pipeline_every, limit,
         "Claim pending payments, sign, persist, broadcast (ticks every payment_batch_interval_ms)"),
        (confirm_payments, "confirm", receipts_every, limit,
         "Apply receipts, release mints, handle stuck transactions (ticks every confirmation_interval_ms)"),
        (mint_tokens, "mint", receipts_every, limit,
         "Mint what completed payments bought, from the minter wallet, and confirm it"),
        (deliver_webhooks, "webhooks", receipts_every, limit,
         "POST merchant webhooks with HMAC signatures, retrying with backoff"),
        (monitor_payments, "monitor", timedelta(seconds=monitor_interval_seconds), 1,
         "Queue depth, sent age, confirmation rate, processing time, gas and nonce health against the thresholds"),
    ]
    deployments = [
        f.to_deployment(name=name, interval=every, concurrency_limit=conc, tags=["payments", name],
                        description=description)
        for f, name, every, conc, description in scheduled
    ]
    deployments += [
        f.to_deployment(name="manual", tags=["payments", "recovery"],
                        description="Run by hand from the UI; dry_run defaults to true")
        for f in RECOVERY_FLOWS
    ]
    return [cast(RunnerDeployment, d) for d in deployments]


def main() -> None:
    with engine_for(require_env("DATABASE_URL")).connect() as conn:
        settings = read_settings(conn)
        monitor_every = conn.execute(text(
            "SELECT value FROM system_settings WHERE key = 'monitor_interval_seconds'")).scalar_one_or_none()
    configure_alerts()
    serve(*build_deployments(settings, max(int(monitor_every or 30), 5)), limit=6)


if __name__ == "__main__":
    main()
