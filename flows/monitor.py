"""`monitor-payments`: the seed's key metrics, gas and nonce health, checked against the alert
thresholds in system_settings; published on the run page in the Prefect UI (a table, a markdown
summary with a chart of the recent window) and delivered as Prefect events
`payments.alert.opened|reminder|resolved`, which the `payments-alerts` automation turns into
notifications (deployments/automations.py). An alert notifies when it opens, at the reminder interval
while it stays open, and when it resolves - not on every pass.

One scheduled run evaluates every `monitor_interval_seconds` for its window (the schedule's interval),
like the pipeline's loops: alerts are noticed within one interval, and an idle system makes one monitor
run per window instead of one per evaluation."""

from __future__ import annotations

import base64
import io
import os
import time
from datetime import UTC, datetime
from typing import Annotated, Any

from prefect import flow
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.events import emit_event
from prefect.runtime import flow_run
from pydantic import Field
from sqlalchemy import Engine, text

from flows.runs import finish_run, running_name
from flows.ticks import run_window, tick_loop, with_retries
from payments.settings import PipelineSettings, read_values
from tasks.common import Pipeline, run_logger
from tasks.monitor import (
    Alert,
    QueueMetrics,
    SignerHealth,
    Thresholds,
    affected_payments,
    alert_opened_at,
    compute_metrics,
    evaluate_alerts,
    notification_text,
    read_signer_health,
    read_thresholds,
    record_sample,
    sync_alerts,
)


def summary_markdown(m: QueueMetrics, t: Thresholds, alerts: list[Alert],
                     signers: list[SignerHealth] | None = None, chart_png: bytes | None = None) -> str:
    def fmt(v: float | None, unit: str = " s") -> str:
        return "n/a" if v is None else f"{v:g}{unit}"

    lines = [
        "# Payment queue",
        "",
        "| metric | value | alert when |",
        "| --- | --- | --- |",
        f"| queue depth (pending) | {m.queue_depth} | not decreasing over {t.queue_trend_samples} runs |",
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
    ]
    if signers:
        lines += ["| wallet | gas balance (native token) | nonce mined / pending / local | drift | held at fee cap |",
                  "| --- | --- | --- | --- | --- |"]
        lines += [f"| {s.address}{'' if s.configured else ' (not configured)'} | {s.balance_wei / 1e18:.6f} | "
                  f"{s.mined_nonce} / {s.pending_nonce} / {'-' if s.local_nonce is None else s.local_nonce} | "
                  f"{s.drift} | {s.capped} |" for s in signers]
        lines.append("")
    if chart_png:
        lines += [f"![recent window](data:image/png;base64,{base64.b64encode(chart_png).decode()})", ""]
    lines += ["## Alerts", ""]
    lines += [f"- **{a.key}**: {a.message}" for a in alerts] or ["None."]
    return "\n".join(lines)


def recent_chart(engine: Engine, minutes: int = 60) -> bytes | None:
    """A small PNG of queue depth and sent count over the recent window (None with fewer than 2 samples)."""
    with engine.connect() as conn:
        rows = conn.execute(text("SELECT at, queue_depth, sent FROM monitor_samples "
                                 "WHERE at >= now() - make_interval(mins => :m) ORDER BY at"), {"m": minutes}).all()
    if len(rows) < 2:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    # Readable on the UI's dark theme and its light one: light lines and text on a dark panel.
    fg, bg = "#e6e6e6", "#1f2430"
    fig, ax = plt.subplots(figsize=(9, 3.2), dpi=100, facecolor=bg)
    ax.set_facecolor(bg)
    times = [r.at for r in rows]
    ax.plot(times, [r.queue_depth for r in rows], label="pending (queue depth)", color="#5fb3ff", linewidth=2)
    ax.plot(times, [r.sent for r in rows], label="sent (awaiting confirmation)", color="#ffb454", linewidth=2)
    ax.set_title(f"Payments waiting, last {minutes} min (one point per monitor pass)", color=fg, fontsize=11)
    ax.set_ylabel("payments", color=fg)
    ax.set_xlabel("time (UTC)", color=fg)
    top = max(max(r.queue_depth for r in rows), max(r.sent for r in rows))
    ax.set_ylim(0, max(5, top * 1.15))  # a flat line at 0 stays at 0, not at ±0.04
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.tick_params(colors=fg, labelsize=8)
    for spine in ax.spines.values():
        spine.set_color("#6b7280")
    ax.grid(color="#3b4252", linewidth=0.6)
    ax.legend(loc="upper left", fontsize=8, facecolor=bg, edgecolor="#6b7280", labelcolor=fg)
    fig.autofmt_xdate()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight", facecolor=bg)
    plt.close(fig)
    return buf.getvalue()


def readable_metrics(m: QueueMetrics) -> list[dict[str, str]]:
    """The metrics as rows an operator reads: a name with its unit, and a formatted value."""
    def sec(v: float | None) -> str:
        return "n/a" if v is None else f"{v:.1f} s"

    rows = [("queue depth (pending payments)", str(m.queue_depth)),
            ("age in sent: mean", sec(m.sent_age_mean)), ("age in sent: p95", sec(m.sent_age_p95)),
            ("age in sent: max", sec(m.sent_age_max)),
            ("confirmation rate (window)", "n/a" if m.confirmation_rate is None
             else f"{m.confirmation_rate:.1%} of {m.window_outcomes} outcomes"),
            ("processing time: p50", sec(m.processing_time_p50)), ("processing time: p95", sec(m.processing_time_p95)),
            ("stuck in sent", str(m.stuck_sent)), ("stuck in processing (lease expired)", str(m.stuck_processing)),
            ("failed mints (paid, nothing minted)", str(m.failed_mints)),
            ("settlements reverted on chain (window)", str(m.reverted_settlements))]
    rows += [(f"payments {status}", str(n)) for status, n in sorted(m.counts.items())]
    return [{"metric": k, "value": v} for k, v in rows]


