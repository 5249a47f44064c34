"""`deliver-webhooks`: POSTs merchant webhooks (payment completed / failed) with HMAC signatures and
retries with backoff; ticks every confirmation_interval_ms for confirm_run_seconds."""

from __future__ import annotations

import time
from dataclasses import asdict
from typing import Annotated

from prefect import flow, task
from prefect.cache_policies import NO_CACHE
from pydantic import Field

from payments.config import require_env
from payments.db import engine_for
from payments.settings import read_settings
from tasks.webhooks import WebhookReport, deliver_due_webhooks


@task(name="deliver-webhooks-batch", cache_policy=NO_CACHE)
def deliver_batch(database_url: str) -> WebhookReport:
    return deliver_due_webhooks(engine_for(database_url))


@flow(name="deliver-webhooks")
def deliver_webhooks(run_seconds: Annotated[int | None, Field(ge=0, le=3600)] = None) -> dict[str, int]:
    database_url = require_env("DATABASE_URL")
    engine = engine_for(database_url)
    with engine.connect() as conn:
        settings = read_settings(conn)
    window = settings.confirm_run_seconds if run_seconds is None else run_seconds
    deadline = time.monotonic() + window
    total = WebhookReport()
    while True:
        started = time.monotonic()
        report = deliver_batch(database_url)
        for key, value in asdict(report).items():
            setattr(total, key, getattr(total, key) + value)
        pause = max(0.0, settings.confirmation_interval_ms / 1000 - (time.monotonic() - started))
        if time.monotonic() + pause >= deadline:
            break
        time.sleep(pause)
    return asdict(total)
