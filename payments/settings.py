"""The `system_settings` registry: every setting's name, type, range, default and description, in one
place. The pipeline's settings, the monitor's thresholds, the webhook settings and the operator API all
read and write through it, so a value outside its range or of the wrong type is refused when it is
written and named when it is read. Every run reads the table afresh, so operators change behaviour with
one write and no restart."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

from sqlalchemy import Connection, text

from payments.errors import ConfigurationError

_INTEGER = re.compile(r"^-?[0-9]{1,40}$")
_DECIMAL = re.compile(r"^-?[0-9]{1,20}(\.[0-9]{1,20})?$")


class InvalidSettingError(ConfigurationError):
    """A value that a setting cannot take, or a setting that does not exist."""

    def __init__(self, name: str, message: str, setting: Setting | None = None) -> None:
        super().__init__(message)
        self.name = name
        self.setting = setting


@dataclass(frozen=True)
class Setting:
    name: str
    type: type  # int or float
    low: int | float
    high: int | float
    default: int | float
    description: str
    component: str  # who reads it: pipeline, monitor, webhooks or api

    @property
    def type_name(self) -> str:
        return "integer" if self.type is int else "number"

    @property
    def range_text(self) -> str:
        return f"an {self.type_name} in [{self.low}, {self.high}]" if self.type is int else \
            f"a {self.type_name} in [{self.low}, {self.high}]"

    def parse(self, raw: object) -> int | float:
        """The typed value of `raw` (text as stored, or a number), or InvalidSettingError naming the
        setting and its range. Only plain decimal text counts: no hex, exponents, NaN or Infinity."""
        value: int | float
        text_ = str(raw).strip() if isinstance(raw, str | int) and not isinstance(raw, bool) else None
        if isinstance(raw, float) and self.type is float and raw == raw and abs(raw) != float("inf"):
            text_ = repr(raw)
        pattern = _INTEGER if self.type is int else _DECIMAL
        if text_ is None or not pattern.match(text_):
            raise InvalidSettingError(self.name, f"system_settings.{self.name}={str(raw)[:40]!r} is not "
                                                 f"{self.range_text}", self)
        value = int(text_) if self.type is int else float(text_)
        if not self.low <= value <= self.high:
            raise InvalidSettingError(self.name, f"system_settings.{self.name}={value} is outside "
                                                 f"[{self.low}, {self.high}]", self)
        return value

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "type": self.type_name, "min": self.low, "max": self.high,
                "default": self.default, "description": self.description, "component": self.component}


def _s(name: str, kind: type, low: int | float, high: int | float, default: int | float, description: str,
       component: str) -> Setting:
    return Setting(name, kind, low, high, default, description, component)


REGISTRY: dict[str, Setting] = {s.name: s for s in (
    # pipeline (send, confirm, mint)
    _s("payment_batch_interval_ms", int, 50, 3_600_000, 4000, "Send loop tick (ms)", "pipeline"),
    _s("payment_batch_size", int, 1, 100_000, 10, "Pending payments claimed per send tick and signer lane",
       "pipeline"),
    _s("confirmation_interval_ms", int, 50, 3_600_000, 2000, "Confirmation loop tick (ms)", "pipeline"),
    _s("confirmation_batch_size", int, 1, 100_000, 20, "Sent payments checked per confirmation pass", "pipeline"),
    _s("confirmation_timeout_seconds", int, 1, 86_400, 300,
       "Age in sent after which an unconfirmed payment raises an alert (fee bumps go by blocks)", "pipeline"),
    _s("confirmation_depth", int, 1, 1_000, 2,
       "Blocks (the settlement's own included) before a payment counts as completed", "pipeline"),
    _s("rebroadcast_after_seconds", int, 0, 86_400, 30, "Re-send the stored bytes of an open nonce after this",
       "pipeline"),
    _s("processing_lease_seconds", int, 5, 86_400, 60, "How long a send run owns the payments it claimed",
       "pipeline"),
    _s("fee_bump_percent", int, 10, 1_000, 20, "Replacement fee increase (both fees); at least 10", "pipeline"),
    _s("settlement_gas_limit", int, 21_000, 30_000_000, 150_000, "Gas limit of one settlement", "pipeline"),
    _s("send_run_seconds", int, 0, 3_600, 300,
       "Length of one send run, and the interval of its schedule (next deploy)", "pipeline"),
    _s("confirm_run_seconds", int, 0, 3_600, 300,
       "Length of one confirm, mint, webhooks or monitor run, and their schedule interval (next deploy)", "pipeline"),
    _s("mint_batch_size", int, 1, 100_000, 50, "Released mints sent per mint tick", "pipeline"),
    _s("mint_gas_limit", int, 21_000, 30_000_000, 200_000, "Cap on one mint transaction's gas", "pipeline"),
    _s("mint_confirmation_depth", int, 1, 1_000, 4,
       "Blocks before the mints of a settlement are released (never fewer than confirmation_depth)", "pipeline"),
    _s("fee_bump_after_blocks", int, 1, 1_000, 3, "Blocks without inclusion before a transaction is re-priced",
       "pipeline"),
    _s("max_fee_per_gas_cap", int, 10**6, 10**16, 500 * 10**9, "No attempt pays more than this max fee per gas (wei)",
       "pipeline"),
    _s("finality_depth", int, 1, 10_000, 12,
       "Blocks after which an expired, unused authorization counts as final", "pipeline"),
    # monitor
    _s("monitor_interval_seconds", int, 5, 86_400, 30,
       "How often the monitor evaluates the thresholds (inside its run)", "monitor"),
    _s("monitor_window_minutes", int, 1, 10_080, 60, "Window for confirmation rate and processing time", "monitor"),
    _s("monitor_sample_retention_days", int, 1, 3_650, 7, "Monitor samples older than this are deleted", "monitor"),
    _s("alert_sent_age_seconds", float, 1, 604_800, 60, "Alert if a payment has been in sent longer than this",
       "monitor"),
    _s("alert_confirmation_rate_min", float, 0, 1, 0.90,
       "Alert if completed / (completed + confirmation_failed) falls below this", "monitor"),
    _s("alert_processing_time_seconds", float, 1, 604_800, 60,
       "Alert if the p95 of processed_at - created_at exceeds this", "monitor"),
    _s("alert_stuck_seconds", float, 1, 604_800, 300,
       "Alert on any payment stuck in sent or processing longer than this", "monitor"),
    _s("alert_reminder_seconds", float, 0, 604_800, 900, "Repeat the notification of an open alert this often",
       "monitor"),
    _s("alert_rate_min_samples", int, 1, 1_000_000, 20,
       "Outcomes in the window before the confirmation-rate alert may open", "monitor"),
    _s("alert_reverted_settlements", int, 0, 1_000_000, 3,
       "Alert when more settlements than this reverted on chain (our gas) in the window", "monitor"),
    _s("alert_queue_trend_samples", int, 2, 1_000, 5,
       "Alert if queue depth has not decreased over this many monitor runs", "monitor"),
    _s("alert_min_gas_balance_wei", int, 0, 10**30, 10**16, "Alert if a signer holds less native gas than this",
       "monitor"),
    _s("alert_nonce_drift", int, 0, 1_000_000, 10,
       "Alert if a signer's local nonce counter and the chain differ by more", "monitor"),
    # webhooks
    _s("webhook_max_attempts", int, 1, 100, 8, "Give a webhook delivery up after this many failed attempts",
       "webhooks"),
    _s("webhook_backoff_seconds", int, 0, 3_600, 5, "First retry delay; doubles per attempt, capped at one hour",
       "webhooks"),
    # api
    _s("max_open_payments_per_payer", int, 1, 100_000, 100,
       "Payments one payer may have pending, processing or sent at once; more are refused at intake", "api"),
)}


def setting(name: str) -> Setting:
    try:
        return REGISTRY[name]
    except KeyError:
        raise InvalidSettingError(name, f"there is no setting named {name[:64]!r}") from None


def typed_values(rows: Mapping[str, str], component: str | None = None) -> dict[str, int | float]:
    """Every registered setting (of one component, or all) from stored rows, defaults for the missing
    ones. A stored value a setting cannot take raises InvalidSettingError naming it; keys the registry
    does not know are ignored."""
    values: dict[str, int | float] = {}
    for s in REGISTRY.values():
        if component is None or s.component == component:
            values[s.name] = s.parse(rows[s.name]) if s.name in rows else s.default
    return values


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
    send_run_seconds: int = 300
    confirm_run_seconds: int = 300
    mint_batch_size: int = 50
    mint_gas_limit: int = 200_000
    mint_confirmation_depth: int = 4
    fee_bump_after_blocks: int = 3
    max_fee_per_gas_cap: int = 500 * 10**9
    finality_depth: int = 12

    def __post_init__(self) -> None:
        for f in fields(self):
            REGISTRY[f.name].parse(getattr(self, f.name))

    @property
    def mint_depth(self) -> int:
        """Blocks before mints are released: never fewer than a payment needs to count as completed."""
        return max(self.mint_confirmation_depth, self.confirmation_depth)


def parse_settings(rows: Mapping[str, str]) -> PipelineSettings:
    return PipelineSettings(**{k: int(v) for k, v in typed_values(rows, "pipeline").items()})


def stored_settings(conn: Connection) -> dict[str, str]:
    return {str(k): str(v) for k, v in conn.execute(text("SELECT key, value FROM system_settings"))}


def read_settings(conn: Connection) -> PipelineSettings:
    return parse_settings(stored_settings(conn))


def read_values(conn: Connection, component: str | None = None) -> dict[str, int | float]:
    """The typed settings of one component (or all), checked against the registry."""
    return typed_values(stored_settings(conn), component)


def write_setting(conn: Connection, key: str, value: int | float | str) -> int | float:
    """Change one setting, refused (InvalidSettingError) unless the registry knows it and the value fits
    its type and range. Returns the typed value stored."""
    typed = setting(key).parse(value)
    conn.execute(
        text(
            "INSERT INTO system_settings (key, value, description) VALUES (:k, :v, :d) "
            "ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value, updated_at = now()"
        ),
        {"k": key, "v": format_value(typed), "d": REGISTRY[key].description},
    )
    return typed


def format_value(value: int | float) -> str:
    """How a typed value is stored: plain decimal text that the registry parses back to the same value."""
    if isinstance(value, float):
        return str(int(value)) if value.is_integer() else repr(value)
    return str(value)
