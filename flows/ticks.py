"""The loop every pipeline flow runs: a Prefect schedule cannot tick every 2-4 s (each run is a fresh
process), so one scheduled run ticks at the seed's interval for a bounded window and then ends."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict
from typing import Any

from payments.settings import PipelineSettings


def tick_loop(read_settings: Callable[[], PipelineSettings], window: int,
              interval_ms: Callable[[PipelineSettings], int], tick: Callable[[PipelineSettings], bool],
              max_ticks: int | None = None) -> int:
    """Call `tick` (settings re-read each time) every interval for `window` seconds. A tick that returns
    True found a full batch: the next one starts at once (window 0: drain until a tick is not full).
    Returns the number of ticks."""
    deadline = time.monotonic() + window
    ticks = 0
    while True:
        started = time.monotonic()
        settings = read_settings()
        full = tick(settings)
        ticks += 1
        if max_ticks is not None and ticks >= max_ticks:
            return ticks
        if full and (window == 0 or time.monotonic() < deadline):
            continue
        pause = max(0.0, interval_ms(settings) / 1000 - (time.monotonic() - started))
        if time.monotonic() + pause >= deadline:
            return ticks
        time.sleep(pause)


def add_counts(total: Any, part: Any) -> None:
    """Add the integer fields of one report dataclass into another of the same kind."""
    for key, value in asdict(part).items():
        if isinstance(value, int):
            setattr(total, key, getattr(total, key) + value)


def counts(report: Any) -> dict[str, int]:
    return {k: v for k, v in asdict(report).items() if isinstance(v, int)}
