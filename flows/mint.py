"""`mint-tokens`: mints what completed payments bought, from the minter wallet, and confirms it.
Ticks every `confirmation_interval_ms` for `confirm_run_seconds`, like the confirmation loop."""

from __future__ import annotations

import time
from typing import Annotated

from prefect import flow
from prefect.runtime import flow_run
from pydantic import Field

from flows.send import asdict_counts
from payments.config import load_minter
from tasks.common import Pipeline, new_owner_id, run_logger, signer_lanes
from tasks.mint import MintReport, mint_tick_task


@flow(name="mint-tokens")
def mint_tokens(
    run_seconds: Annotated[int | None, Field(ge=0, le=3600)] = None,
    max_ticks: Annotated[int | None, Field(ge=1, le=100_000)] = None,
) -> dict[str, int]:
    p = Pipeline.from_env()
    minter = load_minter()
    settings = p.settings()
    window = settings.confirm_run_seconds if run_seconds is None else run_seconds
    owner = new_owner_id(f"mint-{flow_run.get_id() or 'local'}")
    total = MintReport()
    with signer_lanes(p.engine, p.chain_id, [minter]) as lanes:
        if not lanes:
            run_logger().info("The minter lane is held by another mint run; nothing to do")
            return asdict_counts(total)
        deadline = time.monotonic() + window
        ticks = 0
        while True:
            started = time.monotonic()
            settings = p.settings()
            report = mint_tick_task(p, minter, owner, settings)
            for key in ("claimed", "failed", "sent", "minted", "rebroadcast"):
                setattr(total, key, getattr(total, key) + getattr(report, key))
            ticks += 1
            if max_ticks is not None and ticks >= max_ticks:
                break
            if report.claimed >= settings.mint_batch_size and (window == 0 or time.monotonic() < deadline):
                continue
            pause = max(0.0, settings.confirmation_interval_ms / 1000 - (time.monotonic() - started))
            if time.monotonic() + pause >= deadline:
                break
            time.sleep(pause)
    if total.minted:
        run_logger().info("✅ %d mints confirmed", total.minted)
    return asdict_counts(total)
