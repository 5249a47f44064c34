"""The deployment definitions: every entrypoint in prefect.yaml loads a flow, and prefect.yaml and the
served deployments describe the same set."""

from __future__ import annotations

import yaml
from prefect.flows import load_flow_from_entrypoint

from deployments.serve import build_deployments
from payments.config import REPO_ROOT
from payments.settings import PipelineSettings


def test_prefect_yaml_entrypoints_load_and_match_the_served_deployments() -> None:
    spec = yaml.safe_load((REPO_ROOT / "deployments" / "prefect.yaml").read_text())
    from_yaml = set()
    for d in spec["deployments"]:
        path, _, name = d["entrypoint"].partition(":")
        flow = load_flow_from_entrypoint(f"{REPO_ROOT / path}:{name}")
        from_yaml.add((flow.name, d["name"]))
        assert d["work_pool"]["name"] == "payments"
    served = {(d.flow_name, d.name) for d in build_deployments(PipelineSettings())}
    assert from_yaml == served and len(served) == 12


def test_only_the_pipeline_and_monitor_are_scheduled() -> None:
    scheduled = {d.flow_name for d in build_deployments(PipelineSettings()) if d.schedules}
    assert scheduled == {"send-payments", "confirm-payments", "mint-tokens", "deliver-webhooks", "monitor-payments"}


def test_no_deployment_has_a_concurrency_limit() -> None:
    """A limit's slot outlives a run killed with its runner (until its 300 s lease ends, or for good
    after a Prefect server restart); overlapping runs are harmless, so there are none."""
    assert all(d.concurrency_limit is None for d in build_deployments(PipelineSettings()))
    spec = yaml.safe_load((REPO_ROOT / "deployments" / "prefect.yaml").read_text())
    assert not any("concurrency_limit" in d for d in spec["deployments"])


def test_transient_start_up_errors_are_told_apart_from_real_ones() -> None:
    import httpx
    import sqlalchemy.exc
    from prefect.exceptions import PrefectHTTPStatusError

    from deployments.serve import is_transient

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

    from deployments.serve import run_with_retries

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
