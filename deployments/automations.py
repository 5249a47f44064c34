"""Alert delivery through Prefect: the monitor flow emits `payments.alert.opened|reminder|resolved`
events; one automation turns each into a notification through a notification block.

The block comes from configuration: ALERT_WEBHOOK_URL (any JSON webhook; body
{"subject", "body", "name"}) or ALERT_SLACK_WEBHOOK_URL. `python -m deployments.automations`
(run by deployments.serve at start) creates or updates both, idempotently."""

from __future__ import annotations

import contextlib
import ipaddress
import os
from datetime import timedelta
from typing import Any, cast
from urllib.parse import urlparse

from prefect.automations import Automation
from prefect.blocks.abstract import NotificationBlock
from prefect.blocks.notifications import CustomWebhookNotificationBlock, SlackWebhook
from prefect.events.actions import SendNotification
from prefect.events.schemas.automations import EventTrigger, Posture
from pydantic import SecretStr

AUTOMATION_NAME = "payments-alerts"
BLOCK_NAME = "payments-alerts"
ALERT_EVENTS = {"payments.alert.opened", "payments.alert.reminder", "payments.alert.resolved"}
SUBJECT = "[payments] {{ event.event }}: {{ event.resource['prefect.resource.name'] }}"
BODY = "{{ event.payload.message }}"


def _is_loopback(url: str) -> bool:
    host = urlparse(url).hostname or ""
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def notification_block_from_env() -> NotificationBlock | None:
    if url := os.environ.get("ALERT_WEBHOOK_URL", "").strip():
        return CustomWebhookNotificationBlock(
            name="payments alerts", url=url, method="POST",
            json_data={"subject": "{{subject}}", "body": "{{body}}", "name": "{{name}}"},
            headers=None, cookies=None,
            allow_private_urls=_is_loopback(url),  # only the local stack's receiver
        )
    if url := os.environ.get("ALERT_SLACK_WEBHOOK_URL", "").strip():
        return SlackWebhook(url=SecretStr(url))
    return None


def ensure_alert_automation(block: NotificationBlock) -> Any:
    """Save the block and (re)create the automation; returns the automation."""
    block_id = cast(Any, block.save(BLOCK_NAME, overwrite=True))
    with contextlib.suppress(ValueError):  # not created yet
        cast(Any, Automation.read(name=AUTOMATION_NAME)).delete()
    automation = Automation(
        name=AUTOMATION_NAME,
        description="Payment pipeline alerts: one notification when an alert opens, reminders, one when it resolves",
        trigger=EventTrigger(expect=ALERT_EVENTS, match={"prefect.resource.id": "payments.alert.*"},
                             posture=Posture.Reactive, threshold=1, within=timedelta(0)),
        actions=[SendNotification(block_document_id=block_id, subject=SUBJECT, body=BODY)],
    )
    return automation.create()


def main() -> None:
    block = notification_block_from_env()
    if block is None:
        print("no ALERT_WEBHOOK_URL / ALERT_SLACK_WEBHOOK_URL: alerts are emitted as events only")
        return
    automation = ensure_alert_automation(block)
    print(f"automation {automation.name} ({automation.id}) sends payments.alert.* through block {BLOCK_NAME}")


if __name__ == "__main__":
    main()
