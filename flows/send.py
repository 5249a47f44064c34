"""`send-payments`: the seed's batch loop, as a Prefect flow.

A scheduled run ticks every `payment_batch_interval_ms` for `send_run_seconds`, then ends before the
next run is due (a Prefect schedule cannot tick every 4 s on its own: each run is a fresh process).
A tick that filled its batch starts the next one at once, so a backlog drains at full speed.
Each run owns the signer lanes it could lock; a second run finds them busy and leaves them alone."""

from __future__ import annotations

import time
from typing import Annotated, Any

from prefect import flow, unmapped
from prefect.runtime import flow_run
from pydantic import Field

from flows.runs import StateChanges, finish_run, has_work, running_name
from flows.ticks import LANE_REST_SECONDS, add_counts, counts, run_window, tick_loop, with_retries
from payments.db import fetch_all, transaction
from payments.settings import PipelineSettings
from tasks.common import Lanes, Pipeline, chunked, new_owner_id, run_logger
from tasks.send import (
    BROADCAST_CHUNK,
    SendReport,
    broadcast_chunk_task,
    prepare_lane_batch_task,
    release_expired_leases,
)


def send_tick(p: Pipeline, lanes: list[Any], owner: str, settings: PipelineSettings) -> SendReport:
    """One tick over every owned lane: prepare each lane (concurrently), then broadcast in chunks."""
    report = SendReport()
    if not has_work(p.engine, "send", p.chain_id):
        return report  # idle: no task runs
    expired = release_expired_leases(p, owner)
    prepared = [prepare_lane_batch_task.submit(p, signer, owner, settings) for signer in lanes]
    chunks: list[list[tuple[str, str]]] = []
    for future in prepared:
        part, pairs = future.result()
        add_counts(report, part)
        chunks += chunked(pairs, BROADCAST_CHUNK)
    broadcasts = broadcast_chunk_task.map(unmapped(p), unmapped(owner), chunks) if chunks else []
    for done in broadcasts:
        sent, refused = done.result()
        report.sent += sent
        report.not_accepted += refused
    log = run_logger()
    if expired:
        log.warning("Requeued %d payments whose send lease expired before signing", len(expired))
    if report.claimed or report.resumed:
        log.info("✅ Batch complete: %d succeeded", report.sent)
    return report


@flow(name="send-payments", flow_run_name=running_name("send-payments"))
def send_payments(
    run_seconds: Annotated[int | None, Field(ge=0, le=3600)] = None,
    max_ticks: Annotated[int | None, Field(ge=1, le=100_000)] = None,
) -> dict[str, int]:
    """Claim, simulate, sign, persist and broadcast pending payments for `run_seconds`
    (default: system_settings.send_run_seconds; 0 = a single tick)."""
    started = time.monotonic()
    p = with_retries(Pipeline.from_env)
    settings = with_retries(p.settings)
    window = run_window(settings.send_run_seconds) if run_seconds is None else run_seconds
    owner = new_owner_id(f"send-{flow_run.get_id() or 'local'}")
    total = SendReport()
    log = run_logger()
    lanes = Lanes(p.engine, p.chain_id, p.signers)
    changes = with_retries(lambda: StateChanges(p.engine, owner))
    try:
        if not lanes.take():
            log.info("Every signer lane is held by another send run; standing by to take them over")

        def tick(settings: PipelineSettings) -> bool:
            owned = lanes.take()  # a standby run takes over the lanes a finished or dead run let go
            if not owned:
                return False
            report = send_tick(p, owned, owner, settings)
            add_counts(total, report)
            if report.claimed or report.resumed:
                changes.log()
            return report.claimed >= settings.payment_batch_size * len(owned)

        def let_go(_: BaseException) -> None:
            """A failed tick: its unsigned claims go back and the lanes rest, for a standby run that can
            still reach the chain and the database (the next tick takes them again if none did)."""
            lanes.rest(LANE_REST_SECONDS)
            with transaction(p.engine, owner) as conn:
                fetch_all(conn, "release_owned_claims", owner=owner)

        try:
            tick_loop(p.settings, window, lambda s: s.payment_batch_interval_ms, tick, max_ticks, on_error=let_go)
        finally:  # claims this run did not sign go back now (a killed run's wait for their lease)
            with transaction(p.engine, owner) as conn:
                given_back = fetch_all(conn, "release_owned_claims", owner=owner)
            if given_back:
                log.info("Gave back %d claimed payments this run did not sign", len(given_back))
    finally:
        lanes.release()
    finish_run("send", counts(total), started)
    return counts(total)