def ui_links() -> dict[str, str]:
    """Links for notifications: this monitor run and the dashboard artifact in the Prefect UI."""
    from prefect.settings import PREFECT_API_URL, PREFECT_UI_URL

    ui = (PREFECT_UI_URL.value() or (PREFECT_API_URL.value() or "").removesuffix("/api") or "").rstrip("/")
    if not ui:
        return {}
    links = {"dashboard": f"{ui}/artifacts/key/payment-queue-summary"}
    run_id = flow_run.get_id()
    if run_id:
        links["monitor run"] = f"{ui}/runs/flow-run/{run_id}"
    return links


def emit_alert_events(engine: Engine, due: list[tuple[str, Alert]], opened: dict[str, datetime]) -> None:
    environment = os.environ.get("PAYMENTS_ENVIRONMENT", "local")
    links = ui_links()
    now = datetime.now(UTC)
    with engine.connect() as conn:
        affected = {a.key: affected_payments(conn, a.key) for kind, a in due if kind != "resolved"}
    for kind, alert in due:
        body = notification_text(kind, alert, environment=environment, opened_at=opened.get(alert.key), now=now,
                                 affected=affected.get(alert.key, ([], 0)), links=links)
        emit_event(
            event=f"payments.alert.{kind}",
            resource={"prefect.resource.id": f"payments.alert.{alert.key}", "prefect.resource.name": alert.key},
            payload={"kind": kind, "key": alert.key, "environment": environment, "message": body},
        )


SUMMARY_EVERY = 4  # idle passes between two dashboard (markdown + chart) artifacts


def monitor_pass(p: Pipeline, shown: dict[str, Any] | None = None) -> dict[str, Any]:
    """One evaluation: metrics, a sample, alerts (notified as events), the metrics table artifact, and the
    dashboard artifact (with its chart). Each artifact is a new version in the Prefect database (~27 KB
    with the chart), so with `shown` (what the last dashboard showed, kept by the caller) the dashboard is
    published only when the counts or the open alerts changed, or every SUMMARY_EVERY passes."""
    with p.engine.connect() as conn:
        thresholds = read_thresholds(conn)
        metrics = compute_metrics(conn, thresholds)
    signers = read_signer_health(p)
    depths = record_sample(p.engine, metrics, thresholds.sample_retention_days, thresholds.window_minutes)
    alerts = evaluate_alerts(metrics, thresholds, signers, depths)
    opened_before = alert_opened_at(p.engine)  # every open alert, read before sync resolves some
    due = sync_alerts(p.engine, alerts, thresholds.reminder_seconds)
    opened = {**opened_before, **alert_opened_at(p.engine, [a.key for _, a in due])}
    emit_alert_events(p.engine, due, opened)
    log = run_logger()
    for kind, alert in due:
        log.warning("ALERT %s %s: %s", kind, alert.key, alert.message)
    create_table_artifact(key="payment-queue-metrics", table=readable_metrics(metrics),
                          description="Payment queue metrics at this run")
    looks = (tuple(sorted(metrics.counts.items())), tuple(sorted(a.key for a in alerts)))
    if shown is None or shown.get("looks") != looks or shown.get("quiet", 0) + 1 >= SUMMARY_EVERY:
        if shown is not None:
            shown.update(looks=looks, quiet=0)
        create_markdown_artifact(
            key="payment-queue-summary",
            markdown=summary_markdown(metrics, thresholds, alerts, signers, recent_chart(p.engine)),
            description="Payment queue at a glance",
        )
    elif shown is not None:
        shown["quiet"] = shown.get("quiet", 0) + 1
    return {"metrics": metrics.as_row(), "alerts": [a.key for a in alerts],
            "notifications": [f"{kind}:{a.key}" for kind, a in due]}


def monitor_interval_ms(p: Pipeline) -> int:
    """The pause between passes (30 s when the database cannot say: the pass itself reports the error)."""
    try:
        with p.engine.connect() as conn:
            return int(read_values(conn, "monitor")["monitor_interval_seconds"]) * 1000
    except Exception:
        return 30_000


@flow(name="monitor-payments", flow_run_name=running_name("monitor-payments"))
def monitor_payments(
    run_seconds: Annotated[int | None, Field(ge=0, le=3600, description=(
        "how long this run keeps evaluating (default: its schedule's interval; 0 = one pass)"))] = None,
    max_passes: Annotated[int | None, Field(ge=1, le=100_000, description="stop after this many passes")] = None,
) -> dict[str, Any]:
    """Evaluate the queue every monitor_interval_seconds for the run's window: an alert is noticed within
    one interval of its threshold being crossed, not at the next run's process start."""
    started = time.monotonic()
    p = with_retries(Pipeline.from_env)
    window = run_window(with_retries(p.settings).confirm_run_seconds) if run_seconds is None else run_seconds
    last: dict[str, Any] = {}
    notifications: list[str] = []
    alerts_seen: set[str] = set()

    passes = 0
    shown: dict[str, Any] = {}

    def tick(_settings: PipelineSettings) -> bool:
        nonlocal passes
        result = monitor_pass(p, shown)
        passes += 1
        last.update(result)
        notifications.extend(result["notifications"])
        alerts_seen.update(result["alerts"])
        return False

    tick_loop(p.settings, window, lambda _s: monitor_interval_ms(p), tick, max_passes)
    finish_run("monitor", {"passes": passes, "notifications": len(notifications),
                           "alerts open": len(last.get("alerts", []))}, started)
    return {**last, "notifications": notifications, "alerts_seen": sorted(alerts_seen)}
