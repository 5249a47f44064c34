"""The seed's monitoring metrics, computed with pandas from SQL, and the alert thresholds.

queue depth (pending), age in `sent` (mean, p95, max), confirmation rate
completed / (completed + confirmation_failed) over a window, processing time processed_at - created_at
(p50, p95), counts per status, payments stuck past the timeout."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from datetime import datetime
from itertools import pairwise
from typing import Any

import pandas as pd
from sqlalchemy import Connection, Engine, text

from payments.chain import rpc_batch, to_int
from payments.db import query, transaction
from payments.errors import RpcError
from payments.settings import stored_settings, typed_values
from payments.statuses import PaymentStatus
from tasks.common import Pipeline


@dataclass(frozen=True)
class Thresholds:
    sent_age_seconds: float = 60
    confirmation_rate_min: float = 0.90
    processing_time_seconds: float = 60
    stuck_seconds: float = 300
    window_minutes: int = 60
    reminder_seconds: float = 900
    queue_trend_samples: int = 5
    min_gas_balance_wei: int = 10**16
    nonce_drift: int = 10
    sample_retention_days: int = 7
    rate_min_samples: int = 20
    reverted_settlements: int = 3

    @classmethod
    def from_settings(cls, rows: dict[str, str]) -> Thresholds:
        """From stored settings, typed and range-checked by the settings registry (a stored value a setting
        cannot take raises InvalidSettingError naming it)."""
        v = typed_values(rows, "monitor")
        return cls(
            sent_age_seconds=float(v["alert_sent_age_seconds"]),
            confirmation_rate_min=float(v["alert_confirmation_rate_min"]),
            processing_time_seconds=float(v["alert_processing_time_seconds"]),
            stuck_seconds=float(v["alert_stuck_seconds"]),
            window_minutes=int(v["monitor_window_minutes"]),
            reminder_seconds=float(v["alert_reminder_seconds"]),
            queue_trend_samples=int(v["alert_queue_trend_samples"]),
            min_gas_balance_wei=int(v["alert_min_gas_balance_wei"]),
            nonce_drift=int(v["alert_nonce_drift"]),
            sample_retention_days=int(v["monitor_sample_retention_days"]),
            rate_min_samples=int(v["alert_rate_min_samples"]),
            reverted_settlements=int(v["alert_reverted_settlements"]),
        )


@dataclass(frozen=True)
class QueueMetrics:
    counts: dict[str, int]
    queue_depth: int
    sent_age_mean: float | None
    sent_age_p95: float | None
    sent_age_max: float | None
    confirmation_rate: float | None
    processing_time_p50: float | None
    processing_time_p95: float | None
    stuck_sent: int
    stuck_processing: int
    failed_mints: int = 0
    window_outcomes: int = 0  # completed + confirmation_failed in the window: the rate's sample size
    reverted_settlements: int = 0  # settlements mined with status 0 in the window (our gas)

    def as_row(self) -> dict[str, Any]:
        row = asdict(self)
        row.update({f"count_{k}": v for k, v in row.pop("counts").items()})
        return row


def _seconds(delta: pd.Series) -> pd.Series:
    return delta.dt.total_seconds()


def _stat(series: pd.Series, how: str) -> float | None:
    if series.empty:
        return None
    value = series.quantile(0.95) if how == "p95" else series.quantile(0.5) if how == "p50" else getattr(series, how)()
    return round(float(value), 3)


def read_thresholds(conn: Connection) -> Thresholds:
    return Thresholds.from_settings(stored_settings(conn))


def compute_metrics(conn: Connection, thresholds: Thresholds, now: datetime | None = None) -> QueueMetrics:
    """All metrics from two reads: open payments (by age) and recent outcomes (by window)."""
    clock = pd.Timestamp(now) if now is not None else pd.Timestamp(conn.execute(text("SELECT now()")).scalar_one())
    counts = {s.value: 0 for s in PaymentStatus}
    counts.update({str(s): int(n) for s, n in conn.execute(query("status_counts"))})
    open_rows = pd.DataFrame(conn.execute(query("monitor_open_payments")).mappings().all(),
                             columns=["id", "status", "created_at", "processed_at", "sent_at", "lease_expires_at"])
    recent = pd.DataFrame(
        conn.execute(query("monitor_recent_outcomes"), {"now": now, "window_minutes": thresholds.window_minutes})
        .mappings().all(),
        columns=["id", "status", "created_at", "processed_at", "confirmed_at", "updated_at"],
    )
    sent = open_rows[open_rows["status"] == "sent"]
    sent_age = (_seconds(clock - pd.to_datetime(sent["sent_at"], utc=True)) if not sent.empty
                else pd.Series([], dtype=float))
    processing = open_rows[open_rows["status"] == "processing"]
    # a processing row whose lease has run out belongs to a send run that died and was not yet recovered
    leases = pd.to_datetime(processing["lease_expires_at"], utc=True)
    stuck_processing = int((leases < clock).sum()) if not processing.empty else 0
    outcomes = recent["status"].value_counts()
    completed = int(outcomes.get("completed", 0))
    conf_failed = int(outcomes.get("confirmation_failed", 0))
    rate = round(completed / (completed + conf_failed), 4) if completed + conf_failed else None
    processed = recent.dropna(subset=["processed_at"])
    processing_time = (_seconds(pd.to_datetime(processed["processed_at"], utc=True)
                                - pd.to_datetime(processed["created_at"], utc=True))
                       if not processed.empty else pd.Series([], dtype=float))
    return QueueMetrics(
        counts=counts,
        queue_depth=counts["pending"],
        sent_age_mean=_stat(sent_age, "mean"),
        sent_age_p95=_stat(sent_age, "p95"),
        sent_age_max=_stat(sent_age, "max"),
        confirmation_rate=rate,
        processing_time_p50=_stat(processing_time, "p50"),
        processing_time_p95=_stat(processing_time, "p95"),
        stuck_sent=int((sent_age > thresholds.stuck_seconds).sum()) if not sent_age.empty else 0,
        stuck_processing=stuck_processing,
        failed_mints=int(conn.execute(query("failed_mint_count")).scalar_one()),
        window_outcomes=completed + conf_failed,
        reverted_settlements=int(conn.execute(query("reverted_settlement_count"),
                                              {"window_minutes": thresholds.window_minutes}).scalar_one()),
    )


@dataclass(frozen=True)
class Alert:
    key: str
    message: str


RUNBOOK = {
    "sent_age": "payments wait in sent: the transaction manager re-sends, re-prices and fills on its own - check "
                "fee_cap / gas_low alerts and Late or Crashed confirm runs; then run reset-stuck-payments "
                "(dry run first)",
    "stuck": "run reset-stuck-payments (dry run first); look for Late or Crashed send/confirm runs",
    "confirmation_rate": "read the errors of the failed payments below; run recheck-confirmation-failed "
                         "(dry run first) if any may have landed",
    "processing_time": "check that send runs start on time (Late runs in the UI) and the signers have gas",
    "mints_failed": "fix the cause (minter role, minter gas), then run retry-failed-mints (dry run first)",
    "settlements_reverted": "look for payers whose authorizations overdraw their balance or are used elsewhere; "
                            "lower max_open_payments_per_payer",
    "queue_depth_not_decreasing": "check send runs (Late / Crashed) and signer gas; add signer lanes if saturated",
    "gas_low": "fund the wallet with the chain's native token",
    "nonce_drift": "run resync-nonces (dry run first)",
    "fee_cap": "raise system_settings.max_fee_per_gas_cap, or wait for base fees to fall",
    "unkeyed": "configure the wallet's key again until its open nonces are mined",
}


def runbook(key: str) -> str:
    return RUNBOOK.get(key.split(":", 1)[0], "see the README's Operations section")


def affected_payments(conn: Connection, key: str, limit: int = 5) -> tuple[list[str], int]:
    """The first few payments an alert is about (oldest first) and how many there are."""
    kind = key.split(":", 1)[0]
    where = {
        "sent_age": "status = 'sent'",
        "stuck": "(status = 'sent' OR (status = 'processing' AND lease_expires_at < now()))",
        "processing_time": "status IN ('pending', 'processing', 'sent')",
        "confirmation_rate": "status = 'confirmation_failed' AND updated_at >= now() - interval '1 hour'",
        "mints_failed": "id IN (SELECT payment_id FROM mint_queue WHERE status = 'failed')",
    }.get(kind)
    if where is None:
        return [], 0
    rows = conn.execute(text(f"SELECT id, count(*) OVER () FROM payment_queue WHERE {where} "
                             f"ORDER BY created_at LIMIT :n"), {"n": limit}).all()
    return [str(r[0]) for r in rows], int(rows[0][1]) if rows else 0


def _duration(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600} h {s % 3600 // 60} min" if s >= 3600 else f"{s // 60} min {s % 60} s" if s >= 60 else f"{s} s"


def notification_text(kind: str, alert: Alert, *, environment: str, opened_at: datetime | None,
                      now: datetime, affected: tuple[list[str], int], links: dict[str, str]) -> str:
    """The body of an alert notification: what, how bad, since when, which payments, what to do, where to
    look. Pure: unit-tested."""
    lines = [f"[{environment}] {alert.key} {kind}: {alert.message}"]
    if opened_at is not None:
        since = _duration((now - opened_at).total_seconds())
        lines.append(f"open for {since} (since {opened_at:%Y-%m-%d %H:%M:%S %Z})" if kind == "resolved"
                     else f"since {opened_at:%Y-%m-%d %H:%M:%S %Z} ({since})")
    ids, total = affected
    if ids and kind != "resolved":
        more = f" (+{total - len(ids)} more)" if total > len(ids) else ""
        lines.append(f"payments: {', '.join(ids)}{more}")
    if kind != "resolved":
        lines.append(f"what to do: {runbook(alert.key)}")
    lines += [f"{name}: {url}" for name, url in links.items()]
    return "\n".join(lines)


@dataclass(frozen=True)
class SignerHealth:
    address: str
    balance_wei: int
    mined_nonce: int
    pending_nonce: int
    local_nonce: int | None  # the pipeline's counter; None before the signer's first batch
    configured: bool = True  # this process holds its key (a removed signer is still watched)
    capped: int = 0  # open nonces whose latest attempt is held at max_fee_per_gas_cap

    @property
    def drift(self) -> int:
        """Local counter minus the node's pending count: > 0 means nonces the node does not hold (dropped
        or never broadcast: later ones are stuck behind them), < 0 means the wallet was used elsewhere."""
        return 0 if self.local_nonce is None else self.local_nonce - self.pending_nonce


def read_signer_health(p: Pipeline) -> list[SignerHealth]:
    """Gas balance, nonces and fee-cap holds of every wallet: configured signers, the minter, and any
    wallet that ever sent (a signer removed from the configuration stays watched). One JSON-RPC batch,
    two queries."""
    configured = [s.address for s in p.signers] + ([p.minter.address] if p.minter is not None else [])
    with p.engine.connect() as conn:
        local = {str(s): int(n) for s, n in conn.execute(
            text("SELECT signer, next_nonce FROM signer_nonces WHERE chain_id = :c"), {"c": p.chain_id})}
    wallets = configured + sorted(set(local) - set(configured))
    calls: list[tuple[str, Any]] = []
    for w in wallets:
        calls += [("eth_getBalance", [w, "latest"]), ("eth_getTransactionCount", [w, "latest"]),
                  ("eth_getTransactionCount", [w, "pending"])]
    answers = rpc_batch(p.w3, calls)
    bad = next((a for a in answers if not a.ok), None)
    if bad is not None:
        raise RpcError(f"signer lookup failed: {bad.message}")
    mined = [to_int(answers[3 * i + 1].result) for i in range(len(wallets))]
    with p.engine.connect() as conn:
        capped = {str(w): int(n) for w, n in conn.execute(text(
            "SELECT signer, count(*) FILTER (WHERE fee_capped) FROM ("
            " SELECT DISTINCT ON (t.signer, t.nonce) t.signer, t.fee_capped FROM payment_transactions t"
            " JOIN unnest(CAST(:w AS text[]), CAST(:m AS bigint[])) AS o(wallet, mined)"
            " ON t.signer = o.wallet AND t.nonce >= o.mined"
            " WHERE t.chain_id = :c ORDER BY t.signer, t.nonce, t.id DESC) latest GROUP BY signer"),
            {"c": p.chain_id, "w": wallets, "m": mined})}
    return [
        SignerHealth(address=w, balance_wei=to_int(answers[3 * i].result), mined_nonce=mined[i],
                     pending_nonce=to_int(answers[3 * i + 2].result), local_nonce=local.get(w),
                     configured=w in configured, capped=capped.get(w, 0))
        for i, w in enumerate(wallets)
    ]


def queue_not_decreasing(depths: list[int], samples: int) -> bool:
    """The seed's "queue depth should decrease rapidly under load": over the last `samples` runs the
    queue was never empty and never went down."""
    last = depths[-samples:]
    return len(last) >= samples >= 2 and all(d > 0 for d in last) and all(b >= a for a, b in pairwise(last))


def evaluate_alerts(m: QueueMetrics, t: Thresholds, signers: list[SignerHealth] | None = None,
                    depths: list[int] | None = None) -> list[Alert]:
    """The seed's alert rules plus gas and nonce health; pure, so every rule has a unit test."""
    alerts: list[Alert] = []
    if m.sent_age_max is not None and m.sent_age_max > t.sent_age_seconds:
        alerts.append(Alert("sent_age", f"a payment has been in sent for {m.sent_age_max:.0f} s "
                                        f"(threshold {t.sent_age_seconds:.0f} s)"))
    if (m.confirmation_rate is not None and m.confirmation_rate < t.confirmation_rate_min
            and m.window_outcomes >= t.rate_min_samples):
        alerts.append(Alert("confirmation_rate", f"confirmation rate {m.confirmation_rate:.1%} "
                                                 f"below {t.confirmation_rate_min:.0%}"))
    if m.processing_time_p95 is not None and m.processing_time_p95 > t.processing_time_seconds:
        alerts.append(Alert("processing_time", f"p95 processing time {m.processing_time_p95:.0f} s "
                                               f"above {t.processing_time_seconds:.0f} s"))
    if m.stuck_sent or m.stuck_processing:
        alerts.append(Alert("stuck", f"{m.stuck_sent} payment(s) in sent for more than {t.stuck_seconds:.0f} s, "
                                     f"{m.stuck_processing} in processing with an expired lease"))
    if m.reverted_settlements > t.reverted_settlements:
        alerts.append(Alert("settlements_reverted", f"{m.reverted_settlements} settlement(s) reverted on chain in the "
                                                    f"last {t.window_minutes} min (our gas; threshold "
                                                    f"{t.reverted_settlements})"))
    if m.failed_mints:
        alerts.append(Alert("mints_failed", f"{m.failed_mints} paid mint(s) failed; fix the cause, then run "
                                            "retry-failed-mints"))
    if depths is not None and queue_not_decreasing(depths, t.queue_trend_samples):
        alerts.append(Alert("queue_depth_not_decreasing",
                            f"queue depth has not decreased over {t.queue_trend_samples} runs "
                            f"({', '.join(map(str, depths[-t.queue_trend_samples:]))})"))
    for s in signers or []:
        if s.capped:
            alerts.append(Alert(f"fee_cap:{s.address}", f"wallet {s.address}: {s.capped} transaction(s) held at "
                                                         "max_fee_per_gas_cap and not mined; raise the cap or wait "
                                                         "for base fees to fall"))
        if not s.configured and s.local_nonce is not None and s.local_nonce > s.mined_nonce:
            alerts.append(Alert(f"unkeyed:{s.address}", f"wallet {s.address} is no longer configured but has "
                                                         f"{s.local_nonce - s.mined_nonce} open nonce(s): its stored "
                                                         "transactions are re-sent, never re-priced; configure its key "
                                                         "until they are mined"))
        if not s.configured:
            continue  # a removed wallet needs no gas and its drift is its open nonces
        if s.balance_wei < t.min_gas_balance_wei:
            alerts.append(Alert(f"gas_low:{s.address}",
                                f"signer {s.address} holds {s.balance_wei / 1e18:.6f} native tokens for gas "
                                f"(minimum {t.min_gas_balance_wei / 1e18:g})"))
        if abs(s.drift) > t.nonce_drift:
            alerts.append(Alert(f"nonce_drift:{s.address}", f"signer {s.address}: local nonce counter "
                                                             f"{s.local_nonce}, node pending count {s.pending_nonce} "
                                                             f"(drift {s.drift}); run resync-nonces"))
    return alerts


