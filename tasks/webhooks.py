"""Merchant webhook delivery: POST the event JSON with

    X-Webhook-Id:        the event id (the same on every retry: receivers drop duplicates by it)
    X-Webhook-Timestamp: unix seconds of this attempt
    X-Webhook-Signature: sha256=<hex HMAC-SHA256(secret, "<timestamp>.<body>")>

2xx is delivered; anything else is retried with exponential backoff up to webhook_max_attempts.
Every attempt is logged in webhook_attempts. No database transaction is open during the HTTP call."""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import time
from dataclasses import dataclass
from typing import Any

import requests
from sqlalchemy import Engine, text

from payments.db import fetch_all, query, transaction
from payments.errors import ConfigurationError
from payments.settings import read_values

TIMEOUT_SECONDS = 10


def signature(secret: str, timestamp: int, body: bytes) -> str:
    mac = hmac.new(secret.encode(), str(timestamp).encode() + b"." + body, hashlib.sha256)
    return "sha256=" + mac.hexdigest()


def verify_signature(secret: str, timestamp: str, body: bytes, header: str, tolerance: int = 300) -> bool:
    """What a receiver does: recompute, compare in constant time, reject stale timestamps."""
    if not timestamp.isdigit() or abs(time.time() - int(timestamp)) > tolerance:
        return False
    return hmac.compare_digest(signature(secret, int(timestamp), body), header)


def resolve_secret(ref: str) -> str:
    kind, _, name = ref.partition(":")
    if kind == "env":
        value = os.environ.get(name, "")
    elif kind == "block":
        from prefect.blocks.system import Secret

        value = str(Secret.load(name).get())  # type: ignore[union-attr]
    else:
        value = ""
    if not value:
        raise ConfigurationError(f"webhook secret {ref} is not available")
    return value


@dataclass
class WebhookReport:
    attempted: int = 0
    delivered: int = 0
    failed: int = 0


def _settings(engine: Engine) -> tuple[int, int]:
    with engine.connect() as conn:
        values = read_values(conn, "webhooks")
    return int(values["webhook_max_attempts"]), int(values["webhook_backoff_seconds"])


def deliver_due_webhooks(engine: Engine, limit: int = 50, session: requests.Session | None = None) -> WebhookReport:
    max_attempts, backoff = _settings(engine)
    with transaction(engine, "webhooks") as conn:
        due = fetch_all(conn, "claim_due_webhooks", limit=limit)
    report = WebhookReport()
    http = session or requests.Session()
    for d in due:
        body = json.dumps({"id": str(d["event_id"]), **d["payload"]}, separators=(",", ":")).encode()
        started = time.monotonic()
        status: int | None = None
        error: str | None = None
        try:
            secret = resolve_secret(d["secret_ref"])
            ts = int(time.time())
            response = http.post(d["url"], data=body, timeout=TIMEOUT_SECONDS, allow_redirects=False, headers={
                "Content-Type": "application/json", "User-Agent": "x402-payment-pipeline-webhooks",
                "X-Webhook-Id": str(d["event_id"]), "X-Webhook-Event": d["event"], "X-Webhook-Timestamp": str(ts),
                "X-Webhook-Signature": signature(secret, ts, body)})
            status = response.status_code
            if not 200 <= status < 300:
                error = f"HTTP {status}"
        except (requests.RequestException, ConfigurationError) as exc:
            error = f"{type(exc).__name__}: {exc}"[:500]
        ok = error is None
        with transaction(engine, "webhooks") as conn:
            final = conn.execute(query("record_webhook_attempt"), {
                "id": d["id"], "http_status": status, "error": error, "ok": ok, "max_attempts": max_attempts,
                "backoff": backoff, "duration_ms": int((time.monotonic() - started) * 1000)}).scalar_one_or_none()
        report.attempted += 1
        report.delivered += final == "delivered"
        report.failed += final == "failed"
    return report


def delivery_log(engine: Engine, payment_id: str) -> list[dict[str, Any]]:
    with engine.connect() as conn:
        return [dict(r._mapping) for r in conn.execute(text(
            "SELECT d.event_id, d.event, d.status, d.attempts, d.last_status, d.last_error, d.delivered_at "
            "FROM webhook_deliveries d WHERE d.payment_id = :p ORDER BY d.id"), {"p": payment_id})]
