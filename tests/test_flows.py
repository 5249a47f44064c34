"""Real Prefect flow runs (prefect_test_harness: a temporary Prefect server) over real PostgreSQL and
anvil: 50 payments end to end, and kill -9 of the process running the send flow at the two moments
that matter, followed by a restart."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any, cast

import pytest
from sqlalchemy import Engine, text

from flows.confirm import confirm_payments
from flows.send import send_payments
from payments.config import REPO_ROOT
from payments.db import make_engine
from payments.faults import AFTER_BROADCAST, AFTER_PERSIST
from payments.localstack import Deployment, create_database, free_port
from payments.prefect_server import start_prefect_server
from payments.settings import write_setting
from tests.conftest import _server
from tests.helpers import PRICE, balance, mint_statuses, payment, queue_many, statuses

pytestmark = [pytest.mark.flow, pytest.mark.chain]


@pytest.fixture(scope="session")
def prefect_api() -> Iterator[str]:
    """A real Prefect server on the embedded PostgreSQL (prefect_test_harness would put it on SQLite,
    which answers "database is locked" while flows record task runs in parallel)."""
    from prefect.logging.handlers import APILogWorker
    from prefect.settings import PREFECT_API_URL, temporary_settings

    admin = _server("embedded").admin_uri
    server = start_prefect_server(create_database(admin, "prefect_tests", drop=True))
    try:
        with temporary_settings({PREFECT_API_URL: server.api_url}):
            yield server.api_url
            APILogWorker.drain_all(timeout=5)  # deliver buffered run logs while the server is still up
    finally:
        server.stop()


@pytest.fixture
def flow_env(
    prefect_api: str, chain: Deployment, embedded_db_url: str, embedded_engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> dict[str, str]:
    with embedded_engine.begin() as conn:  # the test chain mines only when a transaction arrives
        write_setting(conn, "confirmation_depth", 1)
        write_setting(conn, "mint_confirmation_depth", 1)
    env = {
        "DATABASE_URL": embedded_db_url,
        "RPC_URL": chain.rpc_url,
        "SIGNER_PRIVATE_KEYS": ",".join("0x" + bytes(s.key).hex() for s in chain.signers),
    }
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    return {**os.environ, **env, "PREFECT_API_URL": prefect_api, "PREFECT_LOGGING_LEVEL": "WARNING"}


def _nonce_report(engine: Engine) -> list[tuple[str, list[int]]]:
    with engine.connect() as conn:
        return [(str(s), list(n)) for s, n in conn.execute(text(
            "SELECT signer, array_agg(tx_nonce ORDER BY tx_nonce) FROM payment_queue GROUP BY signer"))]


def _assert_settled_exactly_once(engine: Engine, chain: Deployment, n: int, before: int) -> None:
    assert statuses(engine) == {"completed": n}
    assert mint_statuses(engine) == {"released": n}
    with engine.connect() as conn:
        assert conn.execute(text("SELECT count(DISTINCT payment_id) FROM mint_queue")).scalar_one() == n
    assert balance(chain, chain.merchant) == before + n * PRICE  # paid once each, never twice
    w3 = chain.w3()
    for signer, nonces in _nonce_report(engine):
        assert nonces == list(range(len(nonces))), "a nonce was skipped or reused"
        assert w3.eth.get_transaction_count(w3.to_checksum_address(signer)) == len(nonces)


def test_fifty_payments_end_to_end_through_prefect(flow_env: dict[str, str], chain: Deployment,
                                                   embedded_engine: Engine) -> None:
    before = balance(chain, chain.merchant)
    queue_many(embedded_engine, chain, 50)
    sent = send_payments(run_seconds=0, max_ticks=10)
    assert sent["sent"] == 50 and sent["failed"] == 0
    confirmed = confirm_payments(run_seconds=0, max_ticks=10)
    assert confirmed["completed"] == 50
    _assert_settled_exactly_once(embedded_engine, chain, 50, before)


def _run_send_process(env: dict[str, str], failpoint: str | None) -> int:
    code = "from flows.send import send_payments; send_payments(run_seconds=0, max_ticks=1)"
    child_env = dict(env)
    if failpoint:
        child_env["PAYMENTS_FAILPOINT"] = failpoint
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, env=child_env, timeout=180,
                            capture_output=True, text=True)
    return result.returncode


@pytest.mark.crash
@pytest.mark.parametrize("point", [AFTER_PERSIST, AFTER_BROADCAST])
def test_kill_9_of_the_send_flow_loses_nothing_and_pays_nothing_twice(
    point: str, flow_env: dict[str, str], chain: Deployment, embedded_engine: Engine
) -> None:
    before = balance(chain, chain.merchant)
    with embedded_engine.begin() as conn:
        write_setting(conn, "payment_batch_size", 100)
    queue_many(embedded_engine, chain, 20)
    assert _run_send_process(flow_env, point) == -signal.SIGKILL
    assert statuses(embedded_engine) == {"processing": 20}  # the run died before writing `sent`
    with embedded_engine.connect() as conn:
        signed = conn.execute(text("SELECT count(*) FROM payment_transactions")).scalar_one()
    # nonce, raw tx and hash were committed before the kill (the other lane may not have got that far)
    assert 1 <= signed <= 20
    # the dead run's leases run out (fast-forwarded here instead of waiting processing_lease_seconds)
    with embedded_engine.begin() as conn:
        conn.execute(text("UPDATE payment_queue SET lease_expires_at = now() - interval '1 second'"))
    assert _run_send_process(flow_env, None) == 0
    assert statuses(embedded_engine) == {"sent": 20}
    confirm_payments(run_seconds=0, max_ticks=5)
    _assert_settled_exactly_once(embedded_engine, chain, 20, before)
    with embedded_engine.connect() as conn:
        # the bytes signed before the kill were sent again as they were: one transaction per payment
        assert conn.execute(text("SELECT count(*) FROM payment_transactions")).scalar_one() == 20


def test_monitor_flow_publishes_metrics_to_the_ui(flow_env: dict[str, str], chain: Deployment,
                                                  embedded_engine: Engine) -> None:
    from prefect.artifacts import Artifact

    from flows.monitor import monitor_payments

    queue_many(embedded_engine, chain, 3)
    result = monitor_payments(run_seconds=0)
    assert result["metrics"]["queue_depth"] == 3 and result["alerts"] == []
    summary = Artifact.get("payment-queue-summary")
    table = Artifact.get("payment-queue-metrics")
    assert summary is not None and "queue depth (pending) | 3 |" in str(summary.data)
    assert table is not None and '{"metric": "queue depth (pending payments)", "value": "3"}' in str(table.data)


def test_the_dashboard_is_republished_when_the_queue_changes_and_every_few_idle_passes(
        flow_env: dict[str, str], chain: Deployment, embedded_engine: Engine, prefect_api: str) -> None:
    """Every artifact version stays in the Prefect database: an idle monitor republishes the dashboard
    every SUMMARY_EVERY passes, a changed queue at once."""
    import requests

    from flows.monitor import SUMMARY_EVERY, monitor_pass
    from tasks.common import Pipeline

    def versions() -> int:
        return int(requests.post(f"{prefect_api}/artifacts/count", timeout=30, json={
            "artifacts": {"key": {"any_": ["payment-queue-summary"]}}}).json())

    p = Pipeline.from_env()
    shown: dict[str, Any] = {}
    before = versions()
    monitor_pass(p, shown)
    assert versions() == before + 1  # the first pass shows the queue
    for _ in range(SUMMARY_EVERY - 1):
        monitor_pass(p, shown)
    assert versions() == before + 1  # nothing changed: no new version
    monitor_pass(p, shown)
    assert versions() == before + 2  # the idle refresh
    queue_many(embedded_engine, chain, 1)
    monitor_pass(p, shown)
    assert versions() == before + 3  # a new pending payment: shown at once


def test_recovery_flow_run_records_its_actions_and_an_artifact(flow_env: dict[str, str], chain: Deployment,
                                                               embedded_engine: Engine) -> None:
    from prefect.artifacts import Artifact

    from flows.recovery import resync_nonces_flow

    assert resync_nonces_flow() == {"unchanged": 2}  # dry run by default; two signer lanes, no waiting nonce
    with embedded_engine.connect() as conn:
        rows = conn.execute(text("SELECT flow, outcome, dry_run, actor FROM recovery_actions")).all()
    assert len(rows) == 2 and all(r.flow == "resync_nonces" and r.dry_run for r in rows)
    assert rows[0].actor.startswith("recovery:resync_nonces:")
    artifact = Artifact.get("resync-nonces")
    assert artifact is not None and "no nonce waiting" in str(artifact.data)


def _wait_for(condition: Any, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.1)
    return condition()


def test_alert_opens_reminds_and_resolves_through_a_prefect_automation(
    flow_env: dict[str, str], chain: Deployment, embedded_engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    from deployments.automations import ensure_alert_automation, notification_block_from_env
    from flows.monitor import monitor_payments
    from payments.alert_receiver import start_alert_receiver

    receiver = start_alert_receiver(echo=False)
    try:
        monkeypatch.setenv("ALERT_WEBHOOK_URL", receiver.url)
        block = notification_block_from_env()
        assert block is not None
        ensure_alert_automation(block)
        time.sleep(3)  # the server's trigger service picks up the new automation
        queue_many(embedded_engine, chain, 1)
        send_payments(run_seconds=0, max_ticks=1)
        with embedded_engine.begin() as conn:  # a payment 2 minutes in sent: over the seed's 60 s
            conn.execute(text("UPDATE payment_queue SET sent_at = sent_at - interval '2 minutes'"))
        assert monitor_payments(run_seconds=0)["notifications"] == ["opened:sent_age"]
        assert _wait_for(lambda: len(receiver.received) == 1, 30), receiver.received
        first = receiver.received[0]
        assert "payments.alert.opened" in first["subject"] and "sent_age" in first["subject"]
        assert "in sent for" in first["body"]
        assert monitor_payments(run_seconds=0)["notifications"] == []  # still open, reminder not due: nothing sent
        with embedded_engine.begin() as conn:
            write_setting(conn, "alert_reminder_seconds", 0)
        assert monitor_payments(run_seconds=0)["notifications"] == ["reminder:sent_age"]
        confirm_payments(run_seconds=0, max_ticks=2)
        assert monitor_payments(run_seconds=0)["notifications"] == ["resolved:sent_age"]
        assert _wait_for(lambda: len(receiver.received) == 3, 30), receiver.received
        kinds = sorted(r["subject"].split(":")[0] for r in receiver.received)
        assert kinds == ["[payments] payments.alert.opened", "[payments] payments.alert.reminder",
                         "[payments] payments.alert.resolved"]
    finally:
        receiver.stop()


def test_idle_runs_make_no_task_runs_and_every_run_says_what_it_did(
    flow_env: dict[str, str], chain: Deployment, embedded_engine: Engine
) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    def run_of(state: Any) -> tuple[str, int]:
        run_id = state.state_details.flow_run_id
        with get_client(sync_client=True) as client:
            name = client.read_flow_run(run_id).name
            tasks = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run_id])))
        return name, len(tasks)

    idle = [send_payments(run_seconds=0, max_ticks=3, return_state=True),
            confirm_payments(run_seconds=0, max_ticks=3, return_state=True)]
    for state in idle:
        name, tasks = run_of(state)
        assert tasks == 0 and name.endswith("nothing to do"), (name, tasks)
    queue_many(embedded_engine, chain, 3)
    name, tasks = run_of(send_payments(run_seconds=0, max_ticks=1, return_state=True))
    assert name.startswith("send ") and "sent 3" in name and tasks >= 2, (name, tasks)


def test_a_send_run_that_ends_gives_back_its_unsigned_claims_at_once(
    flow_env: dict[str, str], chain: Deployment, embedded_engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    import tasks.send

    def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("the run fails after claiming")

    monkeypatch.setattr(tasks.send, "assign_nonces_and_sign", broken)
    queue_many(embedded_engine, chain, 4)
    state = send_payments(run_seconds=0, max_ticks=1, return_state=True)
    assert state.is_failed()
    assert statuses(embedded_engine) == {"pending": 4}  # not `processing` until the 60 s lease runs out


def test_the_ui_is_told_to_reach_its_own_server(prefect_api: str) -> None:
    import requests

    ui = prefect_api.removesuffix("/api")
    settings = requests.get(f"{ui}/ui-settings", timeout=10).json()
    assert settings["api_url"] == prefect_api  # not the default http://127.0.0.1:4200/api


TEST_MARKER = f"tests-{os.getpid()}"  # every process the tests start carries it, flow runs included


def _spawn(module: str, env: dict[str, str], log: Any) -> subprocess.Popen[bytes]:
    from payments.stack import MARKER

    return subprocess.Popen([sys.executable, "-m", module], cwd=REPO_ROOT, env={**env, MARKER: TEST_MARKER},
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def _deploy(env: dict[str, str], log_path: Path) -> None:
    with log_path.open("ab") as log:
        assert _spawn("deployments.deploy", env, log).wait(timeout=180) == 0, log_path.read_text()[-3000:]


def _stop_group(process: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=20)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)  # and any flow run still in its group
    process.wait(timeout=5)


def _active_runs(flow_name: str, deployment_name: str) -> int:
    """Runs of a deployment that are Pending or Running: those a deployment concurrency limit counts."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        DeploymentFilter,
        DeploymentFilterName,
        FlowFilter,
        FlowFilterName,
        FlowRunFilter,
        FlowRunFilterState,
        FlowRunFilterStateType,
    )
    from prefect.client.schemas.objects import StateType

    with get_client(sync_client=True) as client:
        return len(client.read_flow_runs(
            flow_filter=FlowFilter(name=FlowFilterName(any_=[flow_name])),
            deployment_filter=DeploymentFilter(name=DeploymentFilterName(any_=[deployment_name])),
            flow_run_filter=FlowRunFilter(state=FlowRunFilterState(
                type=FlowRunFilterStateType(any_=[StateType.PENDING, StateType.RUNNING])))))


