"""`mint-tokens`: mints what completed payments bought, from the minter wallet, and confirms it.
Ticks every `confirmation_interval_ms` for `confirm_run_seconds`, like the confirmation loop."""

from __future__ import annotations

import time
from typing import Annotated

from prefect import flow
from prefect.runtime import flow_run
from pydantic import Field

from flows.runs import finish_run, has_work, running_name
from flows.ticks import LANE_REST_SECONDS, add_counts, counts, run_window, tick_loop, with_retries
from payments.config import load_minter
from payments.settings import PipelineSettings
from tasks.common import Lanes, Pipeline, new_owner_id, run_logger
from tasks.mint import MintReport, mint_tick, mint_tick_task


@flow(name="mint-tokens", flow_run_name=running_name("mint-tokens"))
def mint_tokens(
    run_seconds: Annotated[int | None, Field(ge=0, le=3600)] = None,
    max_ticks: Annotated[int | None, Field(ge=1, le=100_000)] = None,
) -> dict[str, int]:
    started = time.monotonic()
    p = with_retries(Pipeline.from_env)
    minter = load_minter()
    settings = with_retries(p.settings)
    window = run_window(settings.confirm_run_seconds) if run_seconds is None else run_seconds
    owner = new_owner_id(f"mint-{flow_run.get_id() or 'local'}")
    total = MintReport()
    lanes = Lanes(p.engine, p.chain_id, [minter])
    try:
        if not lanes.take():
            run_logger().info("The minter lane is held by another mint run; standing by to take it over")

        def tick(settings: PipelineSettings) -> bool:
            if not lanes.take():  # a standby run takes the lane over once the other run ends or dies
                return False
            report = (mint_tick_task(p, minter, owner, settings) if has_work(p.engine, "mint")
                      else mint_tick(p, minter, owner, settings))  # idle: the minter is tended, no task run
            add_counts(total, report)
            return report.claimed >= settings.mint_batch_size

        tick_loop(p.settings, window, lambda s: s.confirmation_interval_ms, tick, max_ticks,
                  on_error=lambda _: lanes.rest(LANE_REST_SECONDS))  # a standby run may still reach the chain
    finally:
        lanes.release()
    if total.minted:
        run_logger().info("✅ %d mints confirmed", total.minted)
    finish_run("mint", counts(total), started)
    return counts(total)
