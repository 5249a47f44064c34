"""The pipeline's Prefect automations.

Alert delivery: the monitor flow emits `payments.alert.opened|reminder|resolved` events; one automation
turns each into a notification through a notification block. The block comes from configuration:
ALERT_WEBHOOK_URL (any JSON webhook; body {"subject", "body", "name"}) or ALERT_SLACK_WEBHOOK_URL.

Crashed runs: a flow run killed together with its runner (kill -9 of the serve process or worker, OOM,
a lost machine) has nobody left to report it, and would show as Running for ever. Every pipeline run
sends a heartbeat every HEARTBEAT_SECONDS; when a run tagged `payments` has sent none for
MISSED_HEARTBEATS_AFTER and has not finished, the `payments-crashed-runs` automation marks it Crashed.
(The pipeline does not need this to go on: nothing waits for a run to end. It keeps the UI true.)

Runs that end early: a pipeline or monitor run (tag `pipeline` or `monitor`) that crashes (its process
killed, or marked Crashed above) is followed RERUN_AFTER later by a new run of its deployment
(`payments-rerun-ended-runs`), so the stage is not left without a run until its next schedule slot
(one window, 5 minutes by default). Failed runs are not re-run: passing errors (outages) are retried
inside a run, so a Failed run is a defect or a configuration error, which re-running every few seconds
would only repeat (and multiply: each schedule slot would start another chain); it waits for the next
slot and the monitor's alerts.

`python -m deployments.automations` (run by deployments.deploy) creates or updates them,
idempotently."""

from __future__ import annotations

import ipaddress
import json
import os
from datetime import timedelta
from typing import Any, cast
from urllib.parse import urlparse

from prefect.automations import Automation
from prefect.blocks.abstract import NotificationBlock
from prefect.blocks.notifications import CustomWebhookNotificationBlock, SlackWebhook
from prefect.client.schemas.objects import StateType
from prefect.events.actions import ChangeFlowRunState, RunDeployment, SendNotification
from prefect.events.schemas.automations import EventTrigger, Posture
from pydantic import SecretStr

HEARTBEAT_SECONDS = 30  # work-pool runs (prefect.yaml job variables); Prefect's minimum
MISSED_HEARTBEATS_AFTER = timedelta(seconds=3 * HEARTBEAT_SECONDS)
CRASH_AUTOMATION_NAME = "payments-crashed-runs"
RUN_ENDED_EVENTS = {"prefect.flow-run.Completed", "prefect.flow-run.Failed", "prefect.flow-run.Cancelled",
                    "prefect.flow-run.Crashed"}

RERUN_AUTOMATION_NAME = "payments-rerun-ended-runs"
RERUN_AFTER = timedelta(seconds=5)
RERUN_TAGS = ("pipeline", "monitor")

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


def _canonical(value: Any) -> Any:
    """JSON with every list sorted: a trigger's `expect`/`after` are sets, and the same set can dump its
    members in another order (insertion history), which must not count as a difference."""
    if isinstance(value, dict):
        return {k: _canonical(v) for k, v in value.items()}
    if isinstance(value, list):
        return sorted((_canonical(v) for v in value), key=lambda v: json.dumps(v, sort_keys=True))
    return value


def _same(a: Any, b: Any) -> bool:
    def shape(x: Any) -> Any:
        return _canonical({"description": x.description, "enabled": x.enabled,
                           "trigger": x.trigger.model_dump(mode="json", exclude={"id"}),
                           "actions": [action.model_dump(mode="json") for action in x.actions]})
    return bool(shape(a) == shape(b))


def _replace(automation: Automation) -> Any:
    """Create the automation, or replace one of the same name that differs. An identical one is kept:
    recreating it would drop what its trigger has seen (a run's last heartbeat before its runner died)."""
    try:
        existing = cast(Any, Automation.read(name=automation.name))
    except ValueError:  # not created yet
        return automation.create()
    if _same(existing, automation):
        return existing
    existing.delete()
    return automation.create()


def ensure_alert_automation(block: NotificationBlock) -> Any:
    """Save the block and (re)create the automation; returns the automation."""
    block_id = cast(Any, block.save(BLOCK_NAME, overwrite=True))
    return _replace(Automation(
        name=AUTOMATION_NAME,
        description="Payment pipeline alerts: one notification when an alert opens, reminders, one when it resolves",
        trigger=EventTrigger(expect=ALERT_EVENTS, match={"prefect.resource.id": "payments.alert.*"},
                             posture=Posture.Reactive, threshold=1, within=timedelta(0)),
        actions=[SendNotification(block_document_id=block_id, subject=SUBJECT, body=BODY)],
    ))


def ensure_crash_detection(after: timedelta = MISSED_HEARTBEATS_AFTER) -> Any:
    """(Re)create the automation that marks a payments flow run Crashed when its heartbeats stop."""
    return _replace(Automation(
        name=CRASH_AUTOMATION_NAME,
        description=f"A payments flow run with no heartbeat for {after.total_seconds():.0f} s that has not "
                    "finished was killed with its runner: mark it Crashed",
        trigger=EventTrigger(
            after={"prefect.flow-run.heartbeat"},
            expect={"prefect.flow-run.heartbeat", *RUN_ENDED_EVENTS},
            match={"prefect.resource.id": "prefect.flow-run.*"},
            match_related={"prefect.resource.role": "tag", "prefect.resource.id": "prefect.tag.payments"},
            for_each={"prefect.resource.id"},
            posture=Posture.Proactive, threshold=1, within=after),
        # not forced: a run that has finished meanwhile keeps its final state
        actions=[ChangeFlowRunState(state=StateType.CRASHED, name=None, force=False,
                                    message=f"No heartbeat for {after.total_seconds():.0f} s: the process "
                                            "running this flow run is gone")],
    ))


def ensure_rerun_of_ended_runs(after: timedelta = RERUN_AFTER) -> Any:
    """(Re)create the automation that starts a new run of a pipeline or monitor deployment when one of its
    runs crashes."""
    return _replace(Automation(
        name=RERUN_AUTOMATION_NAME,
        description="A pipeline or monitor run that crashed is followed by a new run of its deployment "
                    f"{after.total_seconds():.0f} s later, not at the next schedule slot",
        trigger=EventTrigger(
            expect={"prefect.flow-run.Crashed"},
            match={"prefect.resource.id": "prefect.flow-run.*"},
            match_related={"prefect.resource.role": "tag",
                           "prefect.resource.id": [f"prefect.tag.{t}" for t in RERUN_TAGS]},
            posture=Posture.Reactive, threshold=1, within=timedelta(0)),
        actions=[RunDeployment(source="inferred", deployment_id=None, parameters=None, job_variables=None,
                                schedule_after=after)],
    ))


def main() -> None:
    crash = ensure_crash_detection()
    print(f"automation {crash.name} ({crash.id}) marks payments runs Crashed when their heartbeats stop")
    rerun = ensure_rerun_of_ended_runs()
    print(f"automation {rerun.name} ({rerun.id}) starts a new run when a pipeline or monitor run crashes")
    block = notification_block_from_env()
    if block is None:
        print("no ALERT_WEBHOOK_URL / ALERT_SLACK_WEBHOOK_URL: alerts are emitted as events only")
        return
    automation = ensure_alert_automation(block)
    print(f"automation {automation.name} ({automation.id}) sends payments.alert.* through block {BLOCK_NAME}")


if __name__ == "__main__":
    main()