@pytest.mark.crash
def test_kill_9_of_the_worker_and_its_runs_does_not_stall_the_pipeline(
    flow_env: dict[str, str], chain: Deployment, embedded_engine: Engine, tmp_path: Any
) -> None:
    """The flows deployed from prefect.yaml on the work pool; the worker is killed together with its runs
    (kill -9 of the worker and of every flow run it started: a lost container) and a new worker starts (the local
    stack's supervisor, or systemd, does that). A payment queued after the kill is sent within a minute,
    although the next scheduled send run is 5 minutes away: the new worker starts one of each at once."""
    with embedded_engine.begin() as conn:
        write_setting(conn, "send_run_seconds", 300)
        write_setting(conn, "confirm_run_seconds", 3600)  # confirm, mint, webhooks, monitor: not under test
    env = {**flow_env, "MINTER_PRIVATE_KEY": "0x" + bytes(chain.minter.key).hex(), "PREFECT_WORKER_QUERY_SECONDS": "1"}
    log_path = tmp_path / "worker.log"
    _deploy(env, log_path)
    log = log_path.open("ab")
    worker = _spawn("deployments.worker", env, log)
    try:
        first = queue_many(embedded_engine, chain, 1)[0]
        assert _wait_for(lambda: payment(embedded_engine, first)["status"] in ("sent", "completed"), 90), \
            log_path.read_text()[-3000:]
        assert _active_runs("send-payments", "send") >= 1
        from payments.stack import marked_pids

        os.killpg(worker.pid, signal.SIGKILL)
        for pid in marked_pids(TEST_MARKER):  # and its flow runs, each in a session of its own: all gone at once
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        worker.wait(timeout=10)
        killed = time.monotonic()
        worker = _spawn("deployments.worker", env, log)
        second = queue_many(embedded_engine, chain, 1)[0]
        sent = _wait_for(lambda: payment(embedded_engine, second)["status"] in ("sent", "completed"), 60)
        took = time.monotonic() - killed
        print(f"kill -9 of the worker's process group to the next payment sent: {took:.1f} s")
        assert sent, f"no payment sent {took:.0f} s after the kill: {statuses(embedded_engine)}"
    finally:
        _stop_group(worker)
        # its flow runs live in sessions of their own: end them, or they go on using the tests' chain
        from payments.stack import end_marked

        end_marked(TEST_MARKER)
        log.close()


