"""Monitoring metrics against a seeded queue with known answers, and the alert rules."""

from __future__ import annotations

import dataclasses

from sqlalchemy import Engine, text

from flows.monitor import summary_markdown
from payments.db import fetch_all, transaction
from tasks.monitor import QueueMetrics, Thresholds, compute_metrics, evaluate_alerts, read_thresholds
from tests.helpers import claim_checks
from tests.test_db import _attach, _claim, _queue

ZERO = "0x" + "0" * 64


def _seed(engine: Engine) -> None:
    """10 payments: 3 pending; 1 processing whose lease expired (a dead run); 2 sent (10 and 20 s ago);
    3 completed (processing times 4, 6, 8 s); 1 confirmation_failed (processing time 10 s)."""
    ids = _queue(engine, 10)
    assert sorted(_claim(engine, "run", 8)) == sorted(ids[:8])
    _attach(engine, "run", ids[1:8])
    with transaction(engine, "run") as conn:
        fetch_all(conn, "release_processing_payments", ids=[ids[0]], owner="run", error="test")
        fetch_all(conn, "mark_sent", ids=ids[2:8])
    sent, done, failed = ids[2:4], ids[4:7], ids[7]
    with engine.begin() as conn:
        conn.execute(text("UPDATE payment_queue SET lease_expires_at = now() - interval '1 minute' WHERE id = :i"),
                     {"i": ids[1]})
        for pid, age in zip(sent, (10, 20), strict=True):
            conn.execute(text("UPDATE payment_queue SET sent_at = now() - make_interval(secs => :a) WHERE id = :i"),
                         {"a": age, "i": pid})
        for pid, took in zip([*done, failed], (4, 6, 8, 10), strict=True):
            conn.execute(text("UPDATE payment_queue SET processed_at = created_at + make_interval(secs => :t) "
                              "WHERE id = :i"), {"t": took, "i": pid})
    with transaction(engine, "confirm") as conn:
        claim_checks(conn, [*done, failed], "confirm")
        fetch_all(conn, "complete_payments", ids=done, blocks=[1, 1, 1], hashes=[ZERO] * 3, block_hashes=[ZERO] * 3,
                  owner="confirm")
        fetch_all(conn, "fail_confirmation", ids=[failed], errors=["expired"], blocks=[2], owner="confirm")


def test_metrics_have_the_known_answers(engine: Engine) -> None:
    _seed(engine)
    with engine.connect() as conn:
        thresholds = read_thresholds(conn)
        m = compute_metrics(conn, thresholds)
    assert m.counts == {"pending": 3, "processing": 1, "sent": 2, "completed": 3, "failed": 0,
                        "confirmation_failed": 1}
    assert m.queue_depth == 3
    assert m.sent_age_mean is not None and abs(m.sent_age_mean - 15) < 1.5
    assert m.sent_age_max is not None and abs(m.sent_age_max - 20) < 1.5
    assert m.confirmation_rate == 0.75
    assert m.processing_time_p50 == 7.0  # median of 4, 6, 8, 10
    assert m.processing_time_p95 is not None and abs(m.processing_time_p95 - 9.7) < 0.01
    assert (m.stuck_sent, m.stuck_processing, m.failed_mints) == (0, 1, 0)


def test_thresholds_come_from_system_settings(engine: Engine) -> None:
    with engine.begin() as conn:
        conn.execute(text("UPDATE system_settings SET value = '0.5' WHERE key = 'alert_confirmation_rate_min'"))
        t = read_thresholds(conn)
    assert t == Thresholds(sent_age_seconds=60, confirmation_rate_min=0.5, processing_time_seconds=60,
                           stuck_seconds=300, window_minutes=60)


HEALTHY = QueueMetrics(counts={}, queue_depth=0, sent_age_mean=5, sent_age_p95=9, sent_age_max=10,
                       confirmation_rate=0.99, processing_time_p50=3, processing_time_p95=8, stuck_sent=0,
                       stuck_processing=0)


def test_alert_rules_follow_the_seed_thresholds() -> None:
    t = Thresholds()
    assert evaluate_alerts(HEALTHY, t) == []
    breaches = {
        "sent_age": dataclasses.replace(HEALTHY, sent_age_max=61),
        "confirmation_rate": dataclasses.replace(HEALTHY, confirmation_rate=0.89, window_outcomes=100),
        "processing_time": dataclasses.replace(HEALTHY, processing_time_p95=61),
        "stuck": dataclasses.replace(HEALTHY, stuck_sent=1),
    }
    for key, metrics in breaches.items():
        assert [a.key for a in evaluate_alerts(metrics, t)] == [key]
    assert evaluate_alerts(dataclasses.replace(HEALTHY, confirmation_rate=None, sent_age_max=None), t) == []


def test_summary_lists_metrics_and_alerts() -> None:
    t = Thresholds()
    bad = dataclasses.replace(HEALTHY, confirmation_rate=0.5, window_outcomes=40)
    text_ = summary_markdown(bad, t, evaluate_alerts(bad, t))
    assert "50.0%" in text_ and "**confirmation_rate**" in text_
    assert "None." in summary_markdown(HEALTHY, t, [])


