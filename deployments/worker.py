"""A worker of the `payments` pool: `python -m deployments.worker` (the local stack keeps one running and
starts it again when it dies; production runs it under systemd or as a container, one per machine).

Before it hands over to `prefect worker start`:
1. runs of the scheduled deployments that were due more than STALE_AFTER seconds ago and never started
   (the worker was down) are cancelled: a restart carries no Late backlog, and each would be a process
   start only to find its window over;
2. one run of each scheduled deployment is started now, so the pipeline does not wait for the next
   schedule slot (up to one window) after a restart. An extra run beside a live one is harmless: send
   and mint runs stand by for their lanes, the other stages claim with SKIP LOCKED.
Both are retried with backoff while the Prefect API is restarting.

The worker takes runs from every queue of the pool, highest priority first (recovery, monitor,
pipeline); WORKER_LIMIT leaves room for a recovery run beside the steady state (one run per scheduled
deployment plus its successor, which the worker starts up to its prefetch before it is due)."""

from __future__ import annotations

import asyncio
import os
import socket
import sys
from datetime import UTC, datetime, timedelta
from typing import Any, cast
from uuid import UUID

from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    DeploymentFilter,
    DeploymentFilterId,
    FlowRunFilter,
    FlowRunFilterExpectedStartTime,
    FlowRunFilterState,
    FlowRunFilterStateType,
)
from prefect.client.schemas.objects import FlowRun, StateType
from prefect.client.schemas.responses import SetStateStatus
from prefect.logging import get_logger
from prefect.states import Cancelled

from deployments.deploy import POOL
from deployments.startup import run_with_retries

WORKER_LIMIT = 12
STALE_AFTER = 60.0
SOON = 15.0
QUERY_SECONDS = "2"  # how often the worker asks for due runs: a recovery run starts within a few seconds

log = get_logger("deployments.worker")


async def _scheduled_deployments() -> dict[UUID, str]:
    """id -> name of the pool's deployments that have an active schedule and are not paused (an operator's
    pause is a kill switch a worker start must not override)."""
    async with get_client() as client:
        deployments = await client.read_deployments()
        return {d.id: d.name for d in deployments
                if d.work_pool_name == POOL and not d.paused and any(s.active for s in d.schedules)}


async def cancel_stale_runs(now: datetime | None = None) -> int:
    """Cancel the scheduled deployments' runs that were due more than STALE_AFTER s ago and never ran."""
    now = now or datetime.now(UTC)
    scheduled = await _scheduled_deployments()
    if not scheduled:
        return 0
    cancelled = 0
    async with get_client() as client:
        runs: list[FlowRun] = []
        while True:  # the API returns at most 200 at a time
            page = await client.read_flow_runs(
                deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=list(scheduled))),
                flow_run_filter=FlowRunFilter(state=FlowRunFilterState(type=FlowRunFilterStateType(
                    any_=[StateType.SCHEDULED]))),
                limit=200, offset=len(runs))
            runs += page
            if len(page) < 200:
                break
        for run in runs:
            due = run.expected_start_time or run.next_scheduled_start_time
            if due is not None and (now - due).total_seconds() > STALE_AFTER:
                # not forced: a run another worker has just started keeps its state
                result: Any = await client.set_flow_run_state(run.id, Cancelled(
                    message=f"skipped: due {due:%H:%M:%S} while no worker was running"), force=False)
                cancelled += result.status == SetStateStatus.ACCEPT
    return cancelled


async def start_scheduled_now(now: datetime | None = None) -> list[str]:
    """One run of each scheduled deployment now, unless one is due within SOON seconds anyway (a fresh
    deployment's first scheduled run, or the next slot)."""
    now = now or datetime.now(UTC)
    started = []
    scheduled = await _scheduled_deployments()
    async with get_client() as client:
        due_soon = {run.deployment_id for run in await client.read_flow_runs(
            deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=list(scheduled))),
            flow_run_filter=FlowRunFilter(
                state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.SCHEDULED])),
                expected_start_time=FlowRunFilterExpectedStartTime(
                    before_=cast(Any, now + timedelta(seconds=SOON)))),
            limit=200)}
        for deployment_id, name in scheduled.items():
            if deployment_id not in due_soon:
                await client.create_flow_run_from_deployment(deployment_id, tags=["worker-start"])
                started.append(name)
    return started


def prepare() -> None:
    cancelled = asyncio.run(cancel_stale_runs())
    started = asyncio.run(start_scheduled_now())
    log.info("worker start: %d stale scheduled run(s) cancelled; started now: %s", cancelled,
             ", ".join(sorted(started)) or "nothing (not deployed yet?)")


def main() -> None:
    run_with_retries(prepare)
    os.environ.setdefault("PREFECT_WORKER_QUERY_SECONDS", QUERY_SECONDS)
    name = os.environ.get("PAYMENTS_WORKER_NAME") or f"payments-{socket.gethostname()}-{os.getpid()}"
    args = [sys.executable, "-m", "prefect", "worker", "start", "--pool", POOL, "--type", "process",
            "--limit", str(int(os.environ.get("PAYMENTS_WORKER_LIMIT", WORKER_LIMIT))), "--name", name]
    sys.stdout.flush()
    os.execv(sys.executable, args)  # the same process: a supervisor's signals reach the worker itself


if __name__ == "__main__":
    main()

