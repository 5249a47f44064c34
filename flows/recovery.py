"""Backfill / recovery flows, deployed unscheduled and run by hand from the Prefect UI.

Every flow takes filters (payment ids, age) and `dry_run` (default true: only report), applies its
changes through the pipeline's guarded statements, writes one recovery_actions row per payment it
looked at (status changes are audited in payment_events too) and publishes a table artifact of what
it did or would do."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from typing import Annotated

from prefect import Flow, flow
from prefect.artifacts import create_table_artifact
from prefect.runtime import flow_run
from pydantic import Field
from sqlalchemy import text

from flows.runs import finish_run, running_name
from tasks.common import Pipeline, run_logger
from tasks.recovery import (
    Action,
    Filters,
    recheck_confirmation_failed,
    reconcile_block_range,
    record_actions,
    requeue_failed,
    reset_stuck_payments,
    resync_nonces,
    retry_failed_mints,
    rollback_to_failed,
)

PaymentIds = Annotated[list[str] | None, Field(description="only these payment ids (empty: all that match)")]
OlderThan = Annotated[int, Field(ge=0, le=30 * 86_400, description="only payments untouched for this many seconds")]
Limit = Annotated[int, Field(ge=1, le=100_000, description="look at no more than this many payments")]
DryRun = Annotated[bool, Field(description="true (default): only report what would be done, change nothing; "
                                           "false: apply it")]


PARAMETER_HELP = {
    "payment_ids": "Only these payment ids (leave empty for every payment that matches the other filters).",
    "older_than_seconds": "Only payments untouched for at least this many seconds (0: any age).",
    "limit": "Look at no more than this many payments in this run.",
    "dry_run": "On (default): only report what would be done, in the run's table artifact; nothing changes. "
               "Off: apply it (each change is audited in payment_events and recovery_actions).",
    "reason": "Why the payments are given up; stored on each payment and shown to the buyer's status query.",
    "from_block": "First block to scan.",
    "to_block": "Last block to scan (at most 5,000 blocks after from_block).",
}


def described(fn: Callable[..., dict[str, int]]) -> Callable[..., dict[str, int]]:
    """Append an `Args:` section from PARAMETER_HELP to the docstring: Prefect puts it in the
    deployment's parameter schema, so the UI's run form explains every field."""
    import inspect

    lines = [f"    {name}: {PARAMETER_HELP[name]}" for name in inspect.signature(fn).parameters]
    fn.__doc__ = f"{inspect.cleandoc(fn.__doc__ or '')}\n\nArgs:\n" + "\n".join(lines)
    return fn


def _states(p: Pipeline, actor: str, ids: list[str]) -> dict[str, tuple[str | None, str | None]]:
    """(status before, status after) of each payment: the audit trail says what this run changed."""
    if not ids:
        return {}
    with p.engine.connect() as conn:
        now = {r[0]: r[1] for r in conn.execute(text("SELECT id, status FROM payment_queue WHERE id = ANY(:i)"),
                                                {"i": ids})}
        first = {r[0]: r[1] for r in conn.execute(text(
            "SELECT DISTINCT ON (payment_id) payment_id, from_status FROM payment_events "
            "WHERE actor = :a AND payment_id = ANY(:i) ORDER BY payment_id, id"), {"a": actor, "i": ids})}
    return {i: (first.get(i, now.get(i)), now.get(i)) for i in ids}


def _finish(p: Pipeline, name: str, actor: str, dry_run: bool, actions: list[Action],
            started: float) -> dict[str, int]:
    record_actions(p, name, actor, dry_run, actions)
    states = _states(p, actor, sorted({a.payment_id for a in actions if a.payment_id}))
    rows = [{"payment": a.payment_id, "action": a.action, "outcome": a.outcome,
             "status before": states.get(a.payment_id or "", (None, None))[0],
             "status after": states.get(a.payment_id or "", (None, None))[1], "why": a.detail} for a in actions]
    create_table_artifact(
        key=name.replace("_", "-"),
        table=rows or [{"payment": None, "action": "none", "outcome": "unchanged", "status before": None,
                        "status after": None, "why": "nothing matched the filters"}],
        description=f"{name} ({'dry run: nothing changed' if dry_run else 'applied'})",
    )
    counts = Counter(a.outcome for a in actions)
    run_logger().info("%s%s: %s", name, " (dry run)" if dry_run else "", dict(counts) or "nothing matched")
    finish_run(f"{name.replace('_', '-')} ({'dry run' if dry_run else 'applied'})", dict(counts), started)
    return dict(counts)


def _run(name: str, dry_run: bool, work: Callable[[Pipeline, str], list[Action]]) -> dict[str, int]:
    started = time.monotonic()
    p = Pipeline.from_env()
    actor = f"recovery:{name}:{flow_run.get_id() or 'local'}"
    return _finish(p, name, actor, dry_run, work(p, actor), started)


@flow(name="reset-stuck-payments", flow_run_name=running_name("reset-stuck-payments"))
@described
def reset_stuck_payments_flow(payment_ids: PaymentIds = None, older_than_seconds: OlderThan = 0,
                              limit: Limit = 1000, dry_run: DryRun = True) -> dict[str, int]:
    """Expired processing leases back to pending (or re-broadcast and sent when signed); sent past
    confirmation_timeout_seconds decided from the chain like the confirm stage, then every wallet's
    stuck transactions re-sent, re-priced or filled."""
    f = Filters(payment_ids, older_than_seconds, limit)
    return _run("reset_stuck_payments", dry_run,
                lambda p, actor: reset_stuck_payments(p, f, p.settings(), dry_run=dry_run, actor=actor))


@flow(name="recheck-confirmation-failed", flow_run_name=running_name("recheck-confirmation-failed"))
@described
def recheck_confirmation_failed_flow(payment_ids: PaymentIds = None, older_than_seconds: OlderThan = 0,
                                     limit: Limit = 1000, dry_run: DryRun = True) -> dict[str, int]:
    """confirmation_failed / failed payments whose authorization the chain shows used after all become
    completed; their mints are released once."""
    f = Filters(payment_ids, older_than_seconds, limit)
    return _run("recheck_confirmation_failed", dry_run,
                lambda p, actor: recheck_confirmation_failed(p, f, p.settings(), dry_run=dry_run, actor=actor))


@flow(name="requeue-failed", flow_run_name=running_name("requeue-failed"))
@described
def requeue_failed_flow(payment_ids: PaymentIds = None, older_than_seconds: OlderThan = 0, limit: Limit = 1000,
                        dry_run: DryRun = True) -> dict[str, int]:
    """failed payments back to pending when nothing was signed for them and the authorization is still usable."""
    f = Filters(payment_ids, older_than_seconds, limit)
    return _run("requeue_failed", dry_run, lambda p, actor: requeue_failed(p, f, dry_run=dry_run, actor=actor))


@flow(name="rollback-to-failed", flow_run_name=running_name("rollback-to-failed"))
@described
def rollback_to_failed_flow(payment_ids: PaymentIds = None, older_than_seconds: OlderThan = 0, limit: Limit = 1000,
                            reason: str = "Rollback: reverted to sync mode", dry_run: DryRun = True) -> dict[str, int]:
    """sent / confirmation_failed -> failed with a reason; refused while the authorization is used on
    chain or could still be used (not expired finality_depth blocks deep)."""
    f = Filters(payment_ids, older_than_seconds, limit)
    return _run("rollback_to_failed", dry_run,
                lambda p, actor: rollback_to_failed(p, f, p.settings(), reason=reason, dry_run=dry_run, actor=actor))


@flow(name="resync-nonces", flow_run_name=running_name("resync-nonces"))
@described
def resync_nonces_flow(dry_run: DryRun = True) -> dict[str, int]:
    """Every wallet (signers, minter, removed signers): counter raised to the chain's pending count, then
    stored transactions re-sent, stale or underpriced ones re-priced, dead intents and gaps filled."""
    return _run("resync_nonces", dry_run, lambda p, actor: resync_nonces(p, p.settings(), dry_run=dry_run, actor=actor))


@flow(name="reconcile-block-range", flow_run_name=running_name("reconcile-block-range"))
@described
def reconcile_block_range_flow(from_block: Annotated[int, Field(ge=0, description="first block to scan")],
                               to_block: Annotated[int, Field(ge=0, description="last block (at most 5,000 blocks)")],
                               dry_run: DryRun = True) -> dict[str, int]:
    """Our signers' transactions in a block range matched to payments and decided from the chain;
    transactions the database does not know are reported."""
    return _run("reconcile_block_range", dry_run,
                lambda p, actor: reconcile_block_range(p, from_block, to_block, p.settings(), dry_run=dry_run,
                                                       actor=actor))


@flow(name="retry-failed-mints", flow_run_name=running_name("retry-failed-mints"))
@described
def retry_failed_mints_flow(payment_ids: PaymentIds = None, limit: Limit = 1000,
                            dry_run: DryRun = True) -> dict[str, int]:
    """Failed mints of completed payments back to released (same mint id: the token refuses a second
    mint), once the cause is fixed; refused while an earlier attempt could still be mined."""
    f = Filters(payment_ids, 0, limit)
    return _run("retry_failed_mints", dry_run, lambda p, actor: retry_failed_mints(p, f, dry_run=dry_run,
                                                                                   actor=actor))


RECOVERY_FLOWS: list[Flow[..., dict[str, int]]] = [
    reset_stuck_payments_flow, recheck_confirmation_failed_flow, requeue_failed_flow, rollback_to_failed_flow,
    resync_nonces_flow, reconcile_block_range_flow, retry_failed_mints_flow,
]
