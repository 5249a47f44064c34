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

