"""Serve the send and confirm deployments from this process (the local stack and single-machine
installs). Production runs the same flows from prefect.yaml on a work pool (see README).

Schedules come from system_settings: a send run is due every `send_run_seconds` and ticks at
`payment_batch_interval_ms` inside; a confirm run is due every `confirm_run_seconds` and ticks at
`confirmation_interval_ms` inside."""

from __future__ import annotations

from datetime import timedelta
from typing import cast

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
    # Two overlapping runs are harmless (signer lane locks, SKIP LOCKED claims, guarded updates);
    # more than two would only queue up behind each other.
    limit = ConcurrencyLimitConfig(limit=2, collision_strategy=ConcurrencyLimitStrategy.ENQUEUE)
    send = send_payments.to_deployment(
        name="send",
        interval=timedelta(seconds=max(settings.send_run_seconds, 5)),
        concurrency_limit=limit,
        tags=["payments", "send"],
        description="Claim pending payments, sign, persist, broadcast (ticks every payment_batch_interval_ms)",
    )
    confirm = confirm_payments.to_deployment(
        name="confirm",
        interval=timedelta(seconds=max(settings.confirm_run_seconds, 5)),
        concurrency_limit=limit,
        tags=["payments", "confirm"],
        description="Apply receipts, release mints, handle stuck transactions (ticks every confirmation_interval_ms)",
    )
    mint = mint_tokens.to_deployment(
        name="mint",
        interval=timedelta(seconds=max(settings.confirm_run_seconds, 5)),
        concurrency_limit=limit,
        tags=["payments", "mint"],
        description="Mint what completed payments bought, from the minter wallet, and confirm it",
    )
    webhooks = deliver_webhooks.to_deployment(
        name="webhooks",
        interval=timedelta(seconds=max(settings.confirm_run_seconds, 5)),
        concurrency_limit=limit,
        tags=["payments", "webhooks"],
        description="POST merchant webhooks with HMAC signatures, retrying with backoff",
    )
    monitor = monitor_payments.to_deployment(
        name="monitor",
        interval=timedelta(seconds=monitor_interval_seconds),
        concurrency_limit=1,
        tags=["payments", "monitor"],
        description="Queue depth, sent age, confirmation rate, processing time against the alert thresholds",
    )
    recovery = [
        f.to_deployment(name="manual", tags=["payments", "recovery"],
                        description="Run by hand from the UI; dry_run defaults to true")
        for f in RECOVERY_FLOWS
    ]
    return [cast(RunnerDeployment, d) for d in (send, confirm, mint, webhooks, monitor, *recovery)]


def main() -> None:
    with engine_for(require_env("DATABASE_URL")).connect() as conn:
        settings = read_settings(conn)
        monitor_every = conn.execute(text(
            "SELECT value FROM system_settings WHERE key = 'monitor_interval_seconds'")).scalar_one_or_none()
    configure_alerts()
    serve(*build_deployments(settings, max(int(monitor_every or 30), 5)), limit=6)


if __name__ == "__main__":
    main()
