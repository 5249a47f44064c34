"""What every pipeline run says about itself: a cheap check whether a tick has work (so idle ticks
create no task runs), and at the end one INFO line and a run name that say what the run did."""

from __future__ import annotations

import time
from collections.abc import Callable
from uuid import UUID

from sqlalchemy import Engine, text

from tasks.common import run_logger

_WORK = {
    "send": "SELECT EXISTS (SELECT 1 FROM payment_queue WHERE chain_id = :c AND (status = 'pending' "
            "OR (status = 'processing' AND lease_expires_at < now())))",
    "confirm": "SELECT EXISTS (SELECT 1 FROM payment_queue WHERE chain_id = :c AND (status = 'sent' "
               "OR (status = 'completed' AND final_at IS NULL)))",
    "mint": "SELECT EXISTS (SELECT 1 FROM mint_queue WHERE status IN ('released', 'minting'))",
    "webhooks": "SELECT EXISTS (SELECT 1 FROM webhook_deliveries WHERE status = 'pending' "
                "AND next_attempt_at <= now())",
}


def running_name(stage: str) -> Callable[[], str]:
    """A run's name while it runs (finish_run renames it to what it did): the stage, and for recovery
    flows whether it is a dry run."""

    def name() -> str:
        from prefect.runtime import flow_run

        params = flow_run.get_parameters() or {}
        mode = "" if "dry_run" not in params else " (dry run)" if params["dry_run"] else " (apply)"
        return f"{stage}{mode} from {time.strftime('%H:%M:%S')}: running"

    return name


def has_work(engine: Engine, stage: str, chain_id: int = 0) -> bool:
    """Whether a tick of this stage has rows to work on (an indexed EXISTS; no task run is made for an
    idle tick)."""
    with engine.connect() as conn:
        return bool(conn.execute(text(_WORK[stage]), {"c": chain_id}).scalar())


class StateChanges:
    """INFO lines, after each tick that moved payments, naming which payments this run moved to which
    status (from the audit trail, payment_events, whose actor is the run's owner id): the run page says
    which payments it handled, and the UI's log search finds the run of a payment id."""

    SHOWN = 20

    def __init__(self, engine: Engine, actor_prefix: str) -> None:
        self.engine, self.prefix = engine, actor_prefix
        with engine.connect() as conn:
            self.last = int(conn.execute(text("SELECT coalesce(max(id), 0) FROM payment_events")).scalar_one())

    def log(self) -> None:
        try:
            with self.engine.connect() as conn:
                rows = conn.execute(text(
                    "SELECT to_status, array_agg(payment_id ORDER BY id), max(id) FROM payment_events "
                    "WHERE id > :last AND starts_with(actor, :prefix) GROUP BY to_status"),
                    {"last": self.last, "prefix": self.prefix}).all()
                self.last = max([self.last, *(int(r[2]) for r in rows)])
        except Exception as exc:  # a log line is never worth failing a tick for
            run_logger().debug("could not read the state changes: %s", exc)
            return
        for status, ids, _ in sorted(rows, key=lambda r: str(r[0])):
            more = f" (+{len(ids) - self.SHOWN} more)" if len(ids) > self.SHOWN else ""
            run_logger().info("-> %s: %d payment(s): %s%s", status, len(ids), ", ".join(ids[: self.SHOWN]), more)


def summary(report: dict[str, int]) -> str:
    return ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in report.items() if v) or "nothing to do"


def finish_run(stage: str, report: dict[str, int], started: float) -> None:
    """One INFO line with the run's counts, and the run renamed to say what it did."""
    line = summary(report)
    run_logger().info("%s run done in %.0f s: %s", stage, time.monotonic() - started, line)
    try:
        from prefect.client.orchestration import get_client
        from prefect.runtime import flow_run

        run_id = flow_run.get_id()
        if run_id:
            with get_client(sync_client=True) as client:
                client.update_flow_run(UUID(str(run_id)), name=f"{stage} {time.strftime('%H:%M:%S')}: {line}"[:120])
    except Exception as exc:  # a name is never worth failing a run for
        run_logger().debug("could not rename the run: %s", exc)
