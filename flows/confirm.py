"""`confirm-payments`: the seed's confirmation loop (every 2 s, up to 20 sent payments per pass), as a
Prefect flow that ticks for `confirm_run_seconds` and then ends. Each pass decides claimed payments
from the chain (tasks/confirm.py), then tends every wallet's nonces (payments/txm.py). A pass that
found a full batch and moved some of it is followed at once by the next, so a backlog of sent payments
does not wait 2 s per 20."""

from __future__ import annotations

import time
from typing import Annotated

from prefect import flow
from prefect.runtime import flow_run
from pydantic import Field

from flows.runs import StateChanges, finish_run, has_work, running_name
from flows.ticks import add_counts, counts, run_window, tick_loop, with_retries
from payments.settings import PipelineSettings
from tasks.common import Pipeline
from tasks.confirm import ConfirmReport, confirm_tick, confirm_tick_task


@flow(name="confirm-payments", flow_run_name=running_name("confirm-payments"))
def confirm_payments(
    run_seconds: Annotated[int | None, Field(ge=0, le=3600)] = None,
    max_ticks: Annotated[int | None, Field(ge=1, le=100_000)] = None,
) -> dict[str, int]:
    """Decide sent payments from the chain and tend every wallet for `run_seconds` (default:
    system_settings.confirm_run_seconds)."""
    started = time.monotonic()
    p = with_retries(Pipeline.from_env)
    settings = with_retries(p.settings)
    window = run_window(settings.confirm_run_seconds) if run_seconds is None else run_seconds
    actor = f"confirm-{flow_run.get_id() or 'local'}"
    total = ConfirmReport()
    changes = with_retries(lambda: StateChanges(p.engine, actor))

    def tick(settings: PipelineSettings) -> bool:
        # a task run only when payments wait; an idle tick still tends the wallets, in the flow itself
        report = (confirm_tick_task(p, actor, settings) if has_work(p.engine, "confirm", p.chain_id)
                  else confirm_tick(p, actor, settings))
        add_counts(total, report)
        if report.completed or report.released or report.confirmation_failed or report.requeued or report.reorged:
            changes.log()
        # a full pass that made progress: more receipts are waiting, check them at once
        moved = report.completed + report.released + report.confirmation_failed + report.requeued + report.reorged
        return report.checked >= settings.confirmation_batch_size and moved > 0

    tick_loop(p.settings, window, lambda s: s.confirmation_interval_ms, tick, max_ticks)
    finish_run("confirm", counts(total), started)
    return counts(total)
