"""Merchant webhooks on real PostgreSQL and anvil, to a real local HTTP receiver: created once with the
status change, signed, retried with backoff under the same event id, logged, given up after the limit."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from sqlalchemy import text

from payments.db import query, transaction
from payments.localstack import Deployment
from tasks.common import Pipeline, new_owner_id
from tasks.confirm import confirm_tick
from tasks.send import send_lane_tick
from tasks.webhooks import deliver_due_webhooks, verify_signature
from tests.helpers import PRICE, authorize, queue, queue_many
from tests.test_recovery import FAST

pytestmark = pytest.mark.chain
SECRET = "whsec-test-0123456789"


@dataclass
class Receiver:
    server: ThreadingHTTPServer
    answers: list[int] = field(default_factory=list)  # status codes to answer, in order; then 204
    got: list[dict[str, Any]] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/hooks"


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    holder: dict[str, Receiver] = {}

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            r = holder["r"]
            body = self.rfile.read(int(self.headers["Content-Length"]))
            r.got.append({"headers": dict(self.headers), "body": body})
            self.send_response(r.answers.pop(0) if r.answers else 204)
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            return

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    holder["r"] = Receiver(server)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield holder["r"]
    server.shutdown()
    server.server_close()


@pytest.fixture
def hooked(pipeline: Pipeline, chain: Deployment, receiver: Receiver, monkeypatch: pytest.MonkeyPatch) -> Pipeline:
    monkeypatch.setenv("TEST_WEBHOOK_SECRET", SECRET)
    with transaction(pipeline.engine, "test") as conn:
        conn.execute(query("upsert_product"), {
            "id": "demo-mint", "chain_id": chain.chain_id, "mint_token": chain.mint_token.lower(),
            "payment_token": chain.payment_token.lower(), "price_per_unit": PRICE, "amount_per_unit": 10**18,
            "pay_to": chain.merchant.lower(), "max_quantity": 10, "active": True})
        conn.execute(query("upsert_webhook_endpoint"), {"product_id": "demo-mint", "url": receiver.url,
                                                        "secret_ref": "env:TEST_WEBHOOK_SECRET", "active": True})
    return pipeline


def _deliveries(p: Pipeline) -> list[Any]:
    with p.engine.connect() as conn:
        return conn.execute(text("SELECT event, status, attempts, event_id, payload, next_attempt_at > now() AS later "
                                 "FROM webhook_deliveries ORDER BY id")).all()


def _attempts(p: Pipeline) -> int:
    with p.engine.connect() as conn:
        return int(conn.execute(text("SELECT count(*) FROM webhook_attempts")).scalar_one())


def test_completed_and_failed_payments_post_signed_events_once(hooked: Pipeline, chain: Deployment,
                                                              receiver: Receiver) -> None:
    (ok,) = queue_many(hooked.engine, chain, 1)
    bad = queue(hooked.engine, chain, authorize(chain, chain.buyers[1], value=10**15))  # cannot pay
    send_lane_tick(hooked, hooked.signers[0], new_owner_id("t"), FAST)
    confirm_tick(hooked, "t", FAST)
    confirm_tick(hooked, "t", FAST)  # nothing changes: no second event
    assert sorted(d.event for d in _deliveries(hooked)) == ["payment.completed", "payment.failed"]
    report = deliver_due_webhooks(hooked.engine)
    assert (report.attempted, report.delivered) == (2, 2)
    events = {}
    for call in receiver.got:
        h, body = call["headers"], call["body"]
        assert verify_signature(SECRET, h["X-Webhook-Timestamp"], body, h["X-Webhook-Signature"])
        assert not verify_signature("wrong", h["X-Webhook-Timestamp"], body, h["X-Webhook-Signature"])
        event = json.loads(body)
        assert event["id"] == h["X-Webhook-Id"] and event["type"] == h["X-Webhook-Event"]
        events[event["data"]["paymentId"]] = event
    assert events[ok]["type"] == "payment.completed" and events[ok]["data"]["transaction"]
    assert events[bad]["type"] == "payment.failed" and "insufficient_balance" in events[bad]["data"]["error"]
    assert deliver_due_webhooks(hooked.engine).attempted == 0 and len(receiver.got) == 2


def test_failed_delivery_is_retried_later_with_the_same_event_id(hooked: Pipeline, chain: Deployment,
                                                                  receiver: Receiver) -> None:
    queue_many(hooked.engine, chain, 1)
    send_lane_tick(hooked, hooked.signers[0], new_owner_id("t"), FAST)
    confirm_tick(hooked, "t", FAST)
    receiver.answers = [500]
    assert deliver_due_webhooks(hooked.engine).delivered == 0
    (d,) = _deliveries(hooked)
    assert (d.status, d.attempts, d.later) == ("pending", 1, True)  # backoff: not due yet
    assert deliver_due_webhooks(hooked.engine).attempted == 0
    with hooked.engine.begin() as conn:
        conn.execute(text("UPDATE webhook_deliveries SET next_attempt_at = now()"))
    assert deliver_due_webhooks(hooked.engine).delivered == 1
    ids = {call["headers"]["X-Webhook-Id"] for call in receiver.got}
    assert len(receiver.got) == 2 and ids == {str(d.event_id)}  # a duplicate is identifiable
    assert _attempts(hooked) == 2


def test_delivery_gives_up_after_the_limit(hooked: Pipeline, chain: Deployment, receiver: Receiver) -> None:
    with hooked.engine.begin() as conn:
        conn.execute(text("UPDATE system_settings SET value = '2' WHERE key = 'webhook_max_attempts'"))
    queue_many(hooked.engine, chain, 1)
    send_lane_tick(hooked, hooked.signers[0], new_owner_id("t"), FAST)
    confirm_tick(hooked, "t", FAST)
    receiver.answers = [503, 503, 503]
    deliver_due_webhooks(hooked.engine)
    with hooked.engine.begin() as conn:
        conn.execute(text("UPDATE webhook_deliveries SET next_attempt_at = now()"))
    assert deliver_due_webhooks(hooked.engine).failed == 1
    (d,) = _deliveries(hooked)
    assert (d.status, d.attempts) == ("failed", 2)
    with hooked.engine.begin() as conn:
        conn.execute(text("UPDATE webhook_deliveries SET next_attempt_at = now()"))
    assert deliver_due_webhooks(hooked.engine).attempted == 0
