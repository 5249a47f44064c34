"""`deliver-webhooks`: POSTs merchant webhooks (payment completed / failed) with HMAC signatures and
retries with backoff; ticks every confirmation_interval_ms for confirm_run_seconds."""

from __future__ import annotations

import time
from typing import Annotated

from prefect import flow, task
from prefect.cache_policies import NO_CACHE
from pydantic import Field

from flows.runs import finish_run, has_work, running_name
from flows.ticks import add_counts, counts, run_window, tick_loop, with_retries
from payments.config import require_env
from payments.db import engine_for
from payments.settings import PipelineSettings, read_settings
from tasks.webhooks import WebhookReport, deliver_due_webhooks

WEBHOOK_BATCH = 50


@task(name="deliver-webhooks-batch", cache_policy=NO_CACHE)
def deliver_batch(database_url: str) -> WebhookReport:
    return deliver_due_webhooks(engine_for(database_url), limit=WEBHOOK_BATCH)


@flow(name="deliver-webhooks", flow_run_name=running_name("deliver-webhooks"))
def deliver_webhooks(run_seconds: Annotated[int | None, Field(ge=0, le=3600)] = None) -> dict[str, int]:
    started = time.monotonic()
    database_url = require_env("DATABASE_URL")
    engine = engine_for(database_url)

    def reread() -> PipelineSettings:
        with engine.connect() as conn:
            return read_settings(conn)

    settings = with_retries(reread)
    window = run_window(settings.confirm_run_seconds) if run_seconds is None else run_seconds
    total = WebhookReport()

    def tick(settings: PipelineSettings) -> bool:
        if not has_work(engine, "webhooks"):
            return False  # nothing due: no task run
        report = deliver_batch(database_url)
        add_counts(total, report)
        return report.attempted >= WEBHOOK_BATCH

    tick_loop(reread, window, lambda s: s.confirmation_interval_ms, tick)
    finish_run("webhooks", counts(total), started)
    return counts(total)
