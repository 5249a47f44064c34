"""`monitor-payments`: the seed's key metrics and alert thresholds, published on the run page in the
Prefect UI as a table artifact and a markdown summary; threshold breaches are logged as warnings."""

from __future__ import annotations

from typing import Any

from prefect import flow
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from payments.config import require_env
from payments.db import engine_for
from tasks.common import run_logger
from tasks.monitor import QueueMetrics, Thresholds, compute_metrics, evaluate_alerts, read_thresholds


def summary_markdown(m: QueueMetrics, t: Thresholds, alerts: list[Any]) -> str:
    def fmt(v: float | None, unit: str = " s") -> str:
        return "n/a" if v is None else f"{v:g}{unit}"

    lines = [
        "# Payment queue",
        "",
        "| metric | value | alert when |",
        "| --- | --- | --- |",
        f"| queue depth (pending) | {m.queue_depth} | not decreasing under load |",
        f"| age in sent: mean / p95 / max | {fmt(m.sent_age_mean)} / {fmt(m.sent_age_p95)} / {fmt(m.sent_age_max)}"
        f" | max > {t.sent_age_seconds:g} s |",
        f"| confirmation rate ({t.window_minutes} min) | "
        f"{'n/a' if m.confirmation_rate is None else f'{m.confirmation_rate:.1%}'} | < {t.confirmation_rate_min:.0%} |",
        f"| processing time p50 / p95 | {fmt(m.processing_time_p50)} / {fmt(m.processing_time_p95)} | "
        f"p95 > {t.processing_time_seconds:g} s |",
        f"| stuck in sent / processing | {m.stuck_sent} / {m.stuck_processing} | any (> {t.stuck_seconds:g} s) |",
        "",
        "Counts: " + ", ".join(f"{k} {v}" for k, v in m.counts.items()),
        "",
        "## Alerts",
        "",
    ]
    lines += [f"- **{a.key}**: {a.message}" for a in alerts] or ["None."]
    return "\n".join(lines)


@flow(name="monitor-payments")
def monitor_payments() -> dict[str, Any]:
    engine = engine_for(require_env("DATABASE_URL"))
    with engine.connect() as conn:
        thresholds = read_thresholds(conn)
        metrics = compute_metrics(conn, thresholds)
    alerts = evaluate_alerts(metrics, thresholds)
    log = run_logger()
    for alert in alerts:
        log.warning("ALERT %s: %s", alert.key, alert.message)
    create_table_artifact(key="payment-queue-metrics", table=[metrics.as_row()],
                          description="Payment queue metrics at this run")
    create_markdown_artifact(key="payment-queue-summary", markdown=summary_markdown(metrics, thresholds, alerts),
                             description="Payment queue at a glance")
    return {"metrics": metrics.as_row(), "alerts": [a.key for a in alerts]}