@pytest.mark.crash
def test_the_local_stack_restarts_a_killed_worker_and_stops_everything_at_the_end(
    flow_env: dict[str, str], prefect_api: str, chain: Deployment, embedded_engine: Engine, tmp_path: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """kill -9 of the stack's worker alone (as the OOM killer would): the stack stops the flow runs it
    left and starts a new one, which runs the deployments again (a payment queued after the kill is
    sent); leaving the stack stops every process it started."""
    from payments.stack import group_alive, local_stack, marked_pids

    monkeypatch.setenv("PREFECT_API_URL", prefect_api)  # the stack joins the tests' database, chain, server
    with embedded_engine.begin() as conn:
        write_setting(conn, "send_run_seconds", 300)
        write_setting(conn, "confirm_run_seconds", 3600)
    with local_stack(database="unused", buyers=1, say=False, log_dir=tmp_path) as stack:
        api_env = Path(f"/proc/{stack.api.pid}/environ").read_bytes().split(b"\0")
        assert not [v for v in api_env if v.split(b"=")[0] in (b"SIGNER_PRIVATE_KEYS", b"MINTER_PRIVATE_KEY")]
        first = stack.worker.pid
        before = queue_many(embedded_engine, chain, 1)[0]
        assert _wait_for(lambda: payment(embedded_engine, before)["status"] in ("sent", "completed"), 60), \
            (tmp_path / "worker.log").read_text()[-3000:]
        os.kill(first, signal.SIGKILL)
        killed = time.monotonic()
        assert _wait_for(lambda: stack.worker.pid != first and stack.worker.process.poll() is None, 15)
        # the flow runs the killed process left are stopped: what follows is the new process's work
        assert _wait_for(lambda: not group_alive(first), 20)
        after = queue_many(embedded_engine, chain, 1)[0]
        sent = _wait_for(lambda: payment(embedded_engine, after)["status"] in ("sent", "completed"), 60)
        print(f"kill -9 of the stack's worker to the next payment sent: {time.monotonic() - killed:.1f} s")
        assert sent, (tmp_path / "worker.log").read_text()[-3000:]
        assert stack.worker.restarts == 1
        groups, api, marker = stack.worker.process_groups, stack.api, stack.worker.marker
    assert not any(group_alive(g) for g in groups)  # both workers
    assert marked_pids(marker) == []  # and every flow run they started, each in a session of its own
    assert api.poll() is not None


class _LateForwarder:
    """A loopback port that refuses connections until `open()`, then forwards them to `target_port`:
    a Prefect API that is still starting (or restarting) when the deploy or the worker starts."""

    def __init__(self, target_port: int) -> None:
        self.port = free_port()
        self.target_port = target_port
        self._listener: socket.socket | None = None

    def open(self) -> None:
        listener = socket.create_server(("127.0.0.1", self.port))
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def _accept(self, listener: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while True:
                client, _ = listener.accept()
                upstream = socket.create_connection(("127.0.0.1", self.target_port))
                for a, b in ((client, upstream), (upstream, client)):
                    threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := src.recv(65536):
                dst.sendall(data)
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        if self._listener is not None:
            self._listener.close()


def test_deploy_retries_while_postgresql_and_the_prefect_api_are_not_up_yet(
    flow_env: dict[str, str], prefect_api: str, tmp_path: Any
) -> None:
    """deployments.deploy starts while its database does not answer yet (OperationalError) and then while
    the Prefect API refuses connections; it retries with backoff, logs each retry, and deploys once both
    are up, with the schedule read from the database."""
    from prefect.client.orchestration import get_client
    from sqlalchemy.engine import make_url

    embedded = _server("embedded")
    name = f"t_late_{os.getpid()}_{int(time.time())}"
    url = make_url(flow_env["DATABASE_URL"]).set(database=name).render_as_string(hide_password=False)
    api = _LateForwarder(int(prefect_api.rsplit(":", 1)[1].split("/")[0]))
    env = {**flow_env, "DATABASE_URL": url, "PREFECT_API_URL": f"http://127.0.0.1:{api.port}/api"}
    log_path = tmp_path / "deploy.log"
    with log_path.open("wb") as log:
        deployer = _spawn("deployments.deploy", env, log)
    try:
        def logged(text: str) -> bool:
            return text in log_path.read_text(errors="replace")

        assert _wait_for(lambda: logged("OperationalError") and logged("retrying in"), 30), log_path.read_text()
        create_database(embedded.admin_uri, name, template=embedded.template)
        with make_engine(url).begin() as conn:
            write_setting(conn, "send_run_seconds", 1234)  # proves the schedule was read after the retry
        assert _wait_for(lambda: logged("ConnectError"), 40), log_path.read_text()
        assert deployer.poll() is None
        api.open()

        def served() -> bool:
            with get_client(sync_client=True) as client:
                try:
                    deployment = client.read_deployment_by_name("send-payments/send")
                except Exception:
                    return False
            return any(getattr(s.schedule, "interval", None) == timedelta(seconds=1234)
                       for s in deployment.schedules)

        assert _wait_for(served, 60), log_path.read_text()[-3000:]
        assert deployer.wait(timeout=120) == 0 and not logged("giving up")
    finally:
        _stop_group(deployer)
        api.close()
        embedded.drop(url)


def test_a_payments_run_whose_heartbeats_stop_is_marked_crashed(prefect_api: str) -> None:
    """The payments-crashed-runs automation, with a 10 s window instead of 90 s: a Running payments run
    that stops sending heartbeats is marked Crashed; a run of another flow, or one still beating, is not."""
    from prefect import flow
    from prefect.automations import Automation
    from prefect.client.orchestration import get_client
    from prefect.events import emit_event
    from prefect.states import Running

    from deployments.automations import CRASH_AUTOMATION_NAME, ensure_crash_detection

    @flow(name="heartbeat-probe")
    def probe() -> None:
        pass

    created = ensure_crash_detection(timedelta(seconds=10))
    try:
        with get_client(sync_client=True) as client:
            dead = client.create_flow_run(probe, tags=["payments", "send"], state=Running())
            alive = client.create_flow_run(probe, tags=["payments", "send"], state=Running())
            other = client.create_flow_run(probe, tags=["elsewhere"], state=Running())

        def beat(run_id: Any, tag: str) -> None:
            emit_event(event="prefect.flow-run.heartbeat",
                       resource={"prefect.resource.id": f"prefect.flow-run.{run_id}"},
                       related=[{"prefect.resource.id": f"prefect.tag.{tag}", "prefect.resource.role": "tag"}])

        def state(run_id: Any) -> str:
            with get_client(sync_client=True) as client:
                return str(client.read_flow_run(run_id).state_type.value)

        beating_until = time.monotonic() + 8  # the automation is picked up by the server within seconds
        while time.monotonic() < beating_until:
            for run_id, tag in ((dead.id, "payments"), (alive.id, "payments"), (other.id, "elsewhere")):
                beat(run_id, tag)
            time.sleep(1)
        assert state(dead.id) == "RUNNING"  # beating: left alone
        # the runner died; a new deploy sets the automations up again: the same one is kept,
        # with what its trigger saw (recreating it would forget the dead run's last heartbeat)
        assert ensure_crash_detection(timedelta(seconds=10)).id == created.id
        deadline = time.monotonic() + 45  # then only `alive` beats on
        while time.monotonic() < deadline and state(dead.id) != "CRASHED":
            beat(alive.id, "payments")
            time.sleep(1)
        assert state(dead.id) == "CRASHED"
        assert state(alive.id) == "RUNNING" and state(other.id) == "RUNNING"
    finally:
        with contextlib.suppress(ValueError):
            cast(Any, Automation.read(name=CRASH_AUTOMATION_NAME)).delete()


def test_prefect_yaml_deploys_to_a_work_pool(prefect_api: str) -> None:
    env = {**os.environ, "PREFECT_API_URL": prefect_api, "PAYMENTS_CODE_DIR": str(REPO_ROOT)}
    prefect = [sys.executable, "-m", "prefect"]
    pool = subprocess.run([*prefect, "work-pool", "create", "payments", "--type", "process", "--overwrite"],
                          cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert pool.returncode == 0, pool.stdout + pool.stderr
    deploy = subprocess.run([*prefect, "--no-prompt", "deploy", "--all", "--prefect-file", "deployments/prefect.yaml"],
                            cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert deploy.returncode == 0, deploy.stdout[-3000:] + deploy.stderr[-3000:]
    from prefect.client.orchestration import get_client

    from deployments.deploy import spec

    with get_client(sync_client=True) as client:
        on_pool = [d for d in client.read_deployments() if d.work_pool_name == "payments"]
    queues = {d["name"]: d["work_pool"]["work_queue_name"] for d in spec()["deployments"]}
    assert {d.name: d.work_queue_name for d in on_pool} == queues and len(queues) == 12
    assert all(d.global_concurrency_limit is None for d in on_pool)  # a killed worker cannot hold a slot


@pytest.mark.skipif(not Path(os.environ.get("CHROMIUM", "/usr/bin/chromium")).exists(),
                    reason="Debian's chromium is not installed (.ci/run installs it)")
def test_the_prefect_ui_loads_the_dashboard_and_the_monitor_artifact_in_a_real_browser(
        flow_env: dict[str, str], prefect_api: str, tmp_path: Any) -> None:
    """Headless Chromium against the server's own UI: the dashboard and the monitor's markdown artifact
    load with their API calls answered and no connection error on the page."""
    import json

    import requests

    from flows.monitor import monitor_payments

    monitor_payments(run_seconds=0)
    latest = requests.post(f"{prefect_api}/artifacts/filter", timeout=30, json={
        "artifacts": {"key": {"any_": ["payment-queue-summary"]}}, "sort": "CREATED_DESC", "limit": 1}).json()[0]["id"]
    done = subprocess.run(["node", str(REPO_ROOT / "scripts" / "ui_check.mjs"), prefect_api.removesuffix("/api"),
                           "--screenshots", str(tmp_path), "--page", "dashboard=/dashboard",
                           "--page", f"monitor-artifact=/artifacts/artifact/{latest}|queue depth (pending)"],
                          capture_output=True, text=True, timeout=180, cwd=REPO_ROOT)
    pages = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert {p["page"] for p in pages} == {"dashboard", "monitor-artifact"}, done.stdout + done.stderr
    assert done.returncode == 0 and all(p["ok"] and p["api_failed"] == 0 for p in pages), done.stdout + done.stderr
    assert all((tmp_path / f"{p['page']}.png").stat().st_size > 10_000 for p in pages)


def test_a_run_logs_which_payments_it_moved_to_which_status(
        chain: Deployment, embedded_engine: Engine, caplog: pytest.LogCaptureFixture) -> None:
    """The run page names the payments a run moved (from the audit trail, by the run's actor), and only
    those: another actor's changes are not listed, and each change is listed once."""
    import logging

    from flows.runs import StateChanges

    mine = StateChanges(embedded_engine, "test")  # queue_many audits as actor "test"
    theirs = StateChanges(embedded_engine, "send-other-run")
    ids = queue_many(embedded_engine, chain, 3)
    with caplog.at_level(logging.INFO, logger="payments"):
        mine.log()
        theirs.log()
        mine.log()  # nothing new since the last line
    lines = [r.getMessage() for r in caplog.records if "-> " in r.getMessage()]
    assert lines == [f"-> pending: 3 payment(s): {', '.join(ids)}"], lines