def test_queue_trend_rule_needs_a_full_window_of_no_progress() -> None:
    from tasks.monitor import queue_not_decreasing

    assert queue_not_decreasing([5, 5, 6, 9, 9], 5)
    assert not queue_not_decreasing([5, 5, 4, 9, 9], 5)  # it went down once
    assert not queue_not_decreasing([0, 0, 0, 0, 0], 5)  # empty is not "under load"
    assert not queue_not_decreasing([5, 6, 7], 5)  # not enough samples yet


def test_gas_and_nonce_rules() -> None:
    from tasks.monitor import SignerHealth

    t = Thresholds(min_gas_balance_wei=100, nonce_drift=2)
    ok = SignerHealth(address="0xa", balance_wei=100, mined_nonce=5, pending_nonce=7, local_nonce=8)
    assert ok.drift == 1 and evaluate_alerts(HEALTHY, t, [ok]) == []
    poor = dataclasses.replace(ok, balance_wei=99)
    ahead = dataclasses.replace(ok, local_nonce=10)
    elsewhere = dataclasses.replace(ok, pending_nonce=20)
    assert [a.key for a in evaluate_alerts(HEALTHY, t, [poor])] == ["gas_low:0xa"]
    assert [a.key for a in evaluate_alerts(HEALTHY, t, [ahead])] == ["nonce_drift:0xa"]
    assert [a.key for a in evaluate_alerts(HEALTHY, t, [elsewhere])] == ["nonce_drift:0xa"]
    fresh = dataclasses.replace(ok, local_nonce=None, pending_nonce=50)
    assert fresh.drift == 0
    held = dataclasses.replace(ok, capped=1)
    assert [a.key for a in evaluate_alerts(HEALTHY, t, [held])] == ["fee_cap:0xa"]
    removed = dataclasses.replace(ok, configured=False, balance_wei=0, local_nonce=9)
    assert [a.key for a in evaluate_alerts(HEALTHY, t, [removed])] == ["unkeyed:0xa"]
    assert evaluate_alerts(HEALTHY, t, [dataclasses.replace(removed, mined_nonce=9)]) == []


def test_alert_state_opens_once_reminds_and_resolves(engine: Engine) -> None:
    from tasks.monitor import Alert, sync_alerts

    a = Alert("sent_age", "too old")
    assert [(k, x.key) for k, x in sync_alerts(engine, [a], 3600)] == [("opened", "sent_age")]
    assert sync_alerts(engine, [a], 3600) == []  # still open, reminder not due: no spam
    assert [k for k, _ in sync_alerts(engine, [a], 0)] == ["reminder"]
    assert [(k, x.key) for k, x in sync_alerts(engine, [], 0)] == [("resolved", "sent_age")]
    assert sync_alerts(engine, [], 0) == []
    assert [k for k, _ in sync_alerts(engine, [a], 3600)] == ["opened"]  # a new episode


def test_notifications_say_what_how_bad_since_when_which_payments_and_what_to_do() -> None:
    from datetime import UTC, datetime, timedelta

    from tasks.monitor import Alert, notification_text

    now = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)
    alert = Alert("stuck", "3 payment(s) in sent for more than 300 s")
    links = {"dashboard": "http://ui/artifacts/key/payment-queue-summary", "monitor run": "http://ui/runs/flow-run/1"}
    opened = notification_text("opened", alert, environment="prod-base", opened_at=now - timedelta(seconds=75),
                               now=now, affected=(["pay_a", "pay_b"], 7), links=links)
    assert opened.splitlines()[0] == "[prod-base] stuck opened: 3 payment(s) in sent for more than 300 s"
    assert "(1 min 15 s)" in opened and "payments: pay_a, pay_b (+5 more)" in opened
    assert "what to do: run reset-stuck-payments" in opened and "dashboard: http://ui/artifacts/key/" in opened
    resolved = notification_text("resolved", alert, environment="prod-base", opened_at=now - timedelta(hours=2),
                                 now=now, affected=([], 0), links={})
    assert "open for 2 h 0 min" in resolved and "what to do" not in resolved


def test_settlements_reverted_on_our_gas_raise_an_alert_over_the_threshold() -> None:
    t = Thresholds(reverted_settlements=3)
    assert evaluate_alerts(dataclasses.replace(HEALTHY, reverted_settlements=3), t) == []
    assert [a.key for a in evaluate_alerts(dataclasses.replace(HEALTHY, reverted_settlements=4), t)] == [
        "settlements_reverted"]


def test_a_confirmation_rate_alert_needs_enough_outcomes() -> None:
    low = dataclasses.replace(HEALTHY, confirmation_rate=0.5, window_outcomes=6)
    assert evaluate_alerts(low, Thresholds(rate_min_samples=20)) == []
    assert [a.key for a in evaluate_alerts(dataclasses.replace(low, window_outcomes=20),
                                           Thresholds(rate_min_samples=20))] == ["confirmation_rate"]
