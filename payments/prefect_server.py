"""A local Prefect server (API + UI) backed by PostgreSQL - its own database on the same server as the
queue - started and stopped by the local stack. Skipped when PREFECT_API_URL is already set."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import requests
from sqlalchemy.engine import make_url

from payments.localstack import DATA_DIR, free_port

# Recording settings measured to keep up with the pipeline's task runs (see ARCHITECTURE notes in README).
SERVER_TUNING = {
    "PREFECT_SERVER_SERVICES_TASK_RUN_RECORDER_BATCH_SIZE": "200",
    "PREFECT_SERVER_SERVICES_TASK_RUN_RECORDER_READ_BATCH_SIZE": "50",
    "PREFECT_SERVER_SERVICES_TASK_RUN_RECORDER_FLUSH_INTERVAL": "1",
    "PREFECT_SERVER_SERVICES_EVENT_PERSISTER_BATCH_SIZE": "200",
    "PREFECT_SERVER_SERVICES_EVENT_PERSISTER_READ_BATCH_SIZE": "50",
    "PREFECT_SERVER_SERVICES_EVENT_PERSISTER_FLUSH_INTERVAL": "1",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_SERVER_UI_SHOW_PROMOTIONAL_CONTENT": "false",
}
# Retention: the Prefect database stays bounded. Finished flow runs (with their task runs, logs and
# artifacts) are deleted 3 days after they end, events after 1 day, checked hourly. The payments tables
# keep the audit trail (payment_events, recovery_actions) for as long as the operator keeps them.
RETENTION = {
    "PREFECT_SERVER_SERVICES_DB_VACUUM_ENABLED": "events,flow_runs",
    "PREFECT_SERVER_SERVICES_DB_VACUUM_RETENTION_PERIOD": str(3 * 86_400),
    "PREFECT_SERVER_EVENTS_RETENTION_PERIOD": "P1D",  # an ISO 8601 duration (plain seconds are refused)
    "PREFECT_SERVER_SERVICES_DB_VACUUM_LOOP_SECONDS": "3600",
    # every run's 30 s heartbeat is an event: kept 2 hours (crash detection needs 90 s of them)
    "PREFECT_SERVER_SERVICES_DB_VACUUM_EVENT_RETENTION_OVERRIDES": '{"prefect.flow-run.heartbeat": 7200}',
}


def asyncpg_url(database_url: str) -> str:
    """Prefect's server talks to PostgreSQL through asyncpg."""
    return make_url(database_url).set(drivername="postgresql+asyncpg").render_as_string(hide_password=False)


@dataclass
class PrefectServer:
    api_url: str
    process: subprocess.Popen[bytes] | None
    log_path: Path | None

    @property
    def ui_url(self) -> str:
        return self.api_url.removesuffix("/api")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=5)


def prefect_home() -> Path:
    home = DATA_DIR / "prefect-home"
    home.mkdir(parents=True, exist_ok=True)
    return home


def start_prefect_server(database_url: str, *, timeout: float = 90) -> PrefectServer:
    existing = os.environ.get("PREFECT_API_URL")
    if existing:
        return PrefectServer(api_url=existing, process=None, log_path=None)
    port = free_port()
    env = dict(os.environ)
    env.update(SERVER_TUNING)
    for key, value in RETENTION.items():  # an operator's own values win
        env.setdefault(key, value)
    env["PREFECT_HOME"] = str(prefect_home())
    env["PREFECT_API_DATABASE_CONNECTION_URL"] = asyncpg_url(database_url)
    env.pop("PREFECT_API_URL", None)
    # The UI asks the server for its API address; without these it points the browser at port 4200 (the
    # default), which is not this server - "Can't connect to Server API", or someone else's server.
    env["PREFECT_UI_API_URL"] = f"http://127.0.0.1:{port}/api"
    env["PREFECT_SERVER_API_PORT"] = str(port)
    log_path = DATA_DIR / "prefect-server.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)],
            stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True,
        )
    server = PrefectServer(api_url=f"http://127.0.0.1:{port}/api", process=process, log_path=log_path)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the Prefect server exited; see {log_path}")
        try:
            if requests.get(f"{server.api_url}/health", timeout=1).ok:
                return server
        except requests.RequestException:
            pass
        time.sleep(0.25)
    server.stop()
    raise RuntimeError(f"the Prefect server did not answer within {timeout:.0f} s; see {log_path}")
