"""The deployment definitions: every entrypoint in prefect.yaml loads a flow, the queues separate the
pipeline, the monitor and recovery, schedules come from the settings, and recovery deployments say what
they do and describe every parameter."""

from __future__ import annotations

from typing import Any

import yaml
from prefect.flows import load_flow_from_entrypoint
from prefect.utilities.callables import parameter_schema

from deployments.deploy import QUEUE_PRIORITIES, WINDOW_SETTING, spec, with_intervals
from payments.config import REPO_ROOT
from payments.settings import PipelineSettings

SCHEDULED = {"send-payments", "confirm-payments", "mint-tokens", "deliver-webhooks", "monitor-payments"}


def _flows() -> list[tuple[dict[str, Any], Any]]:
    out = []
    for d in spec()["deployments"]:
        path, _, name = d["entrypoint"].partition(":")
        out.append((d, load_flow_from_entrypoint(f"{REPO_ROOT / path}:{name}")))
    return out


def test_prefect_yaml_entrypoints_load_on_the_work_pool_with_a_queue_per_role() -> None:
    flows = _flows()
    assert len(flows) == 12 and len({(f.name, d["name"]) for d, f in flows}) == 12
    for d, f in flows:
        assert d["work_pool"]["name"] == "payments"
        queue = d["work_pool"]["work_queue_name"]
        assert queue in QUEUE_PRIORITIES
        expected = "monitor" if f.name == "monitor-payments" else "pipeline" if f.name in SCHEDULED else "recovery"
        assert queue == expected, (f.name, queue)
        assert queue in d["tags"]
    assert QUEUE_PRIORITIES["recovery"] < QUEUE_PRIORITIES["monitor"] < QUEUE_PRIORITIES["pipeline"]


def test_only_the_pipeline_and_monitor_are_scheduled_with_intervals_from_the_settings() -> None:
    flows = _flows()
    assert {f.name for d, f in flows if d.get("schedules")} == SCHEDULED
    settings = PipelineSettings(send_run_seconds=120, confirm_run_seconds=240)
    document = with_intervals(spec(), settings)
    intervals = {d["name"]: d["schedules"][0]["interval"] for d in document["deployments"] if d.get("schedules")}
    assert intervals == {"send": 120, "confirm": 240, "mint": 240, "webhooks": 240, "monitor": 240}
    assert set(WINDOW_SETTING) == set(intervals)
    assert "definitions" not in document


def test_recovery_deployments_say_what_they_do_and_describe_every_parameter() -> None:
    for d, f in _flows():
        if d["work_pool"]["work_queue_name"] != "recovery":
            continue
        assert d["name"] != "manual" and "dry_run" in d["description"]
        schema = parameter_schema(f).model_dump()
        for name, prop in schema["properties"].items():
            assert prop.get("description"), f"{f.name}.{name} has no description in the UI's form"
        assert "dry_run" in schema["properties"]
        assert schema["properties"]["dry_run"]["default"] is True


def test_no_deployment_has_a_concurrency_limit() -> None:
    """A limit's slot outlives a run killed with its worker (until its 300 s lease ends, or for good
    after a Prefect server restart); overlapping runs are harmless, so there are none."""
    document = yaml.safe_load((REPO_ROOT / "deployments" / "prefect.yaml").read_text())
    assert not any("concurrency_limit" in d for d in document["deployments"])


def test_transient_start_up_errors_are_told_apart_from_real_ones() -> None:
    import httpx
    import sqlalchemy.exc
    from prefect.exceptions import PrefectHTTPStatusError

    from deployments.startup import is_transient

    def status(code: int) -> PrefectHTTPStatusError:
        request = httpx.Request("POST", "http://prefect/api/deployments/")
        return PrefectHTTPStatusError.from_httpx_error(
            httpx.HTTPStatusError("x", request=request, response=httpx.Response(code, request=request)))

    db_down = sqlalchemy.exc.OperationalError("SELECT", {}, Exception("the database system is starting up"))
    assert is_transient(db_down)
    assert is_transient(httpx.ConnectError("[Errno 111] Connection refused"))
    assert is_transient(ConnectionRefusedError(111, "Connection refused"))
    assert is_transient(status(500)) and is_transient(status(503))
    assert is_transient(ExceptionGroup("runner", [status(500)]))  # the runner's task groups wrap errors
    wrapped = RuntimeError("could not register")
    wrapped.__cause__ = httpx.ConnectError("refused")
    assert is_transient(wrapped)
    assert not is_transient(status(422)) and not is_transient(status(404))
    assert not is_transient(ValueError("bad setting"))
    assert not is_transient(sqlalchemy.exc.ProgrammingError("SELECT", {}, Exception("no such table")))


def test_start_up_retries_transient_errors_with_backoff_and_gives_up_after_a_bound() -> None:
    import httpx
    import pytest

    from deployments.startup import run_with_retries

    waits: list[float] = []
    calls = {"n": 0}

    def flaky() -> None:
        calls["n"] += 1
        if calls["n"] < 4:
            raise httpx.ConnectError("Connection refused")

    run_with_retries(flaky, attempts=5, first_delay=1, max_delay=3, sleep=waits.append)
    assert calls["n"] == 4 and waits == [1, 2, 3]

    def down() -> None:
        raise httpx.ConnectError("Connection refused")

    waits.clear()
    with pytest.raises(httpx.ConnectError):
        run_with_retries(down, attempts=3, first_delay=1, max_delay=30, sleep=waits.append)
    assert waits == [1, 2]  # three attempts, two waits

    def broken() -> None:
        raise ValueError("not transient")

    waits.clear()
    with pytest.raises(ValueError):
        run_with_retries(broken, sleep=waits.append)
    assert waits == []


def test_an_automation_is_the_same_whatever_order_its_event_sets_dump_in() -> None:
    """The trigger's event sets come back from the server rebuilt; a different member order must not make
    the automation look changed (it would be recreated and forget what its trigger saw)."""
    from types import SimpleNamespace

    from deployments.automations import _same

    def automation(events: list[str]) -> Any:
        trigger = SimpleNamespace(model_dump=lambda **_: {"expect": list(events), "within": 10})
        return SimpleNamespace(description="d", enabled=True, trigger=trigger, actions=[])

    events = [f"prefect.flow-run.{s}" for s in ("heartbeat", "Completed", "Failed", "Cancelled", "Crashed")]
    assert _same(automation(events), automation(list(reversed(events))))
    assert not _same(automation(events), automation(events[:-1]))
