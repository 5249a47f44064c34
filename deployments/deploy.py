"""Deploy the pipeline: `python -m deployments.deploy` (the local stack runs it at every start).

1. the `payments` process work pool and its queues, with priorities (recovery 1, monitor 2, pipeline 3);
2. `prefect deploy --all` on deployments/prefect.yaml, with each scheduled deployment's interval taken
   from system_settings (send_run_seconds for send; confirm_run_seconds for confirm, mint, webhooks and
   the monitor), so a run's window equals its schedule's interval;
3. deployments of these flows that the file no longer names (an earlier version's) are deleted;
4. the automations (deployments/automations.py): crashed-run detection, a new run when a pipeline run
   crashes, alert notifications.

Idempotent; transient errors (the database or the Prefect API restarting) are retried with backoff."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import yaml
from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import WorkPoolCreate
from prefect.exceptions import ObjectNotFound
from prefect.logging import get_logger

from deployments.startup import run_with_retries
from payments.config import REPO_ROOT, require_env
from payments.db import engine_for
from payments.settings import PipelineSettings, read_settings

POOL = "payments"
QUEUE_PRIORITIES = {"recovery": 1, "monitor": 2, "pipeline": 3}
PREFECT_YAML = REPO_ROOT / "deployments" / "prefect.yaml"
# which setting is the schedule interval (and the run window) of each scheduled deployment
WINDOW_SETTING = {"send": "send_run_seconds", "confirm": "confirm_run_seconds", "mint": "confirm_run_seconds",
                  "webhooks": "confirm_run_seconds", "monitor": "confirm_run_seconds"}
MIN_WINDOW = 5

log = get_logger("deployments.deploy")


def spec() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load(PREFECT_YAML.read_text())
    return loaded


def with_intervals(document: dict[str, Any], settings: PipelineSettings) -> dict[str, Any]:
    """The prefect.yaml document with each scheduled deployment's interval from the settings."""
    out = {**document, "deployments": []}
    for d in document["deployments"]:
        d = dict(d)
        if d["name"] in WINDOW_SETTING:
            seconds = max(int(getattr(settings, WINDOW_SETTING[d["name"]])), MIN_WINDOW)
            d["schedules"] = [{"interval": seconds}]
        out["deployments"].append(d)
    out.pop("definitions", None)  # anchors are resolved already
    return out


async def ensure_pool() -> None:
    """The process work pool and its queues with their priorities (created or corrected)."""
    async with get_client() as client:
        try:
            await client.read_work_pool(POOL)
        except ObjectNotFound:
            await client.create_work_pool(WorkPoolCreate(name=POOL, type="process",
                                                         description="x402 payment pipeline"))
        queues = {q.name: q for q in await client.read_work_queues(work_pool_name=POOL)}
        for name, priority in QUEUE_PRIORITIES.items():
            if name not in queues:
                await client.create_work_queue(name=name, work_pool_name=POOL, priority=priority,
                                               description=f"{name} runs of the payment pipeline")
            elif queues[name].priority != priority or queues[name].concurrency_limit is not None:
                await client.update_work_queue(id=queues[name].id, priority=priority, concurrency_limit=None)


async def prune(document: dict[str, Any]) -> list[str]:
    """Delete deployments of this file's flows that the file does not name; returns their names."""
    from prefect.flows import load_flow_from_entrypoint

    wanted: dict[str, set[str]] = {}
    for d in document["deployments"]:
        path, _, name = d["entrypoint"].partition(":")
        flow_name = load_flow_from_entrypoint(f"{REPO_ROOT / path}:{name}").name
        wanted.setdefault(flow_name, set()).add(d["name"])
    gone = []
    async with get_client() as client:
        for deployment in await client.read_deployments():
            flow = await client.read_flow(deployment.flow_id)
            if flow.name in wanted and deployment.name not in wanted[flow.name]:
                await client.delete_deployment(deployment.id)
                gone.append(f"{flow.name}/{deployment.name}")
    return gone


def prefect_deploy(document: dict[str, Any]) -> None:
    """`prefect deploy --all` on the document (written next to prefect.yaml's entrypoints' root)."""
    with tempfile.TemporaryDirectory(prefix="payments-deploy-") as tmp:
        path = Path(tmp) / "prefect.yaml"
        path.write_text(yaml.safe_dump(document, sort_keys=False))
        env = {**os.environ, "PAYMENTS_CODE_DIR": os.environ.get("PAYMENTS_CODE_DIR", str(REPO_ROOT))}
        done = subprocess.run([sys.executable, "-m", "prefect", "--no-prompt", "deploy", "--all",
                               "--prefect-file", str(path)], cwd=REPO_ROOT, env=env, capture_output=True,
                              text=True)
    if done.returncode != 0:
        tail = "\n".join((done.stdout + done.stderr).strip().splitlines()[-15:])
        if re.search(r"ConnectError|Connection refused|Server error '5\d\d", tail):
            raise ConnectionError(f"prefect deploy could not reach the API:\n{tail}")
        raise RuntimeError(f"prefect deploy failed:\n{tail}")


def deploy(settings: PipelineSettings | None = None) -> None:
    import asyncio

    from deployments.automations import main as configure_automations

    if settings is None:
        with engine_for(require_env("DATABASE_URL")).connect() as conn:
            settings = read_settings(conn)
    document = with_intervals(spec(), settings)
    asyncio.run(ensure_pool())
    prefect_deploy(document)
    gone = asyncio.run(prune(document))
    if gone:
        log.info("deleted deployments prefect.yaml no longer names: %s", ", ".join(gone))
    configure_automations()


def main() -> None:
    run_with_retries(deploy)
    print(f"deployed {len(spec()['deployments'])} deployments on work pool {POOL!r} "
          f"(queues {', '.join(QUEUE_PRIORITIES)})", flush=True)


if __name__ == "__main__":
    main()
