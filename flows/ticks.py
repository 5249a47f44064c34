"""The loop every pipeline flow runs: a Prefect schedule cannot tick every 2-4 s (each run is a fresh
process), so one scheduled run ticks at the seed's interval for a bounded window and then ends.

A run that starts late (the runner was busy, or the serve process was down and restarted) does not tick
idly past the time an on-time run would have ended (when it was due + the window): past that, it ends at
its first tick that does not fill a batch. It still drains a backlog with full ticks back to back, for at
most one window from its own start. Late runs therefore never pile up: a queue of them, after an outage,
ends at one tick each once the work is done.

A tick that fails on an error that goes away by itself (PostgreSQL restarting, the RPC endpoint or the
Prefect API unreachable) is logged and the loop goes on at its interval: a run lives through an outage
instead of leaving its stage without a run until the next schedule slot. Other errors end the run
(Failed): a defect, not re-run at once (it would only repeat); the next scheduled run tries again."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import asdict
from datetime import UTC, datetime
from typing import Any, TypeVar

from deployments.startup import is_transient
from payments.settings import PipelineSettings
from tasks.common import run_logger

T = TypeVar("T")
LANE_REST_SECONDS = 10.0  # after a failed tick a send or mint run leaves its lanes alone this long


def seconds_late() -> float:
    """How long after its scheduled start this flow run is (0 outside a flow run, or when it started early)."""
    from prefect.runtime import flow_run

    try:
        due = flow_run.get_scheduled_start_time()
    except Exception:  # no API to ask: run the whole window
        return 0.0
    return max(0.0, (datetime.now(UTC) - due).total_seconds())


def run_window(setting_seconds: int) -> int:
    """How long this run ticks: the setting, but never less than its deployment's schedule interval (so
    a window shortened without a new deploy cannot leave gaps between runs)."""
    from prefect.runtime import deployment

    try:
        deployment_id = deployment.get_id()
        if not deployment_id:
            return setting_seconds
        from prefect.client.orchestration import get_client
        from prefect.client.schemas.schedules import IntervalSchedule

        with get_client(sync_client=True) as client:
            schedules = client.read_deployment(deployment_id).schedules
        intervals = [int(s.schedule.interval.total_seconds()) for s in schedules
                     if isinstance(s.schedule, IntervalSchedule) and s.active]
        return max([setting_seconds, *intervals])
    except Exception as exc:  # the API is away: the setting is what we have
        logging.getLogger("flows.ticks").debug("schedule interval unknown: %s", exc)
        return setting_seconds


def with_retries(start: Callable[[], T], seconds: float = 120.0) -> T:
    """Call `start` (a run's set-up: connections, settings) again every 2 s while it fails on a passing
    error, for at most `seconds`: a run that starts during an outage waits for it instead of failing."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            return start()
        except Exception as exc:
            if not is_transient(exc) or time.monotonic() > deadline:
                raise
            run_logger().warning("run set-up failed on a passing error (%s); trying again in 2 s",
                                 f"{type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0][:200]}")
            time.sleep(2)


def tick_loop(read_settings: Callable[[], PipelineSettings], window: int,
              interval_ms: Callable[[PipelineSettings], int], tick: Callable[[PipelineSettings], bool],
              max_ticks: int | None = None, late_by: float | None = None,
              on_error: Callable[[BaseException], None] | None = None) -> int:
    """Call `tick` (settings re-read each time) every interval for `window` seconds. A tick that returns
    True found a full batch: the next one starts at once, for at most `window` seconds from the start
    (window 0: drain until a tick is not full). Waiting for the next tick stops `window` seconds after
    the run was due (`late_by`: how late it started; default: asked from the flow run).
    At least one tick always runs. `on_error` is called after a tick failed on a passing error (a send or
    mint run lets its lanes and claims go there). Returns the number of ticks."""
    if window > 0 and late_by is None:
        late_by = seconds_late()
    drain_until = time.monotonic() + window
    idle_until = drain_until - (late_by or 0.0)
    ticks = 0
    settings: PipelineSettings | None = None
    while True:
        started = time.monotonic()
        try:
            settings = read_settings()
            full = tick(settings)
        except Exception as exc:
            if not is_transient(exc):
                raise
            full = False
            reason = f"{type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0][:200]}"
            run_logger().warning("tick failed on a passing error (%s); next tick at the usual interval", reason)
            if on_error is not None:
                try:
                    on_error(exc)
                except Exception as cleanup:  # the database may be the thing that is away
                    run_logger().warning("clean-up after the failed tick failed too (%s)", type(cleanup).__name__)
        ticks += 1
        if max_ticks is not None and ticks >= max_ticks:
            return ticks
        if full and (window == 0 or time.monotonic() < drain_until):
            continue
        every = interval_ms(settings) / 1000 if settings is not None else 2.0
        pause = max(0.0, every - (time.monotonic() - started))
        if time.monotonic() + pause >= idle_until:
            return ticks
        time.sleep(pause)


def add_counts(total: Any, part: Any) -> None:
    """Add the integer fields of one report dataclass into another of the same kind."""
    for key, value in asdict(part).items():
        if isinstance(value, int):
            setattr(total, key, getattr(total, key) + value)


def counts(report: Any) -> dict[str, int]:
    return {k: v for k, v in asdict(report).items() if isinstance(v, int)}
