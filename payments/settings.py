"""Typed view of the `system_settings` table. Every run reads it afresh, so operators change
behaviour with one UPDATE and no restart."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

from sqlalchemy import Connection, text

from payments.errors import ConfigurationError


@dataclass(frozen=True)
class PipelineSettings:
    payment_batch_interval_ms: int = 4000
    payment_batch_size: int = 10
    confirmation_interval_ms: int = 2000
    confirmation_batch_size: int = 20
    confirmation_timeout_seconds: int = 300
    confirmation_depth: int = 2
    rebroadcast_after_seconds: int = 30
    processing_lease_seconds: int = 60
    fee_bump_percent: int = 20
    settlement_gas_limit: int = 150_000
    send_run_seconds: int = 25
    confirm_run_seconds: int = 25
    mint_batch_size: int = 50
    mint_gas_limit: int = 200_000
    mint_confirmation_depth: int = 4
    fee_bump_after_blocks: int = 3
    max_fee_per_gas_cap: int = 500 * 10**9
    finality_depth: int = 12

    def __post_init__(self) -> None:
        bounds = {
            "payment_batch_interval_ms": (50, 3_600_000),
            "payment_batch_size": (1, 100_000),
            "confirmation_interval_ms": (50, 3_600_000),
            "confirmation_batch_size": (1, 100_000),
            "confirmation_timeout_seconds": (1, 86_400),
            "confirmation_depth": (1, 1_000),
            "rebroadcast_after_seconds": (0, 86_400),
            "processing_lease_seconds": (5, 86_400),
            "fee_bump_percent": (10, 1_000),
            "settlement_gas_limit": (21_000, 30_000_000),
            "send_run_seconds": (0, 3_600),
            "confirm_run_seconds": (0, 3_600),
            "mint_batch_size": (1, 100_000),
            "mint_gas_limit": (21_000, 30_000_000),
            "mint_confirmation_depth": (1, 1_000),
            "fee_bump_after_blocks": (1, 1_000),
            "max_fee_per_gas_cap": (10**6, 10**16),
            "finality_depth": (1, 10_000),
        }
        for name, (low, high) in bounds.items():
            value = getattr(self, name)
            if not low <= value <= high:
                raise ConfigurationError(f"system_settings.{name}={value} is outside [{low}, {high}]")

    @property
    def mint_depth(self) -> int:
        """Blocks before mints are released: never fewer than a payment needs to count as completed."""
        return max(self.mint_confirmation_depth, self.confirmation_depth)


_INT_FIELDS = {f.name for f in fields(PipelineSettings)}


def parse_settings(rows: dict[str, str]) -> PipelineSettings:
    values: dict[str, Any] = {}
    for key, raw in rows.items():
        if key not in _INT_FIELDS:
            continue  # settings of other components (monitor thresholds, …)
        try:
            values[key] = int(raw)
        except ValueError:
            raise ConfigurationError(f"system_settings.{key}={raw!r} is not an integer") from None
    return PipelineSettings(**values)


def read_settings(conn: Connection) -> PipelineSettings:
    rows = conn.execute(text("SELECT key, value FROM system_settings")).all()
    return parse_settings({str(k): str(v) for k, v in rows})


def write_setting(conn: Connection, key: str, value: int | str) -> None:
    """Change one setting, validated against the typed view before it is stored."""
    current = {str(k): str(v) for k, v in conn.execute(text("SELECT key, value FROM system_settings")).all()}
    current[key] = str(value)
    parse_settings(current)
    conn.execute(
        text(
            "INSERT INTO system_settings (key, value) VALUES (:k, :v) "
            "ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value, updated_at = now()"
        ),
        {"k": key, "v": str(value)},
    )