def alert_opened_at(engine: Engine, keys: list[str] | None = None) -> dict[str, datetime]:
    """When each open alert (or each of these keys) opened."""
    with engine.connect() as conn:
        return {str(k): v for k, v in conn.execute(text(
            "SELECT key, opened_at FROM monitor_alerts WHERE CASE WHEN CAST(:k AS text[]) IS NULL "
            "THEN status = 'open' ELSE key = ANY(CAST(:k AS text[])) END"), {"k": keys})}


def sync_alerts(engine: Engine, alerts: list[Alert], reminder_seconds: float) -> list[tuple[str, Alert]]:
    """Move alert state and return the notifications due: ("opened" | "reminder" | "resolved", alert).
    Each transition is one guarded statement, so concurrent monitor runs never notify twice."""
    due: list[tuple[str, Alert]] = []
    with transaction(engine, "monitor") as conn:
        for a in alerts:
            if conn.execute(query("open_alert"), {"key": a.key, "message": a.message}).first():
                due.append(("opened", a))
            elif conn.execute(query("remind_alert"),
                              {"key": a.key, "message": a.message, "every": reminder_seconds}).first():
                due.append(("reminder", a))
        for key, message in conn.execute(query("resolve_alerts"), {"keys": [a.key for a in alerts]}):
            due.append(("resolved", Alert(str(key), str(message))))
    return due


def record_sample(engine: Engine, m: QueueMetrics, retention_days: int, window_minutes: int | None = None) -> list[int]:
    """Store this run's figures (GET /api/payment-stats serves the latest) and return the queue depths of
    the trend window (oldest first)."""
    with engine.begin() as conn:
        conn.execute(query("insert_monitor_sample"), {
            "queue_depth": m.queue_depth, "sent": m.counts.get("sent", 0), "sent_age_max": m.sent_age_max,
            "confirmation_rate": m.confirmation_rate, "counts": json.dumps(m.counts),
            "sent_age_mean": m.sent_age_mean, "sent_age_p95": m.sent_age_p95,
            "processing_time_p50": m.processing_time_p50, "processing_time_p95": m.processing_time_p95,
            "window_minutes": window_minutes})
        conn.execute(query("prune_monitor_samples"), {"days": retention_days})
        return [int(r[1]) for r in conn.execute(query("recent_monitor_samples"), {"minutes": 24 * 60})]
