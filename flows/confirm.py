"""`confirm-payments`: the seed's confirmation loop (every 2 s, up to 20 sent payments per pass), as a
Prefect flow that ticks for `confirm_run_seconds` and then ends. A pass that found a full batch is
followed at once by the next, so a backlog of sent payments does not wait 2 s per 20."""

from __future__ import annotations

import time
from typing import Annotated

from prefect import flow
from prefect.runtime import flow_run
from pydantic import Field

from flows.send import asdict_counts
from tasks.common import Pipeline
from tasks.confirm import ConfirmReport, confirm_tick_task


@flow(name="confirm-payments")
def confirm_payments(
    run_seconds: Annotated[int | None, Field(ge=0, le=3600)] = None,
    max_ticks: Annotated[int | None, Field(ge=1, le=100_000)] = None,
) -> dict[str, int]:
    """Apply receipts to sent payments for `run_seconds` (default: system_settings.confirm_run_seconds)."""
    p = Pipeline.from_env()
    settings = p.settings()
    window = settings.confirm_run_seconds if run_seconds is None else run_seconds
    actor = f"confirm-{flow_run.get_id() or 'local'}"
    total = ConfirmReport()
    deadline = time.monotonic() + window
    ticks = 0
    while True:
        started = time.monotonic()
        settings = p.settings()
        report = confirm_tick_task(p, actor, settings)
        for key in ("checked", "completed", "confirmation_failed", "rebroadcast", "replaced", "waiting"):
            setattr(total, key, getattr(total, key) + getattr(report, key))
        ticks += 1
        if max_ticks is not None and ticks >= max_ticks:
            break
        progressed = report.completed + report.confirmation_failed
        full = report.checked >= settings.confirmation_batch_size and progressed > 0
        if full and (window == 0 or time.monotonic() < deadline):
            continue  # a backlog of receipts to apply: next pass at once
        pause = max(0.0, settings.confirmation_interval_ms / 1000 - (time.monotonic() - started))
        if time.monotonic() + pause >= deadline:
            break
        time.sleep(pause)
    return asdict_counts(total)
